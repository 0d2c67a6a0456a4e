#!/usr/bin/env bash
# docker/ci.sh: build the mha-serve image with no image registry, run it, and prove it serves:
#   1. docker: install (apt) and start dockerd when missing; docker compose v2 or docker-compose v1
#   2. base image: debootstrap a Debian rootfs (python3) from the Debian mirror, `docker import` it
#   3. wheelhouse: the project's dependencies as cp311 manylinux wheels, prepared on the host
#   4. image: docker/Dockerfile with --build-arg BASE_IMAGE=<local base>, offline from the wheelhouse
#   5. single container: /readyz, HEALTHCHECK healthy, /attend == mha_core on the same checkpoint,
#      non-root, read-only root filesystem, graceful stop on SIGTERM
#   6. compose: 2 replicas behind nginx; requests reach both; 50 sequences of 20 steps, each on one
#      replica and right; `docker stop` one mid-stream and no request is lost; the sequences it held
#      get the start-required 400 (never a wrong answer), the others go on
# Everything it starts it stops again, by id (trap on EXIT); images and downloads stay cached in
# $MHA_CI_CACHE (default /var/cache/mha-serve-ci) and in docker, so a second run takes a minute or two.
#
# Environment: MHA_CI_CACHE, MHA_IMAGE (default mha-serve:ci), MHA_CI_BASE_IMAGE, MHA_LB_IMAGE,
# MHA_CI_DEBIAN_MIRROR, MHA_CI_KEEP_DOCKERD=1 (leave a dockerd this script started running),
# MHA_CI_SKIP_COMPOSE=1, PYTHON (host python with the project installed; default .venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE=${MHA_CI_CACHE:-/var/cache/mha-serve-ci}
IMAGE=${MHA_IMAGE:-mha-serve:ci}
BASE_IMAGE=${MHA_CI_BASE_IMAGE:-mha-serve-base:bookworm}
LB_IMAGE=${MHA_LB_IMAGE:-mha-serve-lb:ci}
SUITE=bookworm # Debian 12: python 3.11, the version of the cp311 wheels below
PYVER=3.11
PY=${PYTHON:-$ROOT/.venv/bin/python}
PROJECT=mha-serve-ci # compose project name
CI_LABEL=org.mha-serve.ci=1

T0=$(date +%s)
declare -A TIMES=()
log() { printf '[docker-ci %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
step_start() { STEP_T=$(date +%s); log "== $1"; }
step_end() { TIMES[$1]=$(($(date +%s) - STEP_T)); log "   $1: ${TIMES[$1]}s"; }

mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/mha-serve-ci.XXXXXX)
chmod 755 "$WORK" # the container's non-root user reads the checkpoint in it

