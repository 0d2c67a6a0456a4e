#!/usr/bin/env bash
# docker/cuda.sh (make docker-build-cuda): build the CUDA image with no image registry and no NVIDIA
# base image, then check it (docker/cuda_check.sh). PyPI's default Linux torch wheels are CUDA builds
# that bring the CUDA runtime as nvidia-* wheels; the driver comes from the host (NVIDIA container
# toolkit). So this is docker/ci.sh's recipe with another wheelhouse:
#   1. docker: install (apt) and start dockerd when missing
#   2. base image: the same debootstrap'ed Debian 12 as docker/ci.sh (same cache, same key)
#   3. wheelhouse: the project's dependencies plus PyPI's torch (CUDA build, several GB), cp311
#   4. image: docker/Dockerfile --build-arg TORCH_VARIANT=cuda, offline from that wheelhouse
#   5. docker/cuda_check.sh: torch is a CUDA build; mha-serve starts on the CPU and answers right
# Outside CI (a 5 GB image, ~21 GB of disk at the peak): a cold build downloads 2.7 GB and took 5 minutes here
# (docker/README.md, "CUDA image", has the measured times and size).
#
# Environment: MHA_CI_CACHE (shared with docker/ci.sh), MHA_CUDA_IMAGE (default mha-serve:cuda),
# MHA_CI_BASE_IMAGE, MHA_CI_DEBIAN_MIRROR, MHA_CUDA_INDEX_URL (default PyPI), MHA_CI_KEEP_DOCKERD=1,
# PYTHON (host python with the project installed; default .venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE=${MHA_CI_CACHE:-/var/cache/mha-serve-ci}
IMAGE=${MHA_CUDA_IMAGE:-mha-serve:cuda}
BASE_IMAGE=${MHA_CI_BASE_IMAGE:-mha-serve-base:bookworm}
INDEX_URL=${MHA_CUDA_INDEX_URL:-https://pypi.org/simple}
SUITE=bookworm # Debian 12: python 3.11, the version of the cp311 wheels below
PYVER=3.11
PY=${PYTHON:-$ROOT/.venv/bin/python}

T0=$(date +%s)
declare -A TIMES=()
log() { printf '[docker-cuda %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
step_start() { STEP_T=$(date +%s); log "== $1"; }
step_end() { TIMES[$1]=$(($(date +%s) - STEP_T)); log "   $1: ${TIMES[$1]}s"; }

mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/mha-serve-cuda.XXXXXX)
DOCKERD_PID=
cleanup() {
    local rc=$?
    set +e
    rm -rf "$WORK"
    if [ -n "$DOCKERD_PID" ] && [ "${MHA_CI_KEEP_DOCKERD:-0}" != 1 ]; then
        log "stopping the dockerd this run started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    [ "$rc" = 0 ] && log "CUDA image built and checked in $(($(date +%s) - T0))s" || log "FAILED (rc=$rc)"
    exit "$rc"
}
trap cleanup EXIT
# shellcheck source=docker/common.sh
source "$ROOT/docker/common.sh"
trap 'exit 130' INT TERM

# -- 1. docker ----------------------------------------------------------------------------------------
step_start tools
ensure_docker
[ -x "$PY" ] || { log "no $PY: make setup"; make setup >/dev/null; }
step_end tools

# -- 2. base image (as docker/ci.sh step 2; the same key, so either script reuses the other's) --------
step_start base-image
ensure_base_image
step_end base-image

# -- 3. wheelhouse: the dependencies and PyPI's (CUDA) torch --------------------------------------------
step_start wheelhouse
reqs=$("$PY" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
for r in p["build-system"]["requires"] + p["project"]["dependencies"]:
    print(r)
m = re.search(r"^torch==([^\s;#]+)", open("constraints.txt").read(), re.M)
print(f"torch=={m.group(1).split('+')[0]}" if m else "torch")
EOF
)
wh_key=$(printf '%s\n%s\n%s\n%s\n' "$reqs" "$(cat constraints.txt)" "$PYVER" "$INDEX_URL" | sha256sum | cut -c1-12)
WHEELHOUSE=$CACHE/wheelhouse-cuda-$wh_key
if [ -f "$WHEELHOUSE/.complete" ]; then
    log "wheelhouse cached: $WHEELHOUSE ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels)"
else
    rm -rf "$WHEELHOUSE.tmp" && mkdir -p "$WHEELHOUSE.tmp"
    platforms=()
    for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    mapfile -t req_list <<<"$reqs"
    # --isolated: no pip.conf and no PIP_* variables, so neither a local CPU wheel (find-links) nor a
    # machine-wide constraint file can stand in for PyPI's build. The CA bundle is passed on its own.
    cert=()
    for f in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$f" ] && [ -f "$f" ]; then cert=(--cert "$f"); break; fi
    done
    log "pip download $(echo "$reqs" | wc -l) requirements for cp${PYVER/./} from $INDEX_URL (CUDA torch: GBs)"
    "$PY" -m pip download --isolated "${cert[@]}" --index-url "$INDEX_URL" --progress-bar off --quiet \
        --dest "$WHEELHOUSE.tmp" --only-binary=:all: \
        --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" "${platforms[@]}" \
        -c constraints.txt "${req_list[@]}" || die "pip download failed"
    ls "$WHEELHOUSE.tmp"/torch-*.whl >/dev/null 2>&1 || die "the wheelhouse has no torch wheel"
    ! ls "$WHEELHOUSE.tmp"/torch-*+cpu-*.whl >/dev/null 2>&1 || die "the wheelhouse has a CPU torch wheel"
    ls "$WHEELHOUSE.tmp"/nvidia_*.whl >/dev/null 2>&1 || die "no nvidia-* wheels: $INDEX_URL's torch is not a CUDA build"
    touch "$WHEELHOUSE.tmp/.complete"
    rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
log "wheelhouse: $(du -sh "$WHEELHOUSE" | cut -f1), $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels; $(basename "$(ls "$WHEELHOUSE"/torch-*.whl)")"
step_end wheelhouse

# -- 4. image -------------------------------------------------------------------------------------------
step_start image-build
ctx=$WORK/context.tar
git rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git checkout (the build context is git's file list)"
git ls-files -z -c -o --exclude-standard | while IFS= read -r -d '' f; do
    if [ -e "$f" ] && [[ "$f" != docker/wheelhouse/*.whl ]]; then printf '%s\0' "$f"; fi
done >"$WORK/files"
wh_parent=$(dirname "$WHEELHOUSE") wh_name=$(basename "$WHEELHOUSE")
tar -cf "$ctx" -C "$ROOT" --null -T "$WORK/files" \
    -C "$wh_parent" --exclude=.complete --transform "s,^$wh_name,docker/wheelhouse," "$wh_name"
log "context: $(du -h "$ctx" | cut -f1); docker build -f docker/Dockerfile --build-arg TORCH_VARIANT=cuda (offline)"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if ! docker build --force-rm -f docker/Dockerfile -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_VARIANT=cuda - <"$ctx" >"$WORK/build.log" 2>&1; then
    cp "$WORK/build.log" "$CACHE/last-build-cuda.log"
    tail -40 "$WORK/build.log"
    die "docker build failed (full log: $CACHE/last-build-cuda.log)"
fi
cp "$WORK/build.log" "$CACHE/last-build-cuda.log"
sed 's/\x1b\[[0-9;]*m//g' "$WORK/build.log" | grep -aE '^(venv.sh:|torch |smoke:)' | sed 's/^/    /' || true
rm -f "$ctx"
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi
# the build stage's last image (the venv with the wheelhouse, ~10 GB): keep the newest, for the layer
# cache, and drop the one it replaced (as docker/ci.sh does)
stage_id=$(awk '/^Step [0-9]+\/[0-9]+ : RUN sh \/usr\/local\/bin\/venv.sh wheel/ {f=1} f && /^ ---> [0-9a-f]+$/ {print $2; exit}' "$WORK/build.log")
prev_stage_id=$(cat "$CACHE/build-stage-cuda.id" 2>/dev/null || true)
if [ -n "$stage_id" ]; then
    if [ -n "$prev_stage_id" ] && [ "$prev_stage_id" != "$stage_id" ]; then docker rmi "$prev_stage_id" >/dev/null 2>&1 || true; fi
    echo "$stage_id" >"$CACHE/build-stage-cuda.id"
fi
step_end image-build
IMAGE_SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((IMAGE_SIZE / 1000000)) MB"

# -- 5. check -------------------------------------------------------------------------------------------
step_start check
PYTHON=$PY bash docker/cuda_check.sh "$IMAGE"
step_end check

summary="image $IMAGE $((IMAGE_SIZE / 1000000)) MB; times:"
for k in tools base-image wheelhouse image-build check; do
    if [ -n "${TIMES[$k]:-}" ]; then summary+=" $k ${TIMES[$k]}s"; fi
done
log "$summary; total $(($(date +%s) - T0))s"
