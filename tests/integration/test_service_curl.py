"""The API driven by ``curl`` from a shell script, as a shell-script agent would use it.

The script registers as an agent, enqueues a job, claims it with a long poll, writes its result
key create-only (``If-None-Match: *``, a second create is refused with ``412``), acks the job
with a result, sees the result key's change on the event stream (``curl -N``), and reads the
job's result back. It uses only ``curl``, ``grep`` and ``sed`` (no ``jq``): the responses are
compact JSON, so a ``sed`` expression picks a field.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import ServiceProcess, running_service, unique

pytest.importorskip("litestar", reason="needs the service extra")
pytest.importorskip("uvicorn", reason="needs the service extra")

SCRIPT = r"""#!/usr/bin/env bash
set -euo pipefail
api="$FLEETMEM_API/v1/ns/$NS"
auth="Authorization: Bearer $AGENT_TOKEN"
json="Content-Type: application/json"
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n 1; }

# The namespace's change feed (an admin's job, done once).
curl -sS -f -X POST -H "Authorization: Bearer $ADMIN_TOKEN" -H "$json" -d '{}' \
  "$api/changes/enable" >/dev/null

curl -sS -f -X PUT -H "$auth" -H "$json" -d '{"info":{"kind":"shell"},"ttl":60}' \
  "$api/agents/shell-1" | grep -q '"id":"shell-1"'
echo "registered shell-1"

job=$(curl -sS -f -X POST -H "$auth" -H "$json" -d '{"payload":{"n":21}}' \
  "$api/queues/work/jobs" | field id)
echo "enqueued $job"

# Watch the results as they are written (Server-Sent Events, no buffering).
curl -sS -N --max-time 20 -H "$auth" "$api/changes/watch?pattern=results/*" >watch.out &
watcher=$!
for _ in $(seq 1 200); do grep -q '^event: ready' watch.out && break; sleep 0.05; done

claim=$(curl -sS -f -X POST -H "$auth" -H "$json" \
  -d '{"consumer":"shell-1","lease":30,"wait":10}' "$api/queues/work/claim")
claimed=$(printf '%s' "$claim" | field id)
token=$(printf '%s' "$claim" | field token)
n=$(printf '%s' "$claim" | sed -n 's/.*"payload":{"n":\([0-9]*\)}.*/\1/p')
echo "claimed $claimed n=$n"
answer=$((n * 2))

created=$(curl -sS -o /dev/null -D headers.txt -w '%{http_code}' -X PUT -H "$auth" -H "$json" \
  -H 'If-None-Match: *' -d "{\"value\":$answer}" "$api/kv/results/$claimed")
etag=$(grep -i '^etag:' headers.txt | tr -d '\r' | sed 's/^[Ee][Tt][Aa][Gg]: *//')
echo "created $created etag=$etag"
again=$(curl -sS -o problem.json -w '%{http_code}' -X PUT -H "$auth" -H "$json" \
  -H 'If-None-Match: *' -d '{"value":0}' "$api/kv/results/$claimed")
echo "again $again $(field type <problem.json)"

acked=$(curl -sS -f -X POST -H "$auth" -H "$json" \
  -d "{\"token\":$token,\"result\":{\"answer\":$answer}}" \
  "$api/queues/work/jobs/$claimed/ack" | field acked)
echo "acked $acked"

for _ in $(seq 1 200); do
  grep -q "\"key\":\"results/$claimed\"" watch.out && break
  sleep 0.05
done
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
echo "watched $(grep '^data: ' watch.out | grep '"op":"set"' | field key) \
value=$(grep '^data: ' watch.out | grep '"op":"set"' | field value)"

result=$(curl -sS -f "$api/queues/work/jobs/$claimed/result?wait=5" -H "$auth")
echo "result $(printf '%s' "$result" | field status) \
$(printf '%s' "$result" | sed -n 's/.*"value":{"answer":\([0-9]*\)}.*/\1/p')"
value=$(curl -sS -f -H "$auth" "$api/kv/results/$claimed" | field value)
echo "read $value"
"""


@pytest.fixture(scope="module")
def curl_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    directory = tmp_path_factory.mktemp("serve-curl")
    with running_service(directory, f"sqlite:///{directory / 'fleetmem.db'}") as service:
        yield service


def test_shell_agent_with_curl(curl_service: ServiceProcess, tmp_path: Path) -> None:
    script = tmp_path / "agent.sh"
    script.write_text(SCRIPT, "utf-8")
    env = {
        **os.environ,
        "FLEETMEM_API": curl_service.base_url,
        "NS": unique("team-"),
        "AGENT_TOKEN": curl_service.tokens["write"],
        "ADMIN_TOKEN": curl_service.tokens["admin"],
    }
    done = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout
    assert done.returncode == 0, f"{output}\n{done.stderr}"
    job = re.search(r"^enqueued ([0-9a-f]{16})$", output, re.MULTILINE)
    assert job is not None, output
    job_id = job.group(1)
    assert output.splitlines() == [
        "registered shell-1",
        f"enqueued {job_id}",
        f"claimed {job_id} n=21",
        'created 201 etag="1"',
        "again 412 version-conflict",
        "acked true",
        f"watched results/{job_id} value=42",
        "result done 42",
        "read 42",
    ], f"{output}\n{done.stderr}"
