"""Durable work queues: the jobs table and the indexes that serve each of its statements.

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-12

Next to the entries table ``T`` (same schema): ``T_jobs``, one row per job in every state, with
``id`` a bigint identity (the job id is its 16 hex digits: ids never go back and are never
reused, even after a delete or a crash). ``state`` and ``due_at`` say where a job is:

=========  ==========================  =====================================================
state      due_at                      meaning
=========  ==========================  =====================================================
waiting    ``ready_at``                ready once ``due_at <= now()``, delayed before
claimed    ``lease_expires_at``        live lease while ``due_at > now()``; then ready again,
                                       or dead if ``attempts >= max_attempts``
done       when its result expires     result held while ``due_at > now()``; then deletable
dead       ``finished_at``             dead letter
=========  ==========================  =====================================================

So a waiting job and a claimed job whose lease expired share one index order (``due_at`` is
the effective ``ready_at`` of both), and every index is partial: each row sits only in the
indexes of its state, so an update that moves a job costs the insertions of its new state alone.

* ``T_jobs_claim_idx (namespace, queue, priority DESC, due_at, id) WHERE state IN ('waiting',
  'claimed')``: the claim order; done and dead jobs are never in it.
* ``T_jobs_dedupe_idx``, unique, ``(namespace, queue, dedupe_key)`` of waiting and claimed jobs:
  one live job per dedupe key; done and dead jobs free it.
* ``T_jobs_last_attempt_idx (namespace, queue, due_at) WHERE state = 'claimed' AND attempts >=
  max_attempts``: claims on their last attempt, so the ones whose lease expired (dead from then
  on) are found without reading the queue.
* ``T_jobs_done_idx (namespace, queue, due_at) WHERE state = 'done'``: held results, and the
  expired ones to delete.
* ``T_jobs_dead_idx (namespace, queue, id) WHERE state = 'dead'``: the dead letter in id order.

And ``T_jobs_awaited (id)``: the jobs a ``result(wait=...)`` waits for, whose ``ack`` or death
by ``nack`` is to be ``NOTIFY``-ed. A row of its own, not a column of the job's row: marking a
job must not lock its row, or a concurrent claim's ``FOR NO KEY UPDATE SKIP LOCKED`` would pass
the job over. Its foreign key (``ON DELETE CASCADE``) takes only a ``KEY SHARE`` lock of the job
row while a mark is inserted, which claims, acks and nacks (no-key updates) do not conflict
with, and it deletes a job's mark with the job, whichever statement deletes it (``cancel``,
``purge_dead``, the deletion of expired results by an ``ack`` or the sweeper): marks never
outlive their job.

Both tables are logged like every other: a committed ``put`` survives a crash of the server.
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import queue_table, quote_ident

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_LIVE = "state IN ('waiting', 'claimed')"


def _names() -> tuple[str, str]:
    attrs = context.config.attributes
    return quote_ident(attrs["fleetmem_schema"]), queue_table(attrs["fleetmem_table"])


def _derived(name: str) -> str:
    """``name`` -- the validated table name and a fixed suffix of ``[a-z_]`` -- double-quoted.

    Not ``quote_ident``, which caps a name at 40 characters: ``<table>_jobs_last_attempt_idx``
    passes that for a table name of more than 18. PostgreSQL's own limit, 63 bytes, holds for
    every valid table name (at most 40 characters, plus at most 22 here)."""
    if len(name) > 63:  # pragma: no cover - table names are at most 40 characters
        raise ValueError(f"{name!r} is longer than PostgreSQL's 63 bytes")
    return f'"{name}"'


def upgrade() -> None:
    schema, jobs = _names()
    table = f"{schema}.{_derived(jobs)}"
    awaited = jobs + "_awaited"
    op.execute(
        f"""
        CREATE TABLE {table} (
            id                bigint      GENERATED ALWAYS AS IDENTITY,
            namespace         text        COLLATE "C" NOT NULL,
            queue             text        COLLATE "C" NOT NULL,
            state             text        NOT NULL,
            priority          integer     NOT NULL,
            due_at            timestamptz NOT NULL,
            attempts          integer     NOT NULL DEFAULT 0,
            max_attempts      integer     NOT NULL,
            token             bigint      NOT NULL DEFAULT 0,
            enqueued_at       timestamptz NOT NULL,
            ready_at          timestamptz NOT NULL,
            claimed_at        timestamptz,
            lease_expires_at  timestamptz,
            finished_at       timestamptz,
            consumer          text,
            dedupe_key        text        COLLATE "C",
            last_error        text,
            payload           jsonb       NOT NULL,
            result            jsonb,
            CONSTRAINT {_derived(jobs + "_pkey")} PRIMARY KEY (id),
            CONSTRAINT {_derived(jobs + "_state_check")}
                CHECK (state IN ('waiting', 'claimed', 'done', 'dead'))
        )
        """
    )
    op.execute(
        f"CREATE INDEX {_derived(jobs + '_claim_idx')} ON {table} "
        f"(namespace, queue, priority DESC, due_at, id) WHERE {_LIVE}"
    )
    op.execute(
        f"CREATE UNIQUE INDEX {_derived(jobs + '_dedupe_idx')} ON {table} "
        f"(namespace, queue, dedupe_key) WHERE dedupe_key IS NOT NULL AND {_LIVE}"
    )
    op.execute(
        f"CREATE INDEX {_derived(jobs + '_last_attempt_idx')} ON {table} "
        "(namespace, queue, due_at) WHERE state = 'claimed' AND attempts >= max_attempts"
    )
    op.execute(
        f"CREATE INDEX {_derived(jobs + '_done_idx')} ON {table} "
        "(namespace, queue, due_at) WHERE state = 'done'"
    )
    op.execute(
        f"CREATE INDEX {_derived(jobs + '_dead_idx')} ON {table} "
        "(namespace, queue, id) WHERE state = 'dead'"
    )
    op.execute(
        f"""
        CREATE TABLE {schema}.{_derived(awaited)} (
            id  bigint  NOT NULL,
            CONSTRAINT {_derived(awaited + "_pkey")} PRIMARY KEY (id),
            CONSTRAINT {_derived(awaited + "_id_fkey")}
                FOREIGN KEY (id) REFERENCES {table} (id) ON DELETE CASCADE
        )
        """
    )


def downgrade() -> None:
    schema, jobs = _names()
    op.execute(f"DROP TABLE {schema}.{_derived(jobs + '_awaited')}")
    op.execute(f"DROP TABLE {schema}.{_derived(jobs)}")
