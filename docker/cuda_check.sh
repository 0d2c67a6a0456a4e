#!/usr/bin/env bash
# docker/cuda_check.sh IMAGE: check a built CUDA image (docker/cuda.sh runs it after the build).
#   1. torch inside is a CUDA build (torch.version.cuda set) and its CUDA libraries load (cuDNN)
#   2. mha-serve starts on the CPU (no GPU needed): /readyz, /v1/model's checksum and 32 /attend
#      answers equal to mha_core on the same checkpoint (docker/ci_check.py single), non-root,
#      exit 0 on SIGTERM
# On a GPU host, MHA_CUDA_CHECK_GPUS=1 runs step 2 with `--gpus all` and MHA_DEVICE=cuda instead
# (float32, so the answers still compare at ci_check.py's tolerance) and asserts the GPU is seen.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IMAGE=${1:-${MHA_CUDA_IMAGE:-mha-serve:cuda}}
PY=${PYTHON:-$ROOT/.venv/bin/python}
GPUS=${MHA_CUDA_CHECK_GPUS:-0}
log() { printf '[cuda-check] %s\n' "$*"; }
die() { log "FAIL: $*"; exit 1; }

WORK=$(mktemp -d /tmp/mha-serve-cuda-check.XXXXXX)
chmod 755 "$WORK"
CID=
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CID" ]; then
        [ "$rc" = 0 ] || docker logs --tail 30 "$CID" 2>&1 | sed 's/^/    /'
        docker rm -f -v "$CID" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

gpu_args=()
device=cpu
if [ "$GPUS" = 1 ]; then gpu_args=(--gpus all); device=cuda; fi

# 1. a CUDA build of torch, whose bundled CUDA libraries load (no driver needed for that)
info=$(docker run --rm "${gpu_args[@]}" --entrypoint python "$IMAGE" -c '
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
cudnn = torch.backends.cudnn.version()
assert cudnn, "cuDNN does not load"
print(f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {cudnn} gpus {torch.cuda.device_count()}")
') || die "torch in $IMAGE is not a working CUDA build"
log "$info"
if [ "$GPUS" = 1 ]; then
    case $info in *" gpus 0") die "--gpus all, yet torch sees no GPU (NVIDIA container toolkit?)" ;; esac
fi

# 2. the service, on the CPU by default
mkdir -p "$WORK/models" && chmod 755 "$WORK/models"
"$PY" docker/ci_check.py make-checkpoint "$WORK/models/model.safetensors" >/dev/null
chmod 644 "$WORK/models/model.safetensors"
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CID=$(docker run -d "${gpu_args[@]}" -p "127.0.0.1:$port:8000" -v "$WORK/models:/models:ro" \
    -e MHA_CHECKPOINT=/models/model.safetensors -e MHA_DEVICE=$device -e MHA_DTYPE=float32 \
    -e MHA_TORCH_THREADS=1 --read-only --tmpfs /tmp "$IMAGE")
"$PY" docker/ci_check.py wait "http://127.0.0.1:$port" --timeout 180
"$PY" docker/ci_check.py single "http://127.0.0.1:$port" --checkpoint "$WORK/models/model.safetensors" \
    --replica "$(docker inspect -f '{{.Config.Hostname}}' "$CID")"
dev=$(curl -s "http://127.0.0.1:$port/v1/model" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("device"))')
user=$(docker exec "$CID" id -u)
[ "$user" = 10001 ] || die "the service runs as uid $user, not 10001"
docker stop -t 30 "$CID" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CID")
[ "$code" = 0 ] || die "exit code $code after SIGTERM"
log "mha-serve in $IMAGE on $device (/v1/model device: $dev): ready, answers equal to mha_core, uid $user, exit 0 on SIGTERM"
echo "cuda-check: passed"
