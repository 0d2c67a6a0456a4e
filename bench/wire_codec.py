"""The crossing's codec, before and after: encode + decode of a request message and of a result message of 1, 16
and 64 small requests ([1,16,64] float32), per message, in one process (no sockets).

    PYTHONPATH=. python -m bench.wire_codec [REV]

"before": service/messages.py at git revision REV (default ``seam``: orjson headers of positional lists).
"after": this tree's service.messages (msgspec Structs in array form, one typed Decoder); both pack the small
arrays of a message into one frame. The figures are the best of interleaved rounds: the machine is shared.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time

import numpy as np

from service import messages as after


def load_before(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:service/messages.py"], check=True, capture_output=True).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("messages_before", f.name)
    mod = sys.modules["messages_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def header_of(mod, frame):
    return mod.decode(frame) if hasattr(mod, "decode") else __import__("orjson").loads(frame)


def best_us(fns, n: int, rounds: int = 15) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return [b * 1e6 for b in best]


def main() -> None:
    before = load_before(sys.argv[1] if len(sys.argv) > 1 else "seam")
    rng = np.random.default_rng(0)
    print(f"{'message':<16}{'before us':>10}{'after us':>10}{'ratio':>8}")
    for k in (1, 16, 64):
        xs = [rng.standard_normal((1, 16, 64)).astype(np.float32) for _ in range(k)]
        n = max(20, 400 // k)
        rows = []
        for mod in (before, after):
            reqs = [(i, mod.AttendInput(x), 1e9, "rid", 0) for i, x in enumerate(xs)]
            outs = [mod.Outcome(i, mod.AttendOutput(x * 2, None), 0.001, 0.002, k, k) for i, x in enumerate(xs)]

            def req(mod=mod, reqs=reqs):
                f = mod.encode_requests(reqs)
                return mod.decode_requests(header_of(mod, bytes(f[0])), f[1:])

            def res(mod=mod, outs=outs):
                f = mod.encode_outcomes(outs)
                return mod.decode_outcomes(header_of(mod, bytes(f[0])), f[1:])

            assert all(np.array_equal(r[1].x, x) for r, x in zip(req(), xs, strict=True))
            rows.append((req, res))
        for j, name in enumerate(("requests", "results")):
            ta, tb = best_us([rows[0][j], rows[1][j]], n)
            print(f"{name + ' x' + str(k):<16}{ta:>10.1f}{tb:>10.1f}{tb / ta:>8.2f}")


if __name__ == "__main__":
    main()
