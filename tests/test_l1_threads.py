"""Reader threads taking L1 and L2 views (kept briefly, then dropped) while the main thread puts,
overwrites and deletes cache-only and durable blocks in transactions, with L1 and L2 small enough
that every commit evicts, spills and writes back. Every read must be one whole version written for
its key, a view must not change while it is held, and no slot may be freed twice."""

from __future__ import annotations

import gc
import random
import threading
from collections import deque
from pathlib import Path

import torch

import tierstore
from tierstore.errors import BlockNotFoundError

KEYS = 24
ELEMS = 4096  # int32: 16 KiB a block
READERS = 3
ROUNDS = 150


def stamp(key: int, version: int) -> int:
    return key * 1_000_000 + version


def check(tensor: torch.Tensor, key: int, written: set[int], where: str) -> None:
    assert tensor.shape == (ELEMS,) and tensor.dtype == torch.int32, where
    first = int(tensor[0])
    assert bool((tensor == first).all()), f"{where}: key {key} mixes versions or holds garbage"
    assert first in written, f"{where}: key {key} returned {first}, never written for it"


def test_views_on_reader_threads_while_main_thread_commits(store_path: Path) -> None:
    rng = random.Random(1234)
    written: list[set[int]] = [set() for _ in range(KEYS)]  # every version ever put (before the put)
    deleted = [True] * KEYS  # absent at some point: a BlockNotFoundError is allowed
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0] * READERS

    def reader(index: int) -> None:
        local = random.Random(index)
        held: deque[tuple[int, torch.Tensor, set[int]]] = deque()
        try:
            while not stop.is_set():
                key = local.randrange(KEYS)
                try:
                    device = "cpu" if local.random() < 0.6 else None  # L1 view, else an L2 (or L3) read
                    tensor = db.get(f"k{key}", device=device)
                except BlockNotFoundError:
                    assert deleted[key], f"key {key} vanished though never deleted"
                    continue
                check(tensor, key, written[key], "get")
                reads[index] += 1
                held.append((key, tensor, written[key]))
                if len(held) > local.randrange(1, 6):
                    old_key, old, versions = held.popleft()
                    check(old, old_key, versions, "held view")  # unchanged while held
                    del old
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            held.clear()

    with tierstore.open(store_path, l1_device="cpu", l1_cache_size="192KiB", l2_cache_size="256KiB",
                        fsync=False) as db:
        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
        for t in threads:
            t.start()
        try:
            for round_ in range(ROUNDS):
                with db.transaction():
                    for _ in range(rng.randrange(1, 6)):
                        key = rng.randrange(KEYS)
                        if rng.random() < 0.1:
                            deleted[key] = True
                            if f"k{key}" in db:
                                db.delete(f"k{key}")
                            continue
                        version = stamp(key, round_)
                        written[key].add(version)
                        value = torch.full((ELEMS,), version, dtype=torch.int32)
                        db.put(f"k{key}", value, durable=rng.random() < 0.3)
                if errors:
                    break
                if round_ % 16 == 0:
                    gc.collect()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not errors, errors[0]
        assert all(reads), reads
        for key in range(KEYS):  # the final state reads back whole
            try:
                check(db.get(f"k{key}", device="cpu"), key, written[key], "final L1")
                check(db.get(f"k{key}"), key, written[key], "final")
            except BlockNotFoundError:
                assert deleted[key]
        db.stats()  # drains released views: a slot freed twice raises here


def test_a_view_of_an_entry_killed_after_its_lookup_is_refused(store_path: Path) -> None:
    # The interleaving the threads above hit, made deterministic: a reader looks the entry up, a
    # commit replaces the block (freeing the unviewed slot, which the next put reuses), then the
    # reader asks for its view. It must get None (and look up again), not a view of the new bytes
    # whose finalizer would free the slot a second time.
    with tierstore.open(store_path, l1_device="cpu", l1_cache_size="192KiB", l2_cache_size="256KiB",
                        fsync=False) as db:
        l1 = db._l1
        assert l1 is not None
        db.put("a", torch.full((ELEMS,), 1, dtype=torch.int32), durable=False)
        entry = l1.lookup("a")
        assert entry is not None and entry.base is None
        db.put("a", torch.full((ELEMS,), 2, dtype=torch.int32), durable=False)
        db.put("b", torch.full((ELEMS,), 3, dtype=torch.int32), durable=False)
        assert l1.view(entry) is None and l1.view(entry, copy=True) is None
        assert bool((db.get("a", device="cpu") == 2).all()) and bool((db.get("b", device="cpu") == 3).all())
        gc.collect()
        db.stats()  # drains released views: nothing freed twice
        assert bool((db.get("b", device="cpu") == 3).all())