# -- cleanup: only what this run started, by id ----------------------------------------------------
CONTAINERS=()
COMPOSE_UP=0
DOCKERD_PID=
CHECKS=0
cleanup() {
    local rc=$?
    set +e
    if [ "$COMPOSE_UP" = 1 ]; then
        if [ "$rc" != 0 ]; then
            log "compose logs (last lines):"
            "${COMPOSE[@]}" logs --no-color --tail 30 2>&1 | sed 's/^/    /'
        fi
        "${COMPOSE[@]}" down -v --remove-orphans -t 30 >/dev/null 2>&1
    fi
    for c in "${CONTAINERS[@]}"; do
        if [ "$rc" != 0 ]; then
            log "logs of $c (last lines):"
            docker logs --tail 30 "$c" 2>&1 | sed 's/^/    /'
        fi
        docker rm -f -v "$c" >/dev/null 2>&1
    done
    rm -rf "$WORK"
    if [ -n "$DOCKERD_PID" ] && [ "${MHA_CI_KEEP_DOCKERD:-0}" != 1 ]; then
        log "stopping the dockerd this run started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    if [ "$rc" = 0 ]; then
        log "docker CI passed in $(($(date +%s) - T0))s"
        echo "docker-ci: $CHECKS passed, 0 failed" # plain closing line: image, single container, compose
    else
        log "docker CI FAILED (rc=$rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
# shellcheck source=docker/common.sh
source "$ROOT/docker/common.sh"
trap 'exit 130' INT TERM

# -- 1. docker ----------------------------------------------------------------------------------------
step_start tools
compose_pkg=()
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    compose_pkg=(docker-compose)
fi
ensure_docker "${compose_pkg[@]}"
if docker compose version >/dev/null 2>&1; then COMPOSE_BIN=(docker compose); else COMPOSE_BIN=(docker-compose); fi
COMPOSE=("${COMPOSE_BIN[@]}" -p "$PROJECT" -f "$ROOT/docker/compose.yaml")
[ -x "$PY" ] || { log "no $PY: make setup"; make setup >/dev/null; }
log "docker $(docker version -f '{{.Server.Version}}'), compose: $("${COMPOSE_BIN[@]}" version --short 2>/dev/null || echo '?') (${COMPOSE_BIN[*]})"
# leftovers of an earlier run that was killed before its cleanup: ours by label / project name
stale=$(docker ps -aq --filter "label=$CI_LABEL")
[ -z "$stale" ] || docker rm -f -v $stale >/dev/null
"${COMPOSE[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
step_end tools

# -- 2. base image: Debian rootfs with python3, imported -------------------------------------------
step_start base-image
ensure_base_image
step_end base-image

# -- 3. wheelhouse ------------------------------------------------------------------------------------
step_start wheelhouse
# The requirements: the project's dependencies and build backend (read from pyproject.toml), with
# the CPU build of the torch version that constraints.txt pins.
reqs=$("$PY" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
for r in p["build-system"]["requires"] + p["project"]["dependencies"]:
    print(r)
pins = open("constraints.txt").read()
m = re.search(r"^torch==([^\s;#]+)", pins, re.M)
print(f"torch=={m.group(1).split('+')[0]}+cpu" if m else "torch")
EOF
)
wh_key=$(printf '%s\n%s\n%s\n' "$reqs" "$(cat constraints.txt)" "$PYVER" | sha256sum | cut -c1-12)
WHEELHOUSE=$CACHE/wheelhouse-$wh_key
if [ -f "$WHEELHOUSE/.complete" ]; then
    log "wheelhouse cached: $WHEELHOUSE ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels)"
else
    rm -rf "$WHEELHOUSE.tmp" && mkdir -p "$WHEELHOUSE.tmp"
    platforms=()
    for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    log "pip download $(echo "$reqs" | wc -l) requirements for cp${PYVER/./} manylinux x86_64"
    mapfile -t req_list <<<"$reqs"
    "$PY" -m pip download --quiet --dest "$WHEELHOUSE.tmp" --only-binary=:all: \
        --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" "${platforms[@]}" \
        -c constraints.txt "${req_list[@]}" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) \
        || die "pip download failed"
    ls "$WHEELHOUSE.tmp"/torch-*+cpu-*.whl >/dev/null 2>&1 || die "the wheelhouse has no CPU torch wheel"
    touch "$WHEELHOUSE.tmp/.complete"
    rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
log "wheelhouse: $(du -sh "$WHEELHOUSE" | cut -f1), $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
step_end wheelhouse

# -- 4. images ----------------------------------------------------------------------------------------
step_start lb-image
docker build --force-rm -t "$LB_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/lb.Dockerfile docker \
    >"$WORK/lb-build.log" 2>&1 || { tail -30 "$WORK/lb-build.log"; die "building $LB_IMAGE failed"; }
step_end lb-image

step_start image-build
# The build context as a tar: the files git tracks (docker/context-files.sh; untracked files never
# reach the image, so the same commit builds the same image) plus the wheelhouse as docker/wheelhouse/.
ctx=$WORK/context.tar
bash docker/context-files.sh "$ROOT" >"$WORK/files" || die "the build context is git's file list: $ROOT is not a git checkout"
untracked=$(git ls-files -o --exclude-standard | wc -l)
[ "$untracked" = 0 ] || log "left out of the build context: $untracked untracked file(s) (git add them to build them in)"
wh_parent=$(dirname "$WHEELHOUSE") wh_name=$(basename "$WHEELHOUSE")
tar -cf "$ctx" -C "$ROOT" --null -T "$WORK/files" \
    -C "$wh_parent" --exclude=.complete --transform "s,^$wh_name,docker/wheelhouse," "$wh_name"
log "context: $(du -h "$ctx" | cut -f1); docker build -f docker/Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE (wheelhouse: offline)"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# --force-rm: a failed step leaves no stopped container behind
if ! docker build --force-rm -f docker/Dockerfile -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" - <"$ctx" >"$WORK/build.log" 2>&1; then
    cp "$WORK/build.log" "$CACHE/last-build.log"
    tail -40 "$WORK/build.log"
    die "docker build failed (full log: $CACHE/last-build.log)"
fi
cp "$WORK/build.log" "$CACHE/last-build.log"
sed 's/\x1b\[[0-9;]*m//g' "$WORK/build.log" | grep -aE '^(venv.sh:|torch |smoke:)' | sed 's/^/    /' || true
rm -f "$ctx"
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
# What this build replaced, so rebuilds do not pile up (cached layers still in use stay): the image
# that lost its tag, and the build stage's last image (classic builder: the id after its last step).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi
stage_id=$(awk '/^Step [0-9]+\/[0-9]+ : RUN sh \/usr\/local\/bin\/venv.sh wheel/ {f=1} f && /^ ---> [0-9a-f]+$/ {print $2; exit}' "$WORK/build.log")
prev_stage_id=$(cat "$CACHE/build-stage.id" 2>/dev/null || true)
if [ -n "$stage_id" ]; then
    if [ -n "$prev_stage_id" ] && [ "$prev_stage_id" != "$stage_id" ]; then
        docker rmi "$prev_stage_id" >/dev/null 2>&1 || true
    fi
    echo "$stage_id" >"$CACHE/build-stage.id"
fi
step_end image-build
CHECKS=$((CHECKS + 1))
IMAGE_SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((IMAGE_SIZE / 1000000)) MB ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19))"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# -- 5. one container -----------------------------------------------------------------------------------
step_start single
mkdir -p "$WORK/models" && chmod 755 "$WORK/models"
"$PY" docker/ci_check.py make-checkpoint "$WORK/models/model.safetensors" >/dev/null
chmod 644 "$WORK/models/model.safetensors"
port=$(free_port)
cid=$(docker run -d --label "$CI_LABEL" -p "127.0.0.1:$port:8000" \
    -v "$WORK/models:/models:ro" -e MHA_CHECKPOINT=/models/model.safetensors -e MHA_TORCH_THREADS=1 \
    --read-only --tmpfs /tmp "$IMAGE")
