# fleetmem's HTTP service as an image: `docker build -t fleetmem .` from a source checkout.
# docker-compose-service.yml runs it next to PostgreSQL and Redis.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[service,postgres,redis]' && useradd --system fleetmem
USER fleetmem
EXPOSE 8080
# The tokens file is mounted at /run/fleetmem/tokens.toml (see docker-compose-service.yml).
ENTRYPOINT ["fleetmem", "serve", "--host", "0.0.0.0", "--port", "8080", \
            "--tokens", "/run/fleetmem/tokens.toml"]
