#!/usr/bin/env bash
# The container test (`make image-test`): builds docker/Dockerfile with buildah and runs the
# image's entrypoint the way `docker run -v NAME:/data` would, on a machine without a Docker
# engine or a registry. Root only (buildah, chroot isolation).
#
#   1. base image (../shared/tools/base-image.sh or BASE_IMAGE_SCRIPT; idempotent, cached)
#   2. buildah bud --layers (layers cached between runs; STACK_SOURCE=none: no release
#      tarballs can be downloaded here), then the image size against the 1.5 GB budget
#   3. run 1 on a fresh volume: /healthz, the printed API key, POST + GET /v1/spans, the
#      console's login page, /metrics (401 without, 200 with the generated token), then
#      SIGTERM -> stopped within 30 s, no SIGKILL in the log
#   4. run 2 on the same volume: the span is still there, no new credentials printed
#   5. run 3 with --user APP_UID on a fresh volume (as Docker creates it from the image's
#      /data: owned by APP_UID): healthz, a span in and out, clean stop
#
# Environment: IMAGE (tag, default localhost/llm-observe:image-test), BASE_IMAGE,
# STACK_SOURCE (none), EMBEDDING_RUNTIME (ctranslate2), IMAGE_TEST_KEEP=1 (keep the work folder),
# IMAGE_BUILD_ARGS (more `buildah bud` arguments, e.g. "--build-arg PIP_INDEX_URL=...").
# On this machine the CPU torch wheel and the local package indexes in /opt are mounted into
# the build and passed as TORCH_INDEX_URL / PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL when present.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

IMAGE=${IMAGE:-localhost/llm-observe:image-test}
BASE_IMAGE=${BASE_IMAGE:-localhost/python:3.11-slim-bookworm}
BASE_IMAGE_SCRIPT=${BASE_IMAGE_SCRIPT:-$REPO/../shared/tools/base-image.sh}
STACK_SOURCE=${STACK_SOURCE:-none}
EMBEDDING_RUNTIME=${EMBEDDING_RUNTIME:-ctranslate2}
APP_UID=10001
BUDGET_MB=1500
STOP_WITHIN=30

START=$(date +%s.%N)
say() { printf '[%7.1fs %s] %s\n' "$(echo "$(date +%s.%N) - $START" | bc)" "$(date -u +%H:%M:%S)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || { echo "image-test: run as root (buildah with chroot isolation)" >&2; exit 2; }
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }; }

