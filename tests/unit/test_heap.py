"""service.heap: a serving process freezes its start-up objects and collects its young generation less often."""

from __future__ import annotations

import subprocess
import sys


def test_settle_freezes_start_up_objects_and_raises_the_young_generations_threshold():
    code = (
        "import gc, service.heap as h\n"
        "before = gc.get_threshold()\n"
        "h.settle()\n"
        "print(gc.get_freeze_count() > 1000, gc.get_threshold() == (h.GEN0, *before[1:]), h.GEN0 > before[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
