"""What a streamed unit costs to read from a raw L3 whose files are in the page cache: map against pread.

Reads the weights of two units (decoder layers, by default of the 2B that ``bench_real_size.py``
builds) from a store imported with ``--l3-compression off``, interleaved repeat by repeat:

- ``map``: ``db.map(key)`` per weight, as the streamer's prefetch thread does: a ``MAP_PRIVATE``
  mapping, populated (``MADV_POPULATE_READ``), crc32c-checked against the catalog; then dropped;
- ``map crc``: of that, the checksum alone (crc32c over the same mapped bytes, again);
- ``pread L2``: ``db.get(key)`` with an L2 of one unit and the two units alternating, so every get
  ``pread``\\ s the block into a reused L2 slot and checks it (the copy path, ``mapped=False``);
- ``pread fresh``: ``db.get`` without L2: ``pread`` into freshly allocated memory, checked.

The files are read once first so that every variant reads from the page cache, which is where
a model's streamed units are after the first token when the machine has the memory for them.

    python tools/bench_mapped_read.py --store /tmp/rs/2b/store-raw --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import crc32c
import torch

import tierstore

GiB = 1 << 30


def _keys(db: tierstore.TierStore, units: list[str]) -> list[list[str]]:
    return [list(db.keys(prefix=unit + ".")) for unit in units]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="/tmp/rs/2b/store-raw")
    parser.add_argument("--units", default="model.language_model.layers.3,model.language_model.layers.4")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    units = args.units.split(",")
    with tierstore.open(args.store, readonly=True, l2_cache_size=0) as db:
        groups = _keys(db, units)
        nbytes = [sum(db.info(k).nbytes for k in keys) for keys in groups]
        assert all(db.info(k).codec == "raw" for keys in groups for k in keys), "the store must be raw"
        for keys in groups:  # warm the page cache
            for key in keys:
                db.get(key)
    times: dict[str, list[float]] = {"map": [], "map crc": [], "pread L2": [], "pread fresh": []}
    slot = max(nbytes) + (8 << 20)
    for _ in range(args.repeat):
        with tierstore.open(args.store, readonly=True, l2_cache_size=0) as db:
            for keys in groups:
                start = time.perf_counter()
                views = [db.map(k) for k in keys]
                times["map"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for view in views:
                    assert view is not None
                    crc32c.crc32c(view.reshape(-1).view(torch.uint8).numpy().data)
                times["map crc"].append(time.perf_counter() - start)
                del views
            for keys in groups:
                start = time.perf_counter()
                got = [db.get(k) for k in keys]
                times["pread fresh"].append(time.perf_counter() - start)
                del got
        with tierstore.open(args.store, readonly=True, l2_cache_size=slot) as db:
            for _round in range(2):
                for keys in groups:
                    start = time.perf_counter()
                    got = [db.get(k) for k in keys]
                    elapsed = time.perf_counter() - start
                    del got
                    if _round:  # the first round fills L2 for the first time (fresh pages)
                        times["pread L2"].append(elapsed)
    unit = statistics.mean(nbytes)
    print(f"{len(units)} units of {unit / 2**20:.0f} MiB from {args.store}, {args.repeat} repeats (median, spread)")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<12} {med * 1e3:8.1f} ms/unit  {unit / med / 1e9:6.2f} GB/s   "
              f"({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
