"""Resident memory of this process while a block of code runs (sampled)."""

from __future__ import annotations

import threading
import time

import psutil


class RssTrace:
    """RSS sampled every `interval` seconds while the block runs: its high-water mark above the
    starting level (`mb`), and afterwards the peak over any time window (e.g. one Dagster step)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time.time(), rss bytes)

    def __enter__(self) -> RssTrace:
        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.samples.append((time.time(), self.start))
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True, name="gemma-assets-rss")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.samples.append((time.time(), self._process.memory_info().rss))
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()

    @property
    def mb(self) -> float:
        """The high-water mark above the level at entry, in MB."""
        return (max(rss for _, rss in self.samples) - self.start) / 2**20

    def at(self, moment: float) -> int:
        """The last sample at or before `moment` (the first sample if none)."""
        before = [rss for at, rss in self.samples if at <= moment]
        return before[-1] if before else self.samples[0][1]

    def peak_between(self, start: float, end: float) -> int:
        """The largest sample in [start, end]; a window shorter than the interval gets the last
        sample before it."""
        inside = [rss for at, rss in self.samples if start <= at <= end]
        before = [rss for at, rss in self.samples if at < start]
        return max(inside) if inside else (before[-1] if before else 0)
