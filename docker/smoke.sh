#!/usr/bin/env bash
# Smoke run of the real images: build all three, start the cluster profile's PostgreSQL until it is healthy, then
# run the compose `demo` profile end to end on the CPU (embedded corpus -> torchrun training -> artifact -> the
# service evaluates it over HTTP -> `verifier check`).
#
# Made for a machine that reaches package registries but no image registry: the base image is a Debian
# bookworm root made with debootstrap (Python 3.11, plus torch==2.13.0 from a local CPU wheel, standing in for
# the PyTorch image), imported once and then reused. Containers use the host's network.
#
# Outcome, on the last lines:
#   SMOKE PASSED                  the whole demo ran and the verifier accepted the result;
#   SMOKE FAILED: <reason>        (exit 1) the engine ran, and building or running the project failed;
#   SMOKE SKIPPED: <reason>       (exit 0) no Docker engine could be had here; nothing was tested.
#
# Environment: PGOLF_TORCH_WHEEL (the CPU torch wheel; default: /opt/wheels/torch-<pin>+cpu-cp311-*.whl),
# PGOLF_SMOKE_TIMEOUT (seconds for the demo run, default 1800), PGOLF_SMOKE_KEEP_IMAGES=0 (remove the project
# images at the end; the base image is always kept as the cache).
set -Eeuo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

PROJECT=pgolf-smoke
TRAIN_IMAGE=pgolf-train:smoke
SERVICE_IMAGE=pgolf-service:smoke
POSTGRES_IMAGE=pgolf-postgres:smoke
DEMO_TIMEOUT=${PGOLF_SMOKE_TIMEOUT:-1800}
WORK=$(mktemp -d /var/tmp/pgolf-smoke.XXXXXX)
STARTED_DOCKERD_PID=""
COMPOSE=()
TIMINGS=()

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

banner() {
    printf '\n==============================================================\n'
    printf '%s\n' "$@"
    printf '==============================================================\n'
}

