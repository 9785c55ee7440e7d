#!/bin/sh
# shellcheck disable=SC2317  # stop_stack/signal_stack/forward_stop run from traps
# Entrypoint of the all-in-one image.
#
# Starts Tempo, Prometheus and Grafana in the background (each only when its
# binary is in the image and WITH_OBSERVABILITY_STACK is not 0), then runs
# `python manage.py "$@"` (default: serve, which migrates, bootstraps the admin
# user and an API key, and supervises web + Celery + consumer).
#
# With no background service to look after, the app is exec'd and receives
# signals directly. Otherwise this shell stays PID 1: it forwards SIGTERM/SIGINT
# to the app, waits for it, then stops the background services, so `docker stop`
# shuts everything down cleanly instead of SIGKILLing them with the container.
set -eu

DATA_DIR="${DATA_DIR:-/data}"
PORT="${PORT:-8000}"
PROMETHEUS_HOME="${PROMETHEUS_HOME:-/opt/prometheus}"
TEMPO_HOME="${TEMPO_HOME:-/opt/tempo}"
GRAFANA_HOME="${GRAFANA_HOME:-/opt/grafana}"
STACK_USER="${STACK_USER:-observability}"
export DATA_DIR PORT

APP_DIR="${APP_DIR:-/app}"
cd "$APP_DIR"

log() { printf '%s entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# Every argument goes to manage.py; for a shell use `docker run --entrypoint sh ...`.
[ "$#" -gt 0 ] || set -- serve

# A fresh named volume starts as the image's /data (owned by the app account, APP_UID), so both
# root and `--user APP_UID` can write it; a bind-mounted host folder must be writable by the user.
if ! mkdir -p "$DATA_DIR/secrets" 2>/dev/null || [ ! -w "$DATA_DIR" ] || [ ! -w "$DATA_DIR/secrets" ]; then
    log "$DATA_DIR is not writable by uid $(id -u) (owner: $(stat -c %u:%g "$DATA_DIR" 2>/dev/null || echo '?')):" \
        "use a named volume, or chown the mounted folder to the user the container runs as" \
        "(the image's app account is $(id -u app 2>/dev/null || echo 10001))"
    exit 1
fi
chmod 0700 "$DATA_DIR/secrets"

STACK_PIDS=""
MISSING=""

stack_enabled() {
    case "${WITH_OBSERVABILITY_STACK:-1}" in
        0|false|False|FALSE|no|off) return 1 ;;
    esac
    # Only commands that serve long enough to be observed get the stack.
    [ "$1" = serve ]
}

# Run as the unprivileged stack account when we are root; as ourselves otherwise
# (e.g. `docker run --user ...`).
as_stack_user() {
    if [ "$(id -u)" = 0 ] && id "$STACK_USER" >/dev/null 2>&1; then
        exec_prefix="setpriv --reuid=$STACK_USER --regid=$STACK_USER --init-groups --"
    else
        exec_prefix=""
    fi
    # shellcheck disable=SC2086
    $exec_prefix "$@" &
    STACK_PIDS="$STACK_PIDS $!"
}

as_stack_user_sync() {
    if [ "$(id -u)" = 0 ] && id "$STACK_USER" >/dev/null 2>&1; then
        setpriv --reuid="$STACK_USER" --regid="$STACK_USER" --init-groups -- "$@"
    else
        "$@"
    fi
}

prepare_dir() {
    mkdir -p "$1"
    if [ "$(id -u)" = 0 ] && id "$STACK_USER" >/dev/null 2>&1; then
        owner="$(id -u "$STACK_USER")"
        if [ "$(stat -c %u "$1")" != "$owner" ]; then
            chown -R "$STACK_USER:$STACK_USER" "$1"
        fi
    fi
}

