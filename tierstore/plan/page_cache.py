"""How much of the machine's free RAM the planner counts as page cache for a store's files.

A file read once stays in the page cache while free memory holds it: weights streamed from L3
every token, or accelerate's offload folder, are then read from memory after the first pass, not
from the disk. The planner counts the RAM the process leaves free: ``ram_free`` (``MemAvailable``
when probed, which already counts reclaimable cache) less the host budget and a fixed
:data:`PROCESS_OVERHEAD` for the interpreter, libraries and transient buffers (BENCHMARKS.md
measures 0.4-1.2 GiB above the budget on the 2B).
"""

from __future__ import annotations

from .machine import Machine

__all__ = ["PROCESS_OVERHEAD", "cache_room"]

PROCESS_OVERHEAD = 1 << 30
"""Memory a streaming process uses above its budget, kept out of the page cache room."""


def cache_room(machine: Machine, memory: int) -> int:
    """Bytes of page cache free beside a process with host budget ``memory``: ``ram_free - memory - 1 GiB``."""
    return max(0, machine.ram_free - int(memory) - PROCESS_OVERHEAD)
