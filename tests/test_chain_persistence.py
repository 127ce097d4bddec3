"""KV-block chain links in the catalog: they survive a reopen and govern eviction after every promotion.

``put(key, t, parent=...)`` writes the link into the block's row; whenever the block becomes resident
in L2 or L1 again (a get, a prefetch, warm-up at open) the link comes back from that row, so a chain
is still evicted from its tail. A parent that is gone is no link, and not damage either.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tierstore.catalog import SCHEMA_VERSION, schema_scripts
from tierstore.errors import InvalidArgumentError, SchemaVersionError

BLOCK = 16_000  # float32 elements: 64 000 bytes, one 64 KiB slot
CHAIN = [f"c{i}" for i in range(6)]
SMALL_L2 = "1MiB"  # 16 slots


def put_chain(db: tierstore.TierStore, keys: list[str] = CHAIN) -> None:
    for i, key in enumerate(keys):
        db.put(key, torch.full((BLOCK,), float(i)), parent=keys[i - 1] if i else None)


def resident(db: tierstore.TierStore, keys: list[str], tier: str = "L2") -> list[str]:
    return [k for k in keys if tier in db.info(k).tiers]


def leaving_order(db: tierstore.TierStore, watched: list[str], fill: Callable[[str], object],
                  tier: str = "L2") -> list[str]:
    """Stream filler blocks through ``tier`` (``fill(key)``) until every watched key has left it; the order."""
    order: list[str] = []
    for i in range(200):
        fill(f"filler{i}")
        gone = [k for k in watched if k not in order and tier not in db.info(k).tiers]
        assert len(gone) <= 1, f"{gone} left {tier} in one step"
        order += gone
        if len(order) == len(watched):
            return order
    raise AssertionError(f"{tier} kept {set(watched) - set(order)}")


def put_filler(db: tierstore.TierStore) -> Callable[[str], object]:
    return lambda key: db.put(key, torch.zeros(BLOCK))


# -- links survive a reopen ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_a_chain_promoted_from_l3_after_a_reopen_evicts_tail_first(store_path: Path, policy: str) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db)
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False, l2_eviction_policy=policy) as db:
        assert [db.info(k).parent for k in CHAIN] == [None, *CHAIN[:-1]]
        for i, key in enumerate(CHAIN):  # each get reads L3 and promotes into L2; c0 is the least recent
            assert db.get(key, copy=True)[0].item() == i
        assert resident(db, CHAIN) == CHAIN
        assert leaving_order(db, CHAIN, put_filler(db)) == CHAIN[::-1]
        assert [db.get(k)[0].item() for k in CHAIN] == list(range(6))  # evicted from L2, never lost


def test_without_links_the_same_promotions_evict_the_oldest_first(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        for i, key in enumerate(CHAIN):
            db.put(key, torch.full((BLOCK,), float(i)))
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        for key in CHAIN:
            db.get(key)
        assert leaving_order(db, CHAIN, put_filler(db)) == CHAIN  # the control: lru alone


def test_a_chain_prefetched_after_a_reopen_evicts_tail_first(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db)
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        assert sorted(db.prefetch(CHAIN).result(timeout=60)) == sorted(CHAIN)
        assert resident(db, CHAIN) == CHAIN
        assert leaving_order(db, CHAIN, put_filler(db)) == CHAIN[::-1]


def test_a_chain_warmed_from_the_l2_file_evicts_tail_first(store_path: Path) -> None:
    opts: dict[str, Any] = {"l2_cache_size": SMALL_L2, "fsync": False, "l2_file_backed": True}
    with tierstore.open(store_path, **opts) as db:
        put_chain(db)
    with tierstore.open(store_path, **opts) as db:
        assert db.warm_blocks == len(CHAIN)  # admitted at open, with no get
        assert leaving_order(db, CHAIN, put_filler(db)) == CHAIN[::-1]


def test_l1_promotions_after_a_reopen_evict_tail_first(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db)
    with tierstore.open(store_path, l2_cache_size=0, l1_device="cpu", l1_cache_size=SMALL_L2, fsync=False) as db:
        for key in CHAIN:
            db.get(key, device="cpu")  # promoted from L3 into the L1 pool
        assert resident(db, CHAIN, "L1") == CHAIN
        filler = torch.zeros(BLOCK)

        def fill(key: str) -> None:
            db.put(key, filler)
            db.get(key, device="cpu")

        assert leaving_order(db, CHAIN, fill, "L1") == CHAIN[::-1]


def test_a_spilled_cache_only_block_keeps_its_link(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        db.put("c0", torch.zeros(BLOCK), durable=False)
        db.put("c1", torch.ones(BLOCK), durable=False, parent="c0")
        assert db.info("c1").parent == "c0"  # only in L2 so far: the link is the residency's
        leaving_order(db, ["c0", "c1"], put_filler(db))
        assert db.info("c1").tiers == ("L3",) and db.info("c1").parent == "c0"  # the spilled row has it
        with sqlite3.connect(store_path / "catalog.sqlite") as conn:
            assert conn.execute("SELECT parent FROM blocks WHERE key = 'c1'").fetchone() == ("c0",)


# -- overwrite, delete, transactions ---------------------------------------------------------------------


def catalog_parent(path: Path, key: str) -> object:
    conn = sqlite3.connect(path / "catalog.sqlite")
    try:
        row = conn.execute("SELECT parent FROM blocks WHERE key = ?", (key,)).fetchone()
        return row[0] if row else "no row"
    finally:
        conn.close()


def test_overwriting_a_key_replaces_or_clears_its_link(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        db.put("a", torch.zeros(4))
        db.put("k", torch.zeros(4), parent="a")
        assert catalog_parent(store_path, "k") == "a"
        db.put("k", torch.ones(4), parent="b")
        assert catalog_parent(store_path, "k") == "b"
        db.put("k", torch.ones(4))
        assert catalog_parent(store_path, "k") is None and db.info("k").parent is None
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        assert db.info("k").parent is None


def test_a_rolled_back_savepoint_keeps_the_earlier_link(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        with db.transaction():
            db.put("k", torch.zeros(4), parent="a")
            with pytest.raises(RuntimeError), db.transaction():
                db.put("k", torch.ones(4), parent="b")
                raise RuntimeError("undo the inner put")
        assert db.info("k").parent == "a" and catalog_parent(store_path, "k") == "a"
        with pytest.raises(RuntimeError), db.transaction():
            db.put("k", torch.ones(4), parent="c")
            raise RuntimeError("undo the whole transaction")
        assert db.info("k").parent == "a"


def test_compaction_moves_blocks_with_their_links(store_path: Path) -> None:
    keys = [f"k{i}" for i in range(40)]
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db, keys)  # small blocks share pack shards
        for key in keys[::2]:
            db.delete(key)  # half of every shard is dead: compaction rewrites the live half
        assert db.compact(min_fill=1.0).blocks_moved > 0
        assert [db.info(k).parent for k in keys[1::2]] == keys[::2]  # links to deleted parents, kept as they were


def test_a_block_cannot_be_its_own_parent(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        with pytest.raises(InvalidArgumentError):
            db.put("k", torch.zeros(4), parent="k")
        assert "k" not in db


def test_a_deleted_parent_is_no_link_and_no_damage(store_path: Path) -> None:
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db)
        db.delete("c2")  # c3 now names a missing parent
        db.put("orphan", torch.zeros(BLOCK), parent="never-stored")
    report = tierstore.verify(store_path)
    assert report.ok, report.problems
    keys = [k for k in CHAIN if k != "c2"]
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        assert db.info("c3").parent == "c2" and "c2" not in db
        for key in keys:
            db.get(key)
        # two chains now: c0 <- c1 and c3 <- c4 <- c5, each evicted from its tail; c0 is the least recent
        assert leaving_order(db, keys, put_filler(db)) == ["c1", "c0", "c5", "c4", "c3"]


def test_info_shows_the_parent_on_the_command_line(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tierstore.cli import main

    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        put_chain(db, CHAIN[:2])
    assert main(["info", str(store_path), "c1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "c0"


# -- upgrading a store made with the first schema ---------------------------------------------------------


def make_version_1(path: Path) -> None:
    """Turn the catalog at ``path`` into what tierstore wrote before schema 2 (and check that it is)."""
    conn = sqlite3.connect(path / "catalog.sqlite")
    try:
        conn.execute("ALTER TABLE blocks DROP COLUMN l3_chunk")  # schema 3
        conn.execute("ALTER TABLE blocks DROP COLUMN parent")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        fresh = sqlite3.connect(":memory:")
        fresh.executescript(schema_scripts()[0][2])
        want = fresh.execute("SELECT sql FROM sqlite_master WHERE name = 'blocks'").fetchone()
        fresh.close()
        assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 'blocks'").fetchone() == want
    finally:
        conn.close()


def test_a_version_1_store_is_upgraded_in_place_and_keeps_working(store_path: Path) -> None:
    assert SCHEMA_VERSION >= 2
    with tierstore.open(store_path, l2_cache_size=0, fsync=False) as db:
        for i, key in enumerate(CHAIN):
            db.put(key, torch.full((BLOCK,), float(i)))
    make_version_1(store_path)
    with pytest.raises(SchemaVersionError):  # a reader never changes the catalog: one read-write open upgrades it
        tierstore.open(store_path, readonly=True)
    with tierstore.open(store_path, l2_cache_size=SMALL_L2, fsync=False) as db:
        assert [db.get(k)[0].item() for k in CHAIN] == list(range(6))
        assert all(db.info(k).parent is None for k in CHAIN)
        db.put("c6", torch.full((BLOCK,), 6.0), parent="c5")
    conn = sqlite3.connect(store_path / "catalog.sqlite")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert tierstore.verify(store_path).ok
    with tierstore.open(store_path, readonly=True, l2_cache_size=0) as db:
        assert db.info("c6").parent == "c5" and db.get("c6")[0].item() == 6.0


# -- a property: a resident block whose resident child remains is never evicted ----------------------------


@st.composite
def forests(draw: st.DrawFn) -> tuple[list[int | None], list[int], list[int], list[int]]:
    """Random chain shapes: each block's parent (an earlier block, or none), sizes, deletions, gets."""
    n = draw(st.integers(3, 14))
    # mostly long chains (the previous block), some roots and branches (any earlier block)
    parents = [None] + [draw(st.sampled_from([i - 1, i - 1, i - 1, None, *range(i)])) for i in range(1, n)]
    sizes = [draw(st.sampled_from([1, 1, 2])) for _ in range(n)]  # in 64 KiB slots
    deleted = draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True))
    gets = draw(st.lists(st.integers(0, n - 1), min_size=4, max_size=30))
    return parents, sizes, deleted, gets


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=forests(), policy=st.sampled_from(["lru", "fifo", "lfu"]))
def test_eviction_never_takes_a_block_whose_resident_child_stays(
        tmp_path_factory: pytest.TempPathFactory,
        shape: tuple[list[int | None], list[int], list[int], list[int]], policy: str) -> None:
    parents, sizes, deleted, gets = shape
    path = tmp_path_factory.mktemp("forest")
    keys = [f"b{i}" for i in range(len(parents))]
    with tierstore.open(path, l2_cache_size=0, fsync=False) as db:
        for i, key in enumerate(keys):
            db.put(key, torch.full((BLOCK * sizes[i],), float(i)),
                   parent=None if parents[i] is None else keys[parents[i]])  # type: ignore[index]
        for i in deleted:
            db.delete(keys[i])
    live = [k for i, k in enumerate(keys) if i not in deleted]
    children = {k: [c for j, c in enumerate(keys) if parents[j] == i and c in live] for i, k in enumerate(keys)}
    with tierstore.open(path, l2_cache_size="320KiB", fsync=False, l2_eviction_policy=policy) as db:
        before: set[str] = set()
        for i in gets:
            if keys[i] not in live:
                continue
            assert db.get(keys[i])[0].item() == i
            after = set(resident(db, live))
            for gone in before - after:
                kept = [c for c in children[gone] if c in before and c in after]
                assert not kept, f"{gone} was evicted while its child {kept} stayed in L2"
            before = after


# -- TieredCache records its blocks' links ----------------------------------------------------------------


def test_tiered_cache_puts_each_block_with_the_previous_one_as_parent(store_path: Path) -> None:
    pytest.importorskip("transformers")
    from tierstore.integrations.kv_cache import TieredCache
    from tierstore.integrations.tiny_model import build_tiny_model, synthetic_inputs

    model = build_tiny_model(seed=3)
    inputs = synthetic_inputs(list(range(1, 40)), image_seed=None, suffix=list(range(60, 75)))  # 3 full blocks
    gen: dict[str, Any] = {"max_new_tokens": 2, "do_sample": False}
    with tierstore.open(store_path, fsync=False) as db:
        cache = TieredCache(db, config=model.config, persist=True, span_blocks=1)  # a store block per block
        cache.generate(model, **inputs, **gen)
        chains = [list(layer.block_keys) for layer in cache.layers]
        cache.release()
    assert len(chains) == 2 and all(len(c) >= 3 for c in chains)
    with tierstore.open(store_path, readonly=True, l2_cache_size=0) as db:  # the durable prefix blocks kept them
        for chain in chains:
            assert all(k.startswith("kv/prefix/") for k in chain)
            assert [db.info(k).parent for k in chain] == [None, *chain[:-1]]