CONTAINERS+=("$cid")
"$PY" docker/ci_check.py wait "http://127.0.0.1:$port" --timeout 180
replica=$(docker inspect -f '{{.Config.Hostname}}' "$cid")
"$PY" docker/ci_check.py single "http://127.0.0.1:$port" --checkpoint "$WORK/models/model.safetensors" --replica "$replica"
user=$(docker exec "$cid" id -u)
[ "$user" = 10001 ] || die "the service runs as uid $user, not the non-root 10001"
health=
for _ in $(seq 40); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || die "HEALTHCHECK status is '$health', not healthy"
t=$(date +%s%N)
docker stop -t 30 "$cid" >/dev/null
stop_ms=$((($(date +%s%N) - t) / 1000000))
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
log "single: uid $user, HEALTHCHECK $health, read-only rootfs; docker stop (SIGTERM) -> exit $code in ${stop_ms} ms"
[ "$code" = 0 ] || die "exit code $code after SIGTERM (want 0: a graceful shutdown)"
docker rm -v "$cid" >/dev/null
CONTAINERS=()
CHECKS=$((CHECKS + 1))
step_end single

# -- 6. compose: 2 replicas behind nginx -------------------------------------------------------------
if [ "${MHA_CI_SKIP_COMPOSE:-0}" != 1 ]; then
    step_start compose
    lb_port=$(free_port)
    export MHA_IMAGE=$IMAGE MHA_LB_IMAGE=$LB_IMAGE MHA_REPLICAS=2 MHA_LB_BIND=127.0.0.1 MHA_LB_PORT=$lb_port \
        MHA_CHECKPOINT_DIR=$WORK/models MHA_CHECKPOINT=/models/model.safetensors MHA_TORCH_THREADS=1 \
        MHA_SEQUENCE_IDLE_S=600 # the survivor's sequences must outlive the stop phase, however slow the machine
    COMPOSE_UP=1
    "${COMPOSE[@]}" up -d --scale mha=2 >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; die "compose up failed"; }
    "$PY" docker/ci_check.py wait "http://127.0.0.1:$lb_port" --timeout 180
    mapfile -t replicas < <("${COMPOSE[@]}" ps -q mha)
    [ "${#replicas[@]}" = 2 ] || die "compose runs ${#replicas[@]} replicas, not 2"
    "$PY" docker/ci_check.py compose "http://127.0.0.1:$lb_port" --checkpoint "$WORK/models/model.safetensors" \
        --replicas 2 --stop "${replicas[0]}" || die "compose check failed"
    "${COMPOSE[@]}" down -v --remove-orphans -t 30 >/dev/null 2>&1
    COMPOSE_UP=0
    CHECKS=$((CHECKS + 1))
    step_end compose
fi

summary="image $IMAGE $((IMAGE_SIZE / 1000000)) MB; times:"
for k in tools base-image wheelhouse lb-image image-build single compose; do
    if [ -n "${TIMES[$k]:-}" ]; then summary+=" $k ${TIMES[$k]}s"; fi
done
log "$summary; total $(($(date +%s) - T0))s"
