#!/bin/sh
# Build-stage helper for docker/Dockerfile (runs inside the image build, not on the host).
#   venv.sh deps     create /opt/venv; install torch, then the project's dependencies
#   venv.sh wheel    build the project's wheel from /src into /dist (no dependencies)
# Offline when /wheelhouse holds wheels: pip then never leaves that folder (--no-index).
# Online otherwise: torch from $TORCH_INDEX_URL (by $TORCH_VARIANT: the PyTorch CPU index for cpu,
# PyPI, whose Linux wheels are CUDA builds, for cuda), everything else from $PIP_INDEX_URL.
# Either way the torch that lands must be the $TORCH_VARIANT build, or the build fails.
set -eu
step=${1:?usage: venv.sh deps|wheel}
: "${TORCH_VARIANT:=cpu}"
case $TORCH_VARIANT in
    cpu) : "${TORCH_INDEX_URL:=https://download.pytorch.org/whl/cpu}" ;;
    cuda) : "${TORCH_INDEX_URL:=https://pypi.org/simple}" ;;
    *) echo "venv.sh: TORCH_VARIANT must be cpu or cuda, got '$TORCH_VARIANT'" >&2; exit 2 ;;
esac
: "${TORCH_SPEC:=torch}"
: "${SLIM_TORCH:=1}"
pip=/opt/venv/bin/pip

if ls /wheelhouse/*.whl >/dev/null 2>&1; then
    echo "venv.sh: offline build from /wheelhouse ($(ls /wheelhouse/*.whl | wc -l) wheels)"
    set -- --no-index --find-links /wheelhouse
    torch_from="--no-index --find-links /wheelhouse"
else
    echo "venv.sh: online build (torch from $TORCH_INDEX_URL)"
    set --
    torch_from="--index-url $TORCH_INDEX_URL"
fi

if [ "$step" = deps ]; then
    python3 -m venv /opt/venv
    # torch alone first: its index is the one place that tells the CPU build from the CUDA one.
    # shellcheck disable=SC2086
    $pip install --no-compile $torch_from -c /src/constraints.txt "$TORCH_SPEC"
    # The dependencies, through a stub of the project that holds only its pyproject.toml, so this
    # layer is cached until pyproject.toml or constraints.txt change (not at every source edit).
    mkdir -p /tmp/stub && cp /src/pyproject.toml /tmp/stub/ && touch /tmp/stub/README.md
    $pip install --no-compile "$@" -c /src/constraints.txt /tmp/stub
    # the stub goes (the runtime stage installs the real wheel); so does setuptools, which only
    # building packages needs. No .pyc yet: the runtime stage compiles what serving imports.
    $pip uninstall -y mha-serve setuptools
    rm -rf /tmp/stub
    if [ "$SLIM_TORCH" = 1 ]; then
        # What serving never loads: C++ headers and CMake files (only for building extensions or
        # torch.compile's C++ codegen: build with SLIM_TORCH=0 for those), test binaries.
        site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        rm -rf "$site/torch/include" "$site/torch/share/cmake" "$site/torch/test"
        find "$site/torch/bin" -type f ! -name 'torch_shm_manager' -delete 2>/dev/null || true
    fi
    PYTHONDONTWRITEBYTECODE=1 TORCH_VARIANT=$TORCH_VARIANT /opt/venv/bin/python -c '
import os, sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
want = os.environ["TORCH_VARIANT"]
if (torch.version.cuda is not None) != (want == "cuda"):
    sys.exit(f"venv.sh: TORCH_VARIANT={want}, but torch {torch.__version__} is the other build")
'
elif [ "$step" = wheel ]; then
    $pip wheel "$@" --no-deps --wheel-dir /dist /src
else
    echo "venv.sh: unknown step: $step" >&2; exit 2
fi
