"""One `gemma-assets materialize` of a run at a time on a data root.

Two commands of one config started seconds apart would both find the whole graph to do and
compute it twice. The first takes an exclusive `flock` on a file in the run's folder and holds it
until it exits; the kernel releases it when its process ends, even by SIGKILL, so a killed holder
never blocks the next command (which then marks the killed process's Dagster runs failed, as any
command after a kill does: defs.recovery). A second command waits for the lock and then plans
what is left, usually nothing; with --no-wait it stops at once, naming the live command.

`flock` holds across processes of one machine on a local file system; a data root shared over
NFS by several machines needs the lock of its server (NFSv4 forwards flock as a byte-range lock).

On an s3:// data root, commands on several machines share no file system, so the run's lock is
also an object beside its artefacts, held as a lease (`remote_run_lock`): created only if absent
(a conditional PUT, If-None-Match), renewed by its holder every tenth of LEASE_SECONDS (a PUT
conditional on the ETag it last wrote), and taken over by a waiter that has seen it unchanged for
LEASE_SECONDS: no process outlives SIGKILL to release it, so a killed holder blocks the next
command for one lease at most. S3 decides each conditional PUT alone, so two waiters never both
take it over. A store that ignores those conditions would let two commands both hold the lock, so
each take first checks that the store refuses a second create and a write to a stale ETag, and
stops with a ConfigError naming the fix when it does not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec

from gemma_assets.core.config import ConfigError

LOCK_FILE = ".materialize.lock"
POLL_SECONDS = 1.0
LEASE_SECONDS = 60.0  # a remote lock unchanged this long is a dead holder's
STALE_ETAG = '"00000000000000000000000000000000"'  # an ETag no object has: a write conditional on it must fail


class RunBusy(RuntimeError):
    """Another live command is materialising the same run on the same data root."""


def holder_of(lock: Path) -> str:
    """Who holds `lock`, as its holder recorded it."""
    try:
        return _holder_named(lock.read_bytes())
    except OSError:
        return _holder_named(b"")


def _holder_named(record: bytes) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a command that has not recorded itself yet"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record(since: str, **extra: Any) -> str:
    """What a holder records of itself in its lock, for the next command to name it."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since, **extra})


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
        handle.seek(0)
        handle.truncate()
        handle.write(_record(_now()))
        handle.flush()
        if waited:
            say(f"run {run_name}: the other command ended; planning what is left")
        yield


@contextmanager
def remote_run_lock(
    run_url: str, run_name: str, wait: bool, say: Callable[[str], None], lease_seconds: float = LEASE_SECONDS
) -> Iterator[None]:
    """Hold the lease on the run's lock object at `run_url` (an s3:// URL) for the block, as
    `run_lock` holds its file (see the module's docstring). On another protocol, nothing: fsspec
    has no conditional write for it, and the lock stays each machine's."""
    fs, path = fsspec.core.url_to_fs(f"{run_url.rstrip('/')}/{LOCK_FILE}")
    if "s3" not in fs.protocol:
        yield
        return
    lease = _Lease(fs, path, lease_seconds, say)
    lease.take(run_name, wait)
    try:
        yield
    finally:
        lease.give_back()


def _lost_race(error: OSError) -> bool:
    """A conditional S3 request refused (412): s3fs raises FileExistsError for If-None-Match, EINVAL
    for If-Match, FileNotFoundError when the object is gone."""
    return isinstance(error, (FileExistsError, FileNotFoundError)) or error.errno == errno.EINVAL