print_timings() {
    ((${#TIMINGS[@]})) || return 0
    printf '\nsmoke timings (seconds):\n'
    printf '  %s\n' "${TIMINGS[@]}"
}

skip() {
    print_timings
    banner "SMOKE SKIPPED: $*" "(no Docker engine here: the images were NOT built or run; this is not a pass)"
    exit 0
}

fail() {
    print_timings
    banner "SMOKE FAILED: $*"
    exit 1
}

# `timed NAME LOGFILE CMD...`: runs CMD with its output in LOGFILE and records how long it took. Returns CMD's
# status; the caller decides what a failure means.
timed() {
    local name=$1 logfile=$2 start status=0
    shift 2
    start=$(date +%s)
    log "$name ..."
    "$@" >"$logfile" 2>&1 || status=$?
    TIMINGS+=("$(printf '%-28s %5d' "$name" $(($(date +%s) - start)))$([[ $status == 0 ]] || echo "  (failed)")")
    return "$status"
}

show_log() {
    printf -- '--- last lines of %s ---\n' "$1"
    tail -n "${2:-60}" "$1" || true
    printf -- '--- end of %s ---\n' "$1"
}

cleanup() {
    local status=$?
    if ((${#COMPOSE[@]})); then
        "${COMPOSE[@]}" --profile demo down --volumes --remove-orphans >"$WORK/down.log" 2>&1 || show_log "$WORK/down.log" 20
        docker rm -f pgolf-smoke-postgres >/dev/null 2>&1 || true  # run_postgres was interrupted
        if [[ ${PGOLF_SMOKE_KEEP_IMAGES:-1} == 0 ]]; then
            docker image rm "$TRAIN_IMAGE" "$SERVICE_IMAGE" "$POSTGRES_IMAGE" >/dev/null 2>&1 || true
        fi
        docker image prune --force >/dev/null 2>&1 || true  # the previous smoke builds' dangling layers
    fi
    if [[ -n $STARTED_DOCKERD_PID ]]; then
        kill "$STARTED_DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

# --- 1. A Docker engine: the one already running, or one started here -------------------------------------------

engine_up() { docker info >/dev/null 2>&1; }

install_engine_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    timed "install ${missing[*]}" "$WORK/apt.log" sh -c 'apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"' apt "${missing[@]}" \
        || { show_log "$WORK/apt.log" 20; skip "could not install ${missing[*]}"; }
}

# No bridge networks (the machine forbids private address ranges) and no iptables; overlay2 when the kernel
# lets dockerd mount overlays, else vfs (slow: every layer is a full copy).
start_dockerd() {
    local driver
    for driver in overlay2 vfs; do
        dockerd --storage-driver="$driver" --bridge=none --iptables=false --ip-masq=false \
            >"$WORK/dockerd-$driver.log" 2>&1 &
        STARTED_DOCKERD_PID=$!
        for _ in $(seq 1 60); do
            engine_up && { log "dockerd started (storage driver $driver, pid $STARTED_DOCKERD_PID)"; return 0; }
            kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        show_log "$WORK/dockerd-$driver.log" 15
        kill "$STARTED_DOCKERD_PID" 2>/dev/null || true
        wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
        STARTED_DOCKERD_PID=""
    done
    return 1
}

ensure_engine() {
    if engine_up; then
        log "using the running Docker engine"
    else
        [[ $(id -u) == 0 ]] || skip "no running Docker engine, and starting one needs root"
        install_engine_packages
        command -v dockerd >/dev/null || skip "no dockerd binary"
        local start
        start=$(date +%s)
        start_dockerd || skip "dockerd did not start with overlay2 or vfs (logs above)"
        TIMINGS+=("$(printf '%-28s %5d' "start dockerd" $(($(date +%s) - start)))")
    fi
    command -v debootstrap >/dev/null || install_engine_packages
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null; then
        COMPOSE=(docker-compose)
    else
        skip "no docker compose (plugin or docker-compose)"
    fi
    COMPOSE+=(--project-name "$PROJECT" --file "$REPO_ROOT/compose.yaml")
}

# --- 2. The local base image: Debian bookworm + Python 3.11 + torch (CPU), cached by its tag --------------------

TORCH_VERSION=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
BASE_IMAGE=pgolf-smoke-base:bookworm-torch${TORCH_VERSION}-cpu

build_base_rootfs() {
    local root=$1 wheel=$2
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian
    # The host's CA bundle: it is the one that lets this machine's pip reach the package index.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    cp "$wheel" "$root/tmp/"
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        python3 -m pip install --no-cache-dir --break-system-packages --disable-pip-version-check \
        --no-warn-script-location "/tmp/$(basename "$wheel")"
    rm -rf "$root/tmp/"*.whl "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
}

ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: cached"
        return 0
    fi
    [[ $(id -u) == 0 ]] || skip "the base image is not built yet, and debootstrap needs root"
    local wheel=${PGOLF_TORCH_WHEEL:-}
    if [[ -z $wheel ]]; then
        wheel=$(compgen -G "/opt/wheels/torch-${TORCH_VERSION}+cpu-cp311-cp311-*x86_64.whl" | head -n 1 || true)
    fi
    # PyPI's torch is the multi-GB CUDA build: without the CPU wheel the smoke run is not worth doing here.
    [[ -n $wheel && -f $wheel ]] || skip "no CPU wheel of torch ${TORCH_VERSION} (set PGOLF_TORCH_WHEEL)"
    timed "debootstrap base" "$WORK/debootstrap.log" build_base_rootfs "$WORK/rootfs" "$wheel" \
        || { show_log "$WORK/debootstrap.log"; fail "building the debootstrap base root"; }
    timed "import base image" "$WORK/import.log" \
        sh -c "tar -C '$WORK/rootfs' -c . | docker import --change 'ENV LANG=C.UTF-8' \
               --change 'CMD [\"python3\"]' - '$BASE_IMAGE'" \
        || { show_log "$WORK/import.log"; fail "importing the base image"; }
}

# --- 3. The project's images, on that base ----------------------------------------------------------------------

build_image() {
    local name=$1 dockerfile=$2 tag=$3
    timed "build $name image" "$WORK/build-$name.log" \
        docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$dockerfile" -t "$tag" . \
        || { show_log "$WORK/build-$name.log"; fail "building the $name image"; }
}

# --- 4. The demo profile, as a user runs it ---------------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Seconds between a compose service's container start and its exit (or now, for one still running).
container_seconds() {
    local id
    id=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1)
    [[ -n $id ]] || { echo "-"; return; }
    docker inspect --format '{{.State.StartedAt}} {{.State.FinishedAt}} {{.State.Running}}' "$id" | python3 -c '
import sys
from datetime import datetime, timezone
start, end, running = sys.stdin.read().split()
parse = lambda s: datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00")
stop = datetime.now(timezone.utc) if running == "true" else parse(end)
print(round((stop - parse(start)).total_seconds()))'
}

dump_demo_logs() {
    local service
    for service in demo-data demo-train demo-service; do
        "${COMPOSE[@]}" --profile demo logs --no-color "$service" >"$WORK/logs-$service.log" 2>&1 || true
        show_log "$WORK/logs-$service.log" 40
    done
}

run_demo() {
    export PGOLF_TRAIN_IMAGE=$TRAIN_IMAGE PGOLF_SERVICE_IMAGE=$SERVICE_IMAGE PGOLF_DEMO_PORT PGOLF_DEMO_TOKEN
    PGOLF_DEMO_PORT=$(free_port)
    PGOLF_DEMO_TOKEN=$(python3 -c 'import secrets; print("smoke_" + secrets.token_urlsafe(24))')
    "${COMPOSE[@]}" --profile demo down --volumes --remove-orphans >"$WORK/down.log" 2>&1 || true
    log "demo: service on 127.0.0.1:$PGOLF_DEMO_PORT; output in the demo-client log below"
    local status=0
    timed "demo (compose run)" "$WORK/demo.log" \
        timeout "$DEMO_TIMEOUT" "${COMPOSE[@]}" --profile demo run --rm -T demo-client || status=$?
    local service
    for service in demo-data demo-train demo-service; do
        TIMINGS+=("$(printf '  %-26s %5s' "$service container" "$(container_seconds "$service")")")
    done
    if ((status != 0)); then
        show_log "$WORK/demo.log" 80
        dump_demo_logs
        ((status == 124)) && fail "the demo did not finish within ${DEMO_TIMEOUT}s"
        fail "the demo profile exited with status $status"
    fi
    show_log "$WORK/demo.log" 25
}

# --- 5. The cluster profile's PostgreSQL image: built on the same base, started, healthy, stopped ---------------

run_postgres() {
    local name=pgolf-smoke-postgres status=starting waited=0
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker run -d --name "$name" --network host -e PGPORT="$(free_port)" \
        -e POSTGRES_PASSWORD="$(python3 -c 'import secrets; print(secrets.token_hex(16))')" "$POSTGRES_IMAGE" \
        >"$WORK/postgres.log" 2>&1 || { show_log "$WORK/postgres.log"; fail "starting the postgres image"; }
    while [[ $status != healthy ]] && ((waited < 90)); do
        sleep 1
        waited=$((waited + 1))
        status=$(docker inspect --format '{{.State.Health.Status}}' "$name" 2>/dev/null || echo gone)
        [[ $status == gone || $status == unhealthy ]] && break
    done
    docker logs "$name" >"$WORK/postgres.log" 2>&1 || true
    docker rm -f "$name" >/dev/null 2>&1 || true
    [[ $status == healthy ]] || { show_log "$WORK/postgres.log"; fail "the postgres image did not become healthy"; }
    TIMINGS+=("$(printf '%-28s %5d' "postgres healthy" "$waited")")
}

main() {
    local start
    start=$(date +%s)
    ensure_engine
    ensure_base_image
    build_image train docker/train.Dockerfile "$TRAIN_IMAGE"
    build_image service docker/service.Dockerfile "$SERVICE_IMAGE"
    build_image postgres docker/postgres.Dockerfile "$POSTGRES_IMAGE"
    if [[ ${1:-} == --build-only ]]; then  # .ci/run builds beside the test suite; the smoke run proper comes later
        TIMINGS+=("$(printf '%-28s %5d' total $(($(date +%s) - start)))")
        print_timings
        banner "SMOKE BUILD ONLY: the images are built and cached; nothing was run, this is not a pass"
        return 0
    fi
    run_postgres
    run_demo
    TIMINGS+=("$(printf '%-28s %5d' total $(($(date +%s) - start)))")
    print_timings
    banner "SMOKE PASSED: images built, demo trained, evaluated over HTTP and verified"
}

main "$@"
