"""Progress of long loops: a loop reports its position, total and figures to a `Task`, and
whoever listens (the Dagster run log, a progress bar on the command line) shows it.

A stage never knows who listens: `reporting(listener, step)` installs a listener for the
code it wraps (a context variable, so nested scopes add listeners and threads do not share
them), and `task(...)` binds to the listeners in force where it is created. With no listener a
report reads no clock and builds nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Update:
    """Where one task of a step stands."""

    step: str  # the Dagster step (asset) the task runs in; empty outside one
    task: str  # what is being done, e.g. "k-means k=256 seed 0: Lloyd"
    position: float
    total: float | None  # None: unknown
    unit: str  # what position counts, plural ("iterations", "windows")
    elapsed_s: float
    figures: dict[str, float] = field(default_factory=dict)
    first: bool = False
    final: bool = False
    # the total is an upper bound: an iterative fit stops early once it converges
    total_is_bound: bool = False

    @property
    def rate(self) -> float | None:
        """Units per second so far; None before any unit is done."""
        return self.position / self.elapsed_s if self.position > 0 and self.elapsed_s > 0 else None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None when the total or the rate is unknown."""
        rate = self.rate
        if self.total is None or rate is None:
            return None
        return max(0.0, self.total - self.position) / rate

    def line(self, with_step: bool = True) -> str:
        """One log line: step (unless the log names it already), task, i/n, rate, ETA (or the
        wall time at the end), figures."""
        where = f"{self.step}: {self.task}" if self.step and with_step else self.task
        total = f"/{_count(self.total)}" if self.total is not None else ""
        parts = [f"{where}: {_count(self.position)}{total} {self.unit}".rstrip()]
        if (rate := self.rate) is not None:
            parts.append(f"{_rate(rate)} {self.unit}/s" if self.unit else f"{_rate(rate)}/s")
        if self.first:
            parts.append("started")
        elif self.final:
            parts.append(f"done in {format_duration(self.elapsed_s)}")
        elif (eta := self.eta_s) is not None:
            parts.append(f"ETA {'<= ' if self.total_is_bound else ''}{format_duration(eta)}")
        else:
            parts.append(f"{format_duration(self.elapsed_s)} so far")
        line = ", ".join(parts)
        if self.figures:
            line += " (" + ", ".join(f"{name} {_figure(value)}" for name, value in self.figures.items()) + ")"
        return line


Listener = Callable[[Update], None]


@dataclass(frozen=True)
class _Scope:
    step: str
    listeners: tuple[Listener, ...]
    prefix: str = ""  # what the tasks inside are part of, e.g. "k-means k=256 seed 0"


_OUTSIDE = _Scope("", ())  # no step, no listener
_SCOPE: ContextVar[_Scope] = ContextVar("gemma_assets_progress")


@contextmanager
def reporting(listener: Listener, step: str | None = None) -> Iterator[None]:
    """Send every task created inside to `listener` too (besides the listeners outside), naming
    `step` (default: the step of the scope outside)."""
    outer = _SCOPE.get(_OUTSIDE)
    with _scope(_Scope(outer.step if step is None else step, (*outer.listeners, listener), outer.prefix)):
        yield


@contextmanager
def within(label: str) -> Iterator[None]:
    """Name the tasks created inside as parts of `label` ("k-means k=256: Lloyd")."""
    outer = _SCOPE.get(_OUTSIDE)
    with _scope(_Scope(outer.step, outer.listeners, f"{outer.prefix}: {label}" if outer.prefix else label)):
        yield


@contextmanager
def _scope(scope: _Scope) -> Iterator[None]:
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


