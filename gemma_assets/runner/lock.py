"""One `gemma-assets materialize` of a run at a time on a data root.

Two commands of one config started seconds apart would both find the whole graph to do and
compute it twice. The first takes an exclusive `flock` on a file in the run's folder and holds it
until it exits; the kernel releases it when its process ends, even by SIGKILL, so a killed holder
never blocks the next command (which then marks the killed process's Dagster runs failed, as any
command after a kill does: defs.recovery). A second command waits for the lock and then plans
what is left, usually nothing; with --no-wait it stops at once, naming the live command.

`flock` holds across processes of one machine on a local file system; a data root shared over
NFS by several machines needs the lock of its server (NFSv4 forwards flock as a byte-range lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".materialize.lock"
POLL_SECONDS = 1.0


class RunBusy(RuntimeError):
    """Another live command is materialising the same run on the same data root."""


def holder_of(lock: Path) -> str:
    """Who holds `lock`, as its holder recorded it."""
    try:
        holder = json.loads(lock.read_text())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a command that has not recorded itself yet"


@contextmanager
def run_lock(run_folder: Path, run_name: str, wait: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the run's lock for the block: at once if free, else after its holder ends (`wait`),
    else RunBusy naming the holder."""
    run_folder.mkdir(parents=True, exist_ok=True)
    lock = run_folder / LOCK_FILE
    with open(lock, "a+") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise RunBusy(
                        f"run {run_name} is being materialised by {holder_of(lock)} -> wait for it, or run "
                        "the same command without --no-wait to start when it ends"
                    ) from None
                if not waited:
                    say(f"run {run_name} is being materialised by {holder_of(lock)}: waiting for it to end")
                    waited = True
                time.sleep(POLL_SECONDS)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        handle.flush()
        if waited:
            say(f"run {run_name}: the other command ended; planning what is left")
        yield
