"""Peak resident memory of a call, sampled from a background thread.

``resource.getrusage(...).ru_maxrss`` cannot be used for a call's own peak: it is a process
high-water mark, and on Linux a child process even starts from the RSS its parent had when it
forked. Sampling the resident set size every 2 ms while the call runs measures the call alone.
"""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """Context manager: ``base`` is the RSS on entry, ``peak`` the highest RSS seen inside."""

    def __init__(self, interval: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        """Bytes above the RSS on entry."""
        return max(0, self.peak - self.base)