class Task:
    """One long loop's progress. Use as a context manager: entering reports the start, leaving
    without an exception reports the end (with the wall time); `update` or `advance` in between.
    Updates closer than `EVERY_S` to the last one sent are only recorded: a loop may report every
    iteration for the price of a clock read."""

    EVERY_S = 0.2

    def __init__(
        self,
        name: str,
        total: float | None,
        unit: str = "",
        total_is_bound: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        scope = _SCOPE.get(_OUTSIDE)
        name = f"{scope.prefix}: {name}" if scope.prefix else name
        self.name, self.total, self.unit, self.total_is_bound = name, total, unit, total_is_bound
        self.position = 0.0
        self._step, self._listeners, self._clock = scope.step, scope.listeners, clock
        self._started = self._sent = clock()

    def __enter__(self) -> Task:
        return self.start()

    def start(self) -> Task:
        """Report the start (entering the context does this); `finish` reports the end."""
        self._started = self._clock()
        self._send({}, first=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.finish()

    @property
    def due(self) -> bool:
        """Whether an update now would be sent: a loop computes costly figures only then."""
        return bool(self._listeners) and self._clock() - self._sent >= self.EVERY_S

    def update(self, position: float, **figures: float) -> None:
        self.position = position
        if self.due:
            self._send(figures)

    def advance(self, amount: float = 1, **figures: float) -> None:
        self.update(self.position + amount, **figures)

    def finish(self, **figures: float) -> None:
        if self.total is not None and not self.total_is_bound:
            self.position = self.total
        self._send(figures, final=True)

    def _send(self, figures: dict[str, float], first: bool = False, final: bool = False) -> None:
        if not self._listeners:
            return
        self._sent = self._clock()
        update = Update(
            self._step,
            self.name,
            self.position,
            self.total,
            self.unit,
            self._sent - self._started,
            figures,
            first,
            final,
            self.total_is_bound,
        )
        for listener in self._listeners:
            listener(update)


def task(name: str, total: float | None, unit: str = "", total_is_bound: bool = False) -> Task:
    """A task bound to the listeners in force here; `with progress.task(...) as t: ... t.advance()`."""
    return Task(name, total, unit, total_is_bound)


def tracked(items: Iterable[T], name: str, total: int | None = None, unit: str = "") -> Iterator[T]:
    """`items`, reporting one unit per item (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(name, total, unit) as progress:
        for item in items:
            yield item
            progress.advance()


class Throttled:
    """A listener that passes on at most one update per `every_s` seconds of a step, plus the
    first update it sees (the step is alive) and the end of every task it passed a line of (its
    wall time and throughput): a run log gets progress, not a flood."""

    def __init__(self, listener: Listener, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._listener, self.every_s, self._clock = listener, every_s, clock
        self._last: float | None = None
        self._shown: set[str] = set()  # tasks with a line passed on

    def __call__(self, update: Update) -> None:
        now = self._clock()
        if update.final and update.task in self._shown:
            self._shown.discard(update.task)
        elif self._last is not None and now - self._last < self.every_s:
            return
        else:
            self._last = now
            if not update.final:
                self._shown.add(update.task)
        self._listener(update)


class Heartbeat:
    """A listener that remembers each running task's latest report and, while open (a context
    manager), a thread that tells `say` again where the latest of them stands, its elapsed time
    brought up to now, once `every_s` pass with no report at all: a single call longer than the
    interval (a model load, one large product) still shows that its step is alive. With no task
    running it says how long the step has gone without one. Lines leave out the step (a run log
    names it itself)."""

    def __init__(self, say: Callable[[str], None], every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._say, self.every_s, self._clock = say, every_s, clock
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Update, float]] = {}  # task -> its latest update, when heard; latest last
        self._opened = self._said = clock()
        self._heard: float | None = None  # when the last report came (None: none yet)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="progress heartbeat", daemon=True)

    def __call__(self, update: Update) -> None:
        with self._lock:
            self._heard = heard = self._clock()
            self._running.pop(update.task, None)
            if not update.final:
                self._running[update.task] = (update, heard)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closing.set()
        self._thread.join()

    def _beat(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                last = self._said if self._heard is None else max(self._said, self._heard)  # _said: opened, at first
                wait = last + self.every_s - now
                line = self._line(now) if wait <= 0 else None
                if line is not None:
                    self._said, wait = now, self.every_s
            if line is not None:
                self._say(line)
            if self._closing.wait(wait):
                return

    def _line(self, now: float) -> str:
        if self._heard is None:
            return f"working, {format_duration(now - self._opened)} in, no progress reported yet"
        silent = format_duration(now - self._heard)
        if self._running:
            update, heard = next(reversed(self._running.values()))
            brought = replace(update, elapsed_s=update.elapsed_s + now - heard, figures={}, first=False)
            return f"{brought.line(with_step=False)}, still running, no report for {silent}"
        return f"working, no task reported for {silent}"


@dataclass
class Summary:
    """A listener that keeps, per task, what it did: for a step's metadata once it ends."""

    tasks: dict[str, dict[str, float | str | None]] = field(default_factory=dict)

    def __call__(self, update: Update) -> None:
        if update.final:
            self.tasks[update.task] = {
                "done": update.position,
                "unit": update.unit,
                "seconds": round(update.elapsed_s, 3),
                "per_second": None if update.rate is None else round(update.rate, 3),
                **update.figures,  # what the loop ended with: iterations, inertia, loss, ...
            }


def format_duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    whole = int(math.ceil(seconds)) if seconds < 1 else int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _count(value: float) -> str:
    # a position summed from fractions (EM's share of tokens) lands a rounding error off a whole
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-6 else f"{value:,.1f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _figure(value: float) -> str:
    return f"{value:.4g}"
