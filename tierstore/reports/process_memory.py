"""This process's peak resident memory: what a memory budget is measured against (Linux ``/proc``)."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss", "reset_peak_rss"]


def reset_peak_rss() -> bool:
    """Start this process's ``VmHWM`` afresh from its current RSS (Linux ``clear_refs`` 5), so that an
    earlier peak (imports, a reference model) does not hide what comes after; False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss(*, since_reset: bool = True) -> int:
    """Peak RSS in bytes: ``VmHWM`` (since :func:`reset_peak_rss`, when it worked), else, or with
    ``since_reset=False``, the process's lifetime ``ru_maxrss``."""
    if since_reset:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
