# One image for the three processes of the outbox task service. It has no
# default process: compose.yaml (or `docker run IMAGE python -m ...`) names the
# one each container runs:
#
#   python -m service migrate   create the database if missing, apply migrations
#   python -m service           the HTTP API on API_HOST:API_PORT
#   python -m outbox_relay      outbox -> RabbitMQ relay
#   python -m consumer          task consumer
#
# Build: docker build -t outbox-tasks .   (or `docker compose build`)
# Apart from the python base image, the build fetches only from PyPI.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: resolve the locked dependencies into /app/.venv -----------------
FROM ${PYTHON_IMAGE} AS build

# uv itself comes from PyPI; keep in step with the uv that writes uv.lock.
ARG UV_VERSION=0.13.9
RUN PIP_ROOT_USER_ACTION=ignore \
    pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

# Use the image's interpreter (never download one), copy files rather than
# hard-link them out of a cache that is not kept, and compile bytecode now:
# the runtime user cannot write __pycache__ into the read-only tree.
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1

WORKDIR /app
# Only the lock and the project metadata: this layer is rebuilt when the
# dependencies change, not when the code does. The project is virtual
# ([tool.uv] package = false), so nothing of it is installed; --no-dev leaves
# out pytest, honcho, mypy and the rest of the dev group.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev

# --- runtime: the interpreter, the venv and the code, as a non-root user ----
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="outbox-tasks" \
      org.opencontainers.image.description="Task service over a transactional outbox on PostgreSQL and RabbitMQ: API, outbox relay and consumer"

# A fixed numeric id, so runAsNonRoot-style checks can verify it without
# looking the name up. No home directory and no login shell.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app

WORKDIR /app

# Same path as in the build stage: the venv's scripts and its python symlink
# point at /app/.venv and /usr/local/bin/python3.11, both valid here.
COPY --from=build /app/.venv /app/.venv
COPY alembic.ini ./
COPY migrations/ ./migrations/
COPY outbox_relay/ ./outbox_relay/
COPY service/ ./service/
COPY consumer/ ./consumer/

# Files stay owned by root and read-only to the app user; compile the
# project's own modules too so nothing needs writing at start-up.
RUN python -m compileall -q migrations outbox_relay service consumer

# The working directory is the repository root, so `python -m service` finds
# the packages and service.migrate finds alembic.ini beside them.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    VIRTUAL_ENV=/app/.venv \
    API_HOST=0.0.0.0 \
    API_PORT=8000 \
    RELAY_HEALTH_HOST=0.0.0.0 \
    RELAY_HEALTH_PORT=8081 \
    CONSUMER_HEALTH_HOST=0.0.0.0 \
    CONSUMER_HEALTH_PORT=8082 \
    LOG_JSON=true

USER 10001:10001

# API, relay health, consumer health.
EXPOSE 8000 8081 8082

# The processes drain in-flight work on SIGTERM and exit 0.
STOPSIGNAL SIGTERM

# Deliberately no process by default: this prints the API's commands and
# exits. Run the image with the command of the process you want.
CMD ["python", "-m", "service", "--help"]
