"""The codecs' per-thread chunk scratch stays one buffer of the largest chunk, whatever the mix of sizes.

L3's inner chunk size differs from block to block (``ceil(nbytes / chunks)`` rounded to 4 KiB), so a
scratch buffer kept per distinct size grew with every new size, in every read and encode thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tierstore.tiers.codecs import Codec, scratch_bytes

SIZES = [(256 << 10) + 4096 * i for i in range(0, 64, 7)] + [1 << 20, 300 << 10]
"""Chunk sizes from the large-chunk path on (256 KiB), all different, the largest 1 MiB."""


def _round_trips(seed: int) -> int:
    """Encode and decode one chunk of every size in this thread; this thread's scratch bytes after."""
    codec = Codec("shuffle-zstd", 1, 2)
    rng = np.random.default_rng(seed)
    for size in SIZES:
        chunk = rng.integers(0, 4, size, dtype=np.uint8)  # compressible, like bf16 exponents
        out = np.empty(size, dtype=np.uint8)
        codec.decode_into(codec.encode(chunk), out)
        assert np.array_equal(out, chunk)
    return scratch_bytes()


def test_scratch_is_one_buffer_of_the_largest_chunk() -> None:
    assert _round_trips(0) == max(SIZES)


def test_scratch_per_thread_is_bounded_under_threads() -> None:
    """Threads decoding at once each keep their own scratch, of the largest chunk, and decode correctly."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        held = list(pool.map(_round_trips, range(8)))
    assert held == [max(SIZES)] * 8
