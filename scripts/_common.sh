# Shared by the scripts in this folder: find or install uv, start the local
# PostgreSQL, RabbitMQ and Redis when they do not answer. Sourced, not executed.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

ensure_uv() {
    if ! command -v uv >/dev/null 2>&1; then
        python3 -m pip install --quiet --disable-pip-version-check uv
    fi
    export UV_LINK_MODE=copy
}

pg_answers() { pg_isready -q -h 127.0.0.1 -p 5432; }
rabbit_answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
redis_answers() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }

wait_for() { # wait_for NAME CHECK SECONDS
    local name=$1 check=$2 deadline=$((SECONDS + $3))
    until $check; do
        if ((SECONDS > deadline)); then
            echo "$name did not come up" >&2
            return 1
        fi
        sleep 1
    done
}

ensure_services() {
    if ! pg_answers; then
        echo "starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
        wait_for PostgreSQL pg_answers 60 || return 1
    fi
    if ! rabbit_answers; then
        echo "starting RabbitMQ" >&2
        rabbitmq-server -detached
        wait_for RabbitMQ rabbit_answers 120 || return 1
    fi
    if ! redis_answers; then
        # Only the API's rate limit counters live there; nothing to persist.
        echo "starting Redis" >&2
        redis-server --daemonize yes --save "" --appendonly no
        wait_for Redis redis_answers 30 || return 1
    fi
}
