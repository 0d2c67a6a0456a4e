"""Container HEALTHCHECK: exit 0 when GET /readyz on this container answers 200."""

import os
import sys
import urllib.request

port = os.environ.get("MHA_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # 503 (not ready, or draining), refused, timeout
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
