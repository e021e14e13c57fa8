"""Progress on the command line: a bar for the task that last reported when stderr is a
terminal, with every other line of output printed above it; plain lines otherwise."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TextIO

from tqdm import tqdm

from gemma_assets.core import progress


class ProgressBar:
    """One bar on `stream`, redrawn for whichever task reported last (tqdm limits the redraws).
    While open (a context manager), a thread also redraws it every TICK_S, so its clock keeps
    time through a single long call instead of standing still as if hung."""

    TICK_S = 1.0

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: tqdm | None = None
        self._task = ""
        self._lock = threading.Lock()  # the ticking thread's redraws against reports and close
        self._closing = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress bar clock", daemon=True)

    def __enter__(self) -> ProgressBar:
        self._ticker.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closing.set()
        self._ticker.join()
        with self._lock:
            self._close()

    def _tick(self) -> None:
        while not self._closing.wait(self.TICK_S):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()  # tqdm measures the elapsed time at each redraw

    def __call__(self, update: progress.Update) -> None:
        with self._lock:
            self._report(update)

    def _report(self, update: progress.Update) -> None:
        label = f"{update.step}: {update.task}" if update.step else update.task
        if self._bar is None or label != self._task:
            self._close()
            self._task = label
            self._bar = tqdm(
                total=update.total,
                desc=label,
                unit=f" {update.unit}" if update.unit else "it",
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
                disable=False,  # drawn even where tqdm would guess otherwise: we checked for a terminal
            )
        if update.final:
            self._close()
            return
        self._bar.n = int(update.position) if float(update.position).is_integer() else update.position
        self._bar.set_postfix({name: f"{value:.4g}" for name, value in update.figures.items()}, refresh=False)
        self._bar.refresh()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _AboveTheBar:
    """A text stream whose whole lines are written with the bars cleared first and redrawn after,
    so log lines and prints scroll above the bar instead of through it."""

    def __init__(self, stream: TextIO, terminal: TextIO) -> None:
        self._stream, self._terminal, self._pending = stream, terminal, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, self._pending = self._pending.rsplit("\n", 1)
            with tqdm.external_write_mode(file=self._terminal):
                self._stream.write(lines + "\n")
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            with tqdm.external_write_mode(file=self._terminal):
                self._stream.write(self._pending)
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> object:  # fileno, isatty, encoding, ... of the real stream
        return getattr(self._stream, name)


@contextmanager
def command_line_progress(lines: bool, every_s: float = 10.0) -> Iterator[None]:
    """Show the progress of the tasks run inside: a bar when stderr is a terminal; otherwise,
    with `lines`, a line on stderr at most every `every_s` seconds (without it, nothing: the
    caller's run log already reaches the console)."""
    terminal = sys.stderr
    with ExitStack() as stack:
        if terminal.isatty():
            bar = stack.enter_context(ProgressBar(terminal))
            out, err = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _AboveTheBar(out, terminal), _AboveTheBar(err, terminal)

            def restore() -> None:
                sys.stdout.flush()
                sys.stderr.flush()
                sys.stdout, sys.stderr = out, err

            stack.callback(restore)
            stack.enter_context(progress.reporting(bar))
        elif lines:
            to_stderr = progress.Throttled(lambda update: print(update.line(), file=terminal, flush=True), every_s)
            stack.enter_context(progress.reporting(to_stderr))
        yield