class _Lease:
    """The run's lock object on S3 while this process holds it: every write changes its ETag
    (the record counts renewals), which is what waiters watch."""

    def __init__(self, fs: Any, path: str, lease_seconds: float, say: Callable[[str], None]) -> None:
        self.fs, self.path, self.lease_seconds, self.say = fs, path, lease_seconds, say
        self.url = fs.unstrip_protocol(path)
        self.etag = ""
        self.since = _now()
        self.renewals = 0
        self.lost = False
        self._closing = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="gemma-assets-run-lease")

    def _write(self, **condition: str) -> None:
        record = _record(self.since, renewals=self.renewals, lease_seconds=self.lease_seconds)
        self.etag = self.fs.pipe_file(self.path, record.encode(), **condition)["ETag"]

    def take(self, run_name: str, wait: bool) -> None:
        seen, seen_since, waited = "", 0.0, False
        while True:
            try:
                self._write(mode="create")
                break
            except OSError as error:
                if not _lost_race(error):
                    raise
            self.fs.invalidate_cache(self.path)
            try:
                etag, holder = self.fs.info(self.path)["ETag"], _holder_named(self.fs.cat_file(self.path))
            except FileNotFoundError:
                continue  # given back between the two requests: create it
            if etag != seen:
                seen, seen_since = etag, time.monotonic()
            elif time.monotonic() - seen_since >= self.lease_seconds:
                try:
                    self._write(IfMatch=etag)
                except OSError as error:
                    if not _lost_race(error):
                        raise
                    continue  # another waiter took it over first, or its holder gave it back
                self.say(
                    f"run {run_name}: took over the lock of {holder} on {self.url}, unrenewed for "
                    f"{self.lease_seconds:.0f} s (that command ended without giving it back)"
                )
                break
            if not wait:
                raise RunBusy(
                    f"run {run_name} is being materialised by {holder} (lock {self.url}) -> wait for it, or run "
                    f"the same command without --no-wait to start when it ends (a lock unrenewed for "
                    f"{self.lease_seconds:.0f} s, its command killed, is then taken over)"
                )
            if not waited:
                self.say(f"run {run_name} is being materialised by {holder} (lock {self.url}): waiting for it to end")
                waited = True
            time.sleep(min(POLL_SECONDS, self.lease_seconds / 10))
        self._refuse_a_store_without_conditional_writes()
        if waited:
            self.say(f"run {run_name}: the other command ended; planning what is left")
        self._renewer.start()

    def _refuse_a_store_without_conditional_writes(self) -> None:
        """The lock object exists and is this process's: a create of it and a write conditional on
        a stale ETag must both be refused (412). A store that accepts either ignores S3's conditional
        writes, and its lock would keep no command out."""
        for condition, header in (({"mode": "create"}, "If-None-Match"), ({"IfMatch": STALE_ETAG}, "If-Match")):
            try:
                self._write(**condition)
            except OSError as error:
                if _lost_race(error):
                    continue
                raise
            self.fs.rm_file(self.path)  # not a lock: each command that wrote it stops here
            raise ConfigError(
                f"the object store of {self.url} ignores S3's conditional writes (it accepted a PUT that "
                f"{header} should have refused), so a lock there cannot keep the commands of several machines "
                f"apart -> use a store that honours them (AWS S3 does), or pass --no-bucket-lock and "
                f"start one materialize of the run at a time yourself"
            )

    def _renew(self) -> None:
        while not self._closing.wait(self.lease_seconds / 10):
            self.renewals += 1
            try:
                self._write(IfMatch=self.etag)
            except OSError as error:
                if _lost_race(error):
                    self.lost = True
                    self.say(
                        f"the run's lock {self.url} was taken over by another command while this one "
                        f"could not renew it for {self.lease_seconds:.0f} s: both may now write the run"
                    )
                    return
            except Exception:  # botocore's connection errors are not OSErrors
                pass  # a network error: the next renewal, a tenth of the lease later, tries again

    def give_back(self) -> None:
        self._closing.set()
        if self._renewer.is_alive():
            self._renewer.join()
        if self.lost:
            return
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except Exception as error:  # the run's own outcome must not be masked by its lock
            # taken over meanwhile (not this command's to remove), or the store out of reach
            if not (isinstance(error, OSError) and _lost_race(error)):
                self.say(
                    f"could not remove the run's lock {self.url} ({error}): the next command takes it "
                    f"over once it has stood {self.lease_seconds:.0f} s unrenewed"
                )
        self.fs.invalidate_cache(self.path)
