"""Build-time smoke test, run by docker/Dockerfile in the runtime stage: start `mha-serve` on a
tiny built-in model, answer one /attend, stop it with SIGTERM and expect a clean exit.

It runs with bytecode writing on, so it also leaves .pyc files for exactly the modules that serving
imports (~30 MB); the venv is installed with --no-compile, which keeps the ~140 MB of bytecode for
modules that never load out of the image while the container still starts as fast as a fully
compiled one."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

PORT = 18765
env = {
    **os.environ,
    "MHA_HOST": "127.0.0.1",
    "MHA_PORT": str(PORT),
    "MHA_DEVICE": "cpu",  # no GPU during a build, even for the CUDA image
    "MHA_NUM_HEADS": "2",
    "MHA_EMB_SIZE": "8",
    "MHA_HEAD_SIZE": "4",
    "MHA_MAX_SEQ_LEN": "16",
    "MHA_REPLICA_ID": "smoke",
    "MHA_SHUTDOWN_GRACE_S": "5",
}
env.pop("PYTHONDONTWRITEBYTECODE", None)
env.pop("MHA_CHECKPOINT", None)
base = f"http://127.0.0.1:{PORT}"
proc = subprocess.Popen([os.path.join(sys.prefix, "bin", "mha-serve")], env=env)
try:
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            sys.exit(f"smoke: mha-serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("smoke: not ready within 180 s")
        time.sleep(0.3)
    body = json.dumps({"x": [[[0.5, -0.25, 1.0, 0.0, 2.0, -1.0, 0.125, 3.0]] * 3]}).encode()
    req = urllib.request.Request(f"{base}/attend", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["output"]
        served_by = r.headers.get("x-served-by")
    shape = [len(out), len(out[0]), len(out[0][0])]
    if shape != [1, 3, 8] or served_by != "smoke":
        sys.exit(f"smoke: /attend gave shape {shape}, x-served-by {served_by!r}")
finally:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            sys.exit("smoke: no exit within 30 s of SIGTERM")
if proc.returncode != 0:
    sys.exit(f"smoke: exit code {proc.returncode} after SIGTERM")
print("smoke: ready, /attend ok, clean exit on SIGTERM")