start_tempo() {
    [ -x "$TEMPO_HOME/tempo" ] || { MISSING="$MISSING Tempo"; return 0; }
    prepare_dir "$DATA_DIR/tempo"
    log "starting Tempo (OTLP gRPC :4317, OTLP/HTTP :4318, query :3200)"
    # -config.expand-env: tempo.yaml places its storage under ${DATA_DIR}/tempo.
    as_stack_user "$TEMPO_HOME/tempo" -config.file=/etc/tempo/tempo.yaml -config.expand-env=true \
        -log.level="${TEMPO_LOG_LEVEL:-warn}"
}

start_prometheus() {
    [ -x "$PROMETHEUS_HOME/prometheus" ] || { MISSING="$MISSING Prometheus"; return 0; }
    prepare_dir "$DATA_DIR/prometheus"
    # The app's /metrics needs a bearer token once it listens beyond loopback (BIND_HOST=0.0.0.0 here):
    # METRICS_AUTH_TOKEN, or the one the app generates into $DATA_DIR/secrets (made here first, the
    # same way, so Prometheus has it from its first scrape). Prometheus reads its own copy.
    token_file="$DATA_DIR/secrets/metrics_token"
    if [ -z "${METRICS_AUTH_TOKEN:-}" ] && [ -z "${METRICS_AUTH_TOKEN_FILE:-}" ] && [ ! -s "$token_file" ]; then
        (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(50), end="")' >"$token_file.tmp" \
            && mv "$token_file.tmp" "$token_file")
    fi
    scrape_token="$DATA_DIR/prometheus/metrics_token"
    (umask 077 && if [ -n "${METRICS_AUTH_TOKEN:-}" ]; then printf '%s' "$METRICS_AUTH_TOKEN"
                  else cat "${METRICS_AUTH_TOKEN_FILE:-$token_file}"; fi >"$scrape_token")
    chown "$(stat -c %u:%g "$DATA_DIR/prometheus")" "$scrape_token"
    # The shipped config scrapes 127.0.0.1:8000 with credentials_file: metrics_token (relative to
    # the config's folder, where the token was just written): follow PORT.
    config="$DATA_DIR/prometheus/prometheus.yml"
    sed -e "s/127\.0\.0\.1:8000/127.0.0.1:$PORT/g" /etc/prometheus/prometheus.yml >"$config"
    chmod 0644 "$config"
    log "starting Prometheus (:9090, retention ${PROMETHEUS_RETENTION:-15d})"
    as_stack_user "$PROMETHEUS_HOME/prometheus" \
        --config.file="$config" \
        --storage.tsdb.path="$DATA_DIR/prometheus/data" \
        --storage.tsdb.retention.time="${PROMETHEUS_RETENTION:-15d}" \
        --web.listen-address=0.0.0.0:9090 \
        --log.level="${PROMETHEUS_LOG_LEVEL:-warn}"
}

start_grafana() {
    [ -x "$GRAFANA_HOME/bin/grafana" ] || { MISSING="$MISSING Grafana"; return 0; }
    prepare_dir "$DATA_DIR/grafana"
    password_file="$DATA_DIR/secrets/grafana_admin_password"
    if [ ! -s "$password_file" ]; then
        password="$(python -c 'import secrets; print(secrets.token_urlsafe(18))')"
        (umask 077 && printf '%s\n' "$password" >"$password_file.tmp" && mv "$password_file.tmp" "$password_file")
        if [ -f "$DATA_DIR/grafana/grafana.db" ]; then
            # Grafana only reads the admin password when it creates its database;
            # a lost secret file therefore needs an explicit reset.
            as_stack_user_sync "$GRAFANA_HOME/bin/grafana" cli --homepath "$GRAFANA_HOME" \
                admin reset-admin-password "$password" >/dev/null
        fi
        cat >&2 <<EOF

================================================================
 Grafana (port 3000) admin credentials, shown only this once:
   user:     admin
   password: $password
 Stored in $password_file (mode 0600).
================================================================

EOF
    fi
    chmod 0600 "$password_file"
    log "starting Grafana (:3000)"
    # Exported for the Grafana process only: unset again once it is forked.
    GF_SECURITY_ADMIN_USER="admin"
    GF_SECURITY_ADMIN_PASSWORD="$(cat "$password_file")"
    export GF_SECURITY_ADMIN_USER GF_SECURITY_ADMIN_PASSWORD
    as_stack_user "$GRAFANA_HOME/bin/grafana" server --homepath "$GRAFANA_HOME"
    unset GF_SECURITY_ADMIN_USER GF_SECURITY_ADMIN_PASSWORD
}