WORK=$(mktemp -d /tmp/llmo-image-test.XXXXXX)
CONTAINERS=()
RUN_PID=""
cleanup() {
    set +e
    if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
        pid=$(main_pid)
        [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 200); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$RUN_PID" 2>/dev/null
    fi
    # Whatever outlived it (e.g. an embedded server of a failed run).
    app_pids | xargs -r kill -KILL 2>/dev/null
    for c in "${CONTAINERS[@]}"; do
        buildah rm "$c" >/dev/null 2>&1
    done
    if [ "${IMAGE_TEST_KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- 1. base image ----------------------------------------------------------------
say "base image $BASE_IMAGE"
if ! command -v buildah >/dev/null || ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    [ -x "$BASE_IMAGE_SCRIPT" ] || [ -f "$BASE_IMAGE_SCRIPT" ] || fail "no $BASE_IMAGE and no $BASE_IMAGE_SCRIPT to build it"
    bash "$BASE_IMAGE_SCRIPT" "$BASE_IMAGE"
fi
say "buildah $(buildah --version | awk '{print $3}'), base image ready"

# --- 2. build ---------------------------------------------------------------------
build=(buildah bud --isolation chroot --network host --layers --force-rm --pull=false --format docker
       -f docker/Dockerfile -t "$IMAGE"
       --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "STACK_SOURCE=$STACK_SOURCE"
       --build-arg "EMBEDDING_RUNTIME=$EMBEDDING_RUNTIME")
torch_wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$torch_wheel" ]; then
    build+=(-v /opt/wheels:/opt/wheels:ro --build-arg TORCH_INDEX_URL=/opt/wheels --build-arg PIP_FIND_LINKS=/opt/wheels)
fi
extra=""
for index in /opt/pypi /opt/pypi-more; do
    if [ -d "$index/simple" ]; then build+=(-v "$index:$index:ro"); extra="$extra file://$index/simple"; fi
done
[ -z "$extra" ] || build+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra# }")
# shellcheck disable=SC2206  # word splitting wanted
build+=(${IMAGE_BUILD_ARGS:-} .)
say "build: ${build[*]}"
# Each line of the build log with the seconds since the start of the build.
stamp() { local t0=$SECONDS line; while IFS= read -r line; do printf '%4ds %s\n' $((SECONDS - t0)) "$line"; done; }
if ! "${build[@]}" 2>&1 | stamp >"$WORK/build.log"; then
    tail -n 40 "$WORK/build.log"
    fail "build failed (log above)"
fi
grep -E "^ *[0-9]+s (model minilm|build context:)" "$WORK/build.log" | sed 's/^/    /' || true
cached=$(grep -c "Using cache" "$WORK/build.log" || true)
say "built $IMAGE ($cached steps from the layer cache)"
# buildah prints the image's size (the sum of its layers) in decimal units: "838 MB", "2.02 GB".
size=$(buildah images --noheading --format '{{.Size}}' "$IMAGE" | head -n 1)
mb=$(awk '{m = $1; if ($2 == "GB") m *= 1000; else if ($2 == "kB") m /= 1000; printf "%d", m}' <<<"$size")
say "image size: $size (budget ${BUDGET_MB} MB without the stack)"
[ "$STACK_SOURCE" != none ] || [ "$mb" -lt "$BUDGET_MB" ] || fail "the image is $size, over the budget"

ENTRYPOINT=$(buildah inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$IMAGE")
CMD=$(buildah inspect --type image --format '{{range .OCIv1.Config.Cmd}}{{.}} {{end}}' "$IMAGE")
[ -n "$ENTRYPOINT" ] || fail "the image has no ENTRYPOINT"

# --- running the image ----------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ROOT=""
# Processes of the running container: those whose root folder is the container's.
app_pids() {
    [ -n "$ROOT" ] && [ "$ROOT" != / ] || return 0
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && echo "${p#/proc/}"
    done
    return 0
}
# The container's main process (PID 1 under Docker): the first descendant of `buildah run` that
# lives in another root and is not buildah's own helper (buildah-chroot-exec).
main_pid() {
    local queue=("$RUN_PID") p child root cmd
    while [ "${#queue[@]}" -gt 0 ]; do
        p=${queue[0]}; queue=("${queue[@]:1}")
        root=$(readlink "/proc/$p/root" 2>/dev/null) || root=""
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") || cmd=""
        if [ "$p" != "$RUN_PID" ] && [ -n "$root" ] && [ "$root" != / ] && [ -n "$cmd" ] \
                && [ "${cmd#buildah}" = "$cmd" ]; then
            echo "$p"; return 0
        fi
        for child in $(cat /proc/"$p"/task/*/children 2>/dev/null); do queue+=("$child"); done
    done
}

# start NAME VOLUME [buildah run options...]: the entrypoint in the background, output to WORK/NAME.log
start() {
    local name=$1 volume=$2; shift 2
    local ctr
    ctr=$(buildah from --pull=false --name "llmo-image-test-$name-$$" "$IMAGE")
    CONTAINERS+=("$ctr")
    PORT=$(free_port)
    # `-v` does not replace a VOLUME of the image's config in buildah run (it writes to the
    # container's own copy): drop it from this container so /data is the folder given.
    # Fewer processes than the defaults (2 x cores web workers, 2 Celery): a shared 2-core CI machine.
    buildah config --env "PORT=$PORT" --env WEB_WORKERS=2 --env WORKER_CONCURRENCY=1 --volume /data- "$ctr"
    LOG="$WORK/$name.log"
    # shellcheck disable=SC2086  # ENTRYPOINT and CMD are word lists
    buildah run --isolation chroot --network host -v "$volume:/data" "$@" "$ctr" -- $ENTRYPOINT $CMD \
        >"$LOG" 2>&1 &
    RUN_PID=$!
    BASE="http://127.0.0.1:$PORT"
    local pid deadline=$(( $(date +%s) + 30 ))
    until pid=$(main_pid) && [ -n "$pid" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { cat "$LOG"; fail "$name: the container's process did not start"; }
        sleep 0.2
    done
    ROOT=$(readlink "/proc/$pid/root") || fail "$name: process $pid went away"
    say "$name: started (port $PORT, volume $volume${*:+, $*})"
}

wait_healthy() {
    local deadline=$(( $(date +%s) + ${1:-300} ))
    until curl -fsS -o /dev/null --max-time 3 "$BASE/healthz" 2>/dev/null; do
        if ! kill -0 "$RUN_PID" 2>/dev/null; then tail -n 40 "$LOG"; fail "$name exited before /healthz answered"; fi
        [ "$(date +%s)" -lt "$deadline" ] || { tail -n 40 "$LOG"; fail "/healthz not ready in time"; }
        sleep 1
    done
    say "$name: /healthz 200"
}

http_code() { curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 "$@"; }

post_span() {
    local service=$1 code
    code=$(http_code -X POST "$BASE/v1/spans" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
        -d "[{\"model\": \"gpt-4o\", \"provider\": \"openai\", \"service_name\": \"$service\",
              \"prompt_tokens\": 812, \"completion_tokens\": 164, \"latency_ms_total\": 1834,
              \"prompt\": \"Summarise the invoices\", \"response\": \"Here is a summary\"}]")
    [ "$code" = 202 ] || fail "POST /v1/spans: $code $(head -c 300 "$WORK/body")"
    say "$name: POST /v1/spans 202 $(head -c 120 "$WORK/body")"
}

read_span() {
    local service=$1 deadline=$(( $(date +%s) + 60 )) code
    while :; do
        code=$(http_code -H "Authorization: Bearer $KEY" "$BASE/v1/spans?service=$service&limit=10")
        [ "$code" = 200 ] || fail "GET /v1/spans: $code $(head -c 300 "$WORK/body")"
        if python3 -c 'import json, sys; items = json.load(open(sys.argv[1]))["items"]; \
                sys.exit(0 if any(i.get("service_name") == sys.argv[2] for i in items) else 1)' \
                "$WORK/body" "$service"; then
            break
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "span of $service not readable within 60 s: $(head -c 300 "$WORK/body")"
        sleep 0.5
    done
    say "$name: GET /v1/spans?service=$service 200, the span is there"
}

stop() {
    local pid began waited
    pid=$(main_pid)
    [ -n "$pid" ] || fail "$name: no process of the container found"
    say "$name: SIGTERM to the container's main process ($pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-60))"
    began=$(date +%s.%N)
    kill -TERM "$pid"
    while kill -0 "$RUN_PID" 2>/dev/null; do
        waited=$(echo "$(date +%s.%N) - $began" | bc)
        if [ "$(echo "$waited > $STOP_WITHIN + 30" | bc)" = 1 ]; then fail "$name: still running ${waited}s after SIGTERM"; fi
        sleep 0.2
    done
    local status=0
    wait "$RUN_PID" || status=$?
    RUN_PID=""
    waited=$(echo "$(date +%s.%N) - $began" | bc)
    [ -z "$(app_pids)" ] || fail "$name: processes left after the stop: $(app_pids | tr '\n' ' ')"
    if grep -n "SIGKILL" "$LOG"; then fail "$name: SIGKILL in the log"; fi
    [ "$(echo "$waited <= $STOP_WITHIN" | bc)" = 1 ] || fail "$name: stop took ${waited}s (> ${STOP_WITHIN}s)"
    [ "$status" = 0 ] || { tail -n 20 "$LOG"; fail "$name: exit status $status after SIGTERM"; }
    say "$name: SIGTERM -> stopped in $(printf '%.1f' "$waited") s, exit 0, no SIGKILL, no process left"
    ROOT=""
}

# --- 3. first run on a fresh volume -------------------------------------------------------
VOL1=$WORK/volume-1
# A new named volume starts as a copy of the image's /data: owned by the app account.
install -d -o "$APP_UID" -g "$APP_UID" -m 0755 "$VOL1"
name=run-1
start "$name" "$VOL1"
wait_healthy 300
KEY=$(grep -oE 'API key \([^)]*\) *: *\S+' "$LOG" | awk '{print $NF}' | tail -n 1)
[ -n "$KEY" ] || { cat "$LOG"; fail "no API key printed on first start"; }
grep -q "console / admin login" "$LOG" || fail "no admin password printed on first start"
say "$name: credentials printed once (API key ${KEY:0:9}..., admin password)"
if grep -q "converting the embedding model" "$LOG"; then fail "the model was converted at run time"; fi
post_span image-test-1
read_span image-test-1
code=$(http_code "$BASE/login/")
[ "$code" = 200 ] && grep -qi "password" "$WORK/body" || fail "console login page: $code"
say "$name: console GET /login/ 200 (a password form)"
code=$(http_code "$BASE/metrics")
[ "$code" = 401 ] || [ "$code" = 403 ] || fail "/metrics without a token: $code (expected 401/403)"
TOKEN=$(cat "$VOL1/secrets/metrics_token")
code=$(http_code -H "Authorization: Bearer $TOKEN" "$BASE/metrics")
[ "$code" = 200 ] && grep -q '^llm_' "$WORK/body" || fail "/metrics with the token: $code"
say "$name: /metrics $(grep -c '^llm_' "$WORK/body") llm_ samples with the token from /data/secrets, refused without"
stop

# --- 4. second run on the same volume -------------------------------------------------------
name=run-2
start "$name" "$VOL1"
wait_healthy 180
if grep -E "API key \(|console / admin login|shown ONCE" "$LOG"; then fail "$name: new credentials printed"; fi
say "$name: no new credentials printed"
read_span image-test-1
post_span image-test-2
read_span image-test-2
stop

# --- 5. --user APP_UID on a fresh volume ------------------------------------------------
VOL2=$WORK/volume-2
install -d -o "$APP_UID" -g "$APP_UID" -m 0755 "$VOL2"
name=run-3-user
start "$name" "$VOL2" --user "$APP_UID:$APP_UID"
wait_healthy 300
KEY=$(grep -oE 'API key \([^)]*\) *: *\S+' "$LOG" | awk '{print $NF}' | tail -n 1)
[ -n "$KEY" ] || { cat "$LOG"; fail "no API key printed"; }
owners=$(find "$VOL2" -maxdepth 2 ! -user "$APP_UID" -printf '%u %p\n' | head -n 5)
[ -z "$owners" ] || fail "$name: files not owned by $APP_UID: $owners"
uids=$(for p in $(app_pids); do awk '/^Uid:/ {print $2}' "/proc/$p/status" 2>/dev/null; done | sort -u | tr '\n' ' ')
[ "$uids" = "$APP_UID " ] || fail "$name: processes run as uid(s) $uids, not $APP_UID"
say "$name: all $(app_pids | wc -l) processes run as uid $APP_UID, everything in the volume owned by it"
post_span image-test-3
read_span image-test-3
stop

say "PASS: image $IMAGE, $size; build + 3 runs in $(printf '%.0f' "$(echo "$(date +%s.%N) - $START" | bc)") s"
