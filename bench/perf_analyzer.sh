#!/usr/bin/env bash
# perf_analyzer (Triton's load generator), in its own venv under .cache/perf_analyzer (gitignored).
#
#   bench/perf_analyzer.sh --install          install it (apt libb64-0d; PyPI tritonclient 2.51.0 + libcudart)
#   bench/perf_analyzer.sh ARGS...            run it (installs on first use), e.g.
#   bench/perf_analyzer.sh -m mha -u 127.0.0.1:8000 --input-data bench/out/perf_input.json \
#       --concurrency-range 1:16:3 --measurement-interval 2000
#   bench/perf_analyzer.sh -m mha-seq -u 127.0.0.1:8000 --input-data bench/out/perf_seq.json --sequence-length 32
#                                             sequences: mha-seq's config has sequence_batching, so perf_analyzer
#                                             sends sequence_id/start/end (data: bench/perf_input.py --model mha-seq)
#   bench/perf_analyzer.sh --path             print the path of the wrapper (for tests: MHA_PERF_ANALYZER)
#
# Why 2.51.0: later perf-analyzer wheels need glibc 2.38 and Debian 12 has 2.36. The binary bundled in
# tritonclient 2.51.0 runs here once libb64 (Debian) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12;
# no GPU needed, the library only has to load) are on the library path.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${MHA_PERF_ANALYZER_DIR:-$ROOT/.cache/perf_analyzer}"
VENV="$DIR/venv"
WRAPPER="$DIR/perf_analyzer"

install() {
    if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
        if [ "$(id -u)" != 0 ]; then
            echo "perf_analyzer needs the Debian package libb64-0d: run as root, or apt-get install libb64-0d" >&2
            exit 1
        fi
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libb64-0d >/dev/null
    fi
    mkdir -p "$DIR"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet 'tritonclient==2.51.0' 'nvidia-cuda-runtime-cu12>=12,<13'
    local bin cudart
    bin="$(ls "$VENV"/lib/python3*/site-packages/tritonclient/../../../../bin/perf_analyzer 2>/dev/null \
        || find "$VENV" -name perf_analyzer -type f -perm -u+x | head -1)"
    [ -z "$bin" ] && bin="$(find "$VENV" -name perf_analyzer -type f | head -1)"
    cudart="$(dirname "$(find "$VENV" -name 'libcudart.so.12*' | head -1)")"
    [ -n "$bin" ] || { echo "perf_analyzer binary not found in tritonclient 2.51.0" >&2; exit 1; }
    cat >"$WRAPPER" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$bin" "\$@"
WRAP
    chmod +x "$WRAPPER"
    "$WRAPPER" --version >/dev/null 2>&1 || "$WRAPPER" --help >/dev/null 2>&1 || {
        echo "perf_analyzer installed at $bin but does not start:" >&2
        "$WRAPPER" --help 2>&1 | tail -5 >&2
        exit 1
    }
}

case "${1:-}" in
    --install) install; echo "$WRAPPER" ;;
    --path) echo "$WRAPPER" ;;
    *) [ -x "$WRAPPER" ] || install >&2; exec "$WRAPPER" "$@" ;;
esac
