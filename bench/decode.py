"""Request decoding and response encoding: this checkout against another git revision, side by side.

Strict input (numbers only in x, masks checked in full) and the range and finiteness checks of
half precision run on every request. This measures what they cost: /attend's decode_attend (JSON
bytes -> checked arrays) and encode_attend (arrays -> JSON bytes), here and at a baseline revision
(default: main), loaded from git into a private package, timed round-robin in one process so that
machine noise hits both alike. Each line: median time of each, and the median of the per-round
ratios (here / baseline; < 1 is faster).

Usage:
  python bench/decode.py [--baseline REV] [--rounds N]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mha_core import MHAConfig  # noqa: E402
from service.frontend import decode as here  # noqa: E402
from service.messages import overflow_of  # noqa: E402

MODULES = ("errors", "schemas", "codecs", "decode")  # the decoding stack; runner and mha_core are shared


def _show(rev: str, name: str) -> str:
    """The module's source at ``rev``: under service/frontend/ (errors.py: service/), or flat under service/ before."""
    for folder in ("service/frontend", "service"):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{folder}/{name}.py"], capture_output=True, text=True
        )
        if out.returncode == 0:
            return out.stdout
    raise SystemExit(f"{name}.py not found at {rev}")


def load_baseline(rev: str):
    """``service.frontend.decode`` of ``rev``, with its own codecs/schemas/errors, as package ``baseline_service``."""
    tmp = tempfile.mkdtemp(prefix="mha-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    pkg = Path(tmp) / "baseline_service"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in MODULES:
        src = _show(rev, name)
        for m in MODULES:
            for pkg_name in ("service.frontend", "service"):  # today's layout, then the flat one of older revisions
                src = src.replace(f"from {pkg_name}.{m} import", f"from baseline_service.{m} import")
                src = src.replace(f"from {pkg_name} import {m}", f"from baseline_service import {m}")
        (pkg / f"{name}.py").write_text(src)
    sys.path.insert(0, str(pkg.parent))
    spec = importlib.util.find_spec("baseline_service.decode")
    return importlib.import_module(spec.name)


def bodies(rng: np.random.Generator) -> dict[str, bytes]:
    x1 = rng.standard_normal((1, 128, 512)).astype(np.float32)
    x8 = rng.standard_normal((8, 128, 512)).astype(np.float32)
    padded = x8.copy()
    padded[:, 64:] = 0  # zero padding: every padded row holds 0s, which strict decoding looks at
    b64 = {"dtype": "float32", "shape": [8, 128, 512], "b64": __import__("base64").b64encode(x8.tobytes()).decode()}
    dump = lambda obj: orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)  # noqa: E731
    return {
        "lists [1,128,512]": dump({"x": x1}),
        "lists [8,128,512]": dump({"x": x8}),
        "lists [8,128,512] half zero-padded": dump({"x": padded, "lengths": [64] * 8}),
        "base64 [8,128,512]": dump({"x": b64}),
    }


def timed(fn, reps: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def compare(name: str, new, old, rounds: int) -> None:
    new(), old()  # warm up, and both must work
    reps = max(1, int(0.05 / max(timed(new, 1), 1e-6)))
    t_new, t_old, ratios = [], [], []
    for i in range(rounds):
        pair = [(new, t_new), (old, t_old)] if i % 2 == 0 else [(old, t_old), (new, t_new)]
        for fn, out in pair:
            out.append(timed(fn, reps))
        ratios.append(t_new[-1] / t_old[-1])
    print(
        f"{name:48s} here {statistics.median(t_new) * 1e3:8.3f} ms   baseline {statistics.median(t_old) * 1e3:8.3f} ms"
        f"   ratio {statistics.median(ratios):.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per line (default 15)")
    args = parser.parse_args()
    base = load_baseline(args.baseline)
    cfg = MHAConfig(8, 512, 64, 1024)
    lim_here = here.Limits(64, 16 * 2**20, 30000, 60000)
    lim_base = base.Limits(64, 16 * 2**20, 30000, 60000)
    rng = np.random.default_rng(0)
    print(f"baseline {args.baseline}; numpy {np.__version__}; median of {args.rounds} alternating rounds")
    for name, body in bodies(rng).items():
        compare(
            f"decode {name}",
            lambda b=body: here.decode_attend(b, cfg, lim_here),
            lambda b=body: base.decode_attend(b, cfg, lim_base),
            args.rounds,
        )
    out = rng.standard_normal((8, 128, 512)).astype(np.float32)
    weights = rng.random((8, 8, 128, 128)).astype(np.float32)
    model = {"name": "mha"}
    for enc, dtype in (("lists", "float32"), ("base64", "float32"), ("base64", "float16")):
        req_here = here.DecodedRequest(None, enc, dtype, 1.0)
        req_base = base.DecodedRequest(None, enc, dtype, 1.0)
        compare(
            f"encode {enc} {dtype} output+weights",
            lambda r=req_here: here.encode_attend(out, weights, r, model),
            lambda r=req_base: base.encode_attend(out, weights, r, model),
            args.rounds,
        )
    check = lambda: overflow_of({"output": out, "weights": weights}, out, "float16")  # noqa: E731
    check()
    t = statistics.median(timed(check, 20) for _ in range(args.rounds))
    print(f"{'finiteness check of output+weights (engine)':48s} here {t * 1e3:8.3f} ms   (no baseline: new)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