# Grafana settings that do not depend on the run (the password is set per process).
GF_PATHS_DATA="$DATA_DIR/grafana"
GF_PATHS_LOGS="$DATA_DIR/grafana/logs"
GF_PATHS_PLUGINS="$DATA_DIR/grafana/plugins"
GF_PATHS_PROVISIONING=/etc/grafana/provisioning
GF_SERVER_HTTP_PORT=3000
GF_LOG_MODE=console
GF_LOG_LEVEL="${GF_LOG_LEVEL:-warn}"
GF_USERS_ALLOW_SIGN_UP=false
GF_AUTH_ANONYMOUS_ENABLED=false
GF_SECURITY_DISABLE_GRAVATAR=true
GF_ANALYTICS_REPORTING_ENABLED=false
GF_ANALYTICS_CHECK_FOR_UPDATES=false
GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES=false
GF_NEWS_NEWS_FEED_ENABLED=false
export GF_PATHS_DATA GF_PATHS_LOGS GF_PATHS_PLUGINS GF_PATHS_PROVISIONING GF_SERVER_HTTP_PORT \
    GF_LOG_MODE GF_LOG_LEVEL GF_USERS_ALLOW_SIGN_UP GF_AUTH_ANONYMOUS_ENABLED \
    GF_SECURITY_DISABLE_GRAVATAR GF_ANALYTICS_REPORTING_ENABLED GF_ANALYTICS_CHECK_FOR_UPDATES \
    GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES GF_NEWS_NEWS_FEED_ENABLED

signal_stack() {
    for pid in $STACK_PIDS; do kill -TERM "$pid" 2>/dev/null || true; done
}

stop_stack() {
    [ -n "$STACK_PIDS" ] || return 0
    log "stopping the observability stack"
    signal_stack
    waited=0
    for pid in $STACK_PIDS; do
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 20 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STACK_PIDS=""
}

if stack_enabled "$1"; then
    # PID 1 ignores signals it has no handler for: honour `docker stop` even
    # while the stack is still starting.
    trap 'exit 143' TERM
    trap 'exit 130' INT
    trap 'stop_stack' EXIT
    start_tempo
    start_prometheus
    start_grafana
    if [ -n "$MISSING" ]; then
        log "not in this image (built with STACK_SOURCE=none?):$MISSING; the app runs without them" \
            "(its own /metrics, console and trace views still work; point Grafana/Prometheus/Tempo elsewhere if needed)"
    fi
elif [ "$1" = serve ]; then
    log "observability stack off (WITH_OBSERVABILITY_STACK=${WITH_OBSERVABILITY_STACK:-1}); running the app alone"
fi

if [ -z "$STACK_PIDS" ]; then
    trap - EXIT TERM INT
    exec python manage.py "$@"
fi

python manage.py "$@" &
APP_PID=$!
# A background job of a non-interactive shell starts with SIGINT ignored, so
# Ctrl-C (SIGINT) is passed on as SIGTERM. The stack stops alongside the app,
# keeping the whole shutdown within one grace period.
forward_stop() {
    kill -TERM "$APP_PID" 2>/dev/null || true
    signal_stack
}
trap forward_stop TERM INT

# `wait` returns early (status > 128) when a trapped signal arrives; keep
# waiting until the app itself has exited (a zombie still answers kill -0).
status=0
while :; do
    status=0
    wait "$APP_PID" || status=$?
    kill -0 "$APP_PID" 2>/dev/null || break
done
log "app exited with status $status"
exit "$status"
