"""Another process holding a run's lock until killed, for the lock tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def process_holding(imports: str, lock: str) -> subprocess.Popen:
    """A Python process that runs `imports`, enters `with <lock>:` and stays inside until killed;
    returned once it is in (it prints 'held')."""
    code = f"import time; {imports}\nwith {lock}:\n    print('held', flush=True); time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder
