"""Where a process's memory goes, phase by phase: a sampler thread reading ``/proc/self/status``.

Every ``interval`` seconds the thread reads ``VmRSS``, ``RssAnon``, ``RssFile`` and ``RssShmem``;
:meth:`RssPhases.phase` labels the samples taken while its block runs, so a benchmark reports, per
phase, the RSS at its start and end and the peak inside it (with its anonymous / file / shared
parts at that moment). ``tracemalloc`` does not see torch's allocations; this sees everything the
kernel counts, at ~5 ms resolution (a spike shorter than that can be missed: ``VmHWM``, which the
kernel keeps exactly, is reported beside it).

    sampler = RssPhases()
    with sampler:
        with sampler.phase("load"):
            ...
    print(sampler.table())
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RssPhases", "Sample", "status"]

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status() -> dict[str, int]:
    """This process's memory counters in bytes (the :data:`FIELDS` of ``/proc/self/status``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: seconds since the sampler started, the phase then, and the counters."""

    t: float
    phase: str
    rss: int
    anon: int
    file: int
    shmem: int


class RssPhases:
    """A background sampler of this process's RSS with labelled phases (a context manager)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[Sample] = []
        self._phase = "start"
        self._order: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.perf_counter()
        self.hwm_after: dict[str, int] = {}

    def __enter__(self) -> RssPhases:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        s = status()
        self.samples.append(Sample(time.perf_counter() - self._start, self._phase, s.get("VmRSS", 0),
                                   s.get("RssAnon", 0), s.get("RssFile", 0), s.get("RssShmem", 0)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Label the samples taken while the block runs (one sample at entry and exit each)."""
        self._phase = label
        self._order.append(label)
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self.hwm_after[label] = status().get("VmHWM", 0)
            self._phase = f"after {label}"

    def mark(self, label: str) -> None:
        """Label the samples from now on ``label`` (a phase without a block: prefill, then decode)."""
        self._sample()
        self._phase = label
        if label not in self._order:
            self._order.append(label)
        self._sample()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per phase: RSS at start and end, the peak sample (and its anon/file/shmem parts), VmHWM after it."""
        out: dict[str, dict[str, Any]] = {}
        for label in self._order:
            inside = [s for s in self.samples if s.phase == label]
            if not inside:
                continue
            peak = max(inside, key=lambda s: s.rss)
            out[label] = {"start": inside[0].rss, "end": inside[-1].rss, "peak": peak.rss, "peak_anon": peak.anon,
                          "peak_file": peak.file, "peak_shmem": peak.shmem, "seconds": inside[-1].t - inside[0].t,
                          "hwm_after": self.hwm_after.get(label, 0)}
        return out

    def table(self) -> str:
        """The summary as a text table in MiB."""
        rows = [f"{'phase':<24}{'start':>8}{'end':>8}{'peak':>8}{'anon':>8}{'file':>8}{'shmem':>8}{'VmHWM':>8}{'s':>7}"]
        for label, p in self.summary().items():
            rows.append(f"{label:<24}" + "".join(f"{p[k] / 2**20:>8.0f}" for k in (
                "start", "end", "peak", "peak_anon", "peak_file", "peak_shmem", "hwm_after")) + f"{p['seconds']:>7.1f}")
        return "\n".join(rows)
