"""HostArena (L2) on the CPU: bytes, zero-copy views, release callbacks, close, full disks."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tierstore.alloc import Allocation
from tierstore.errors import ConfigError, StoreClosedError, StoreFullError, UnsupportedTensorError
from tierstore.tiers import l2_slab
from tierstore.tiers.l2_slab import HostArena

MiB = 1 << 20


@pytest.fixture(params=["anonymous", "file"])
def arena(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HostArena]:
    path = tmp_path / "l2.arena" if request.param == "file" else None
    with HostArena("2MiB", path=path) as a:
        yield a


def _alloc(arena: HostArena, nbytes: int) -> Allocation:
    a = arena.alloc(nbytes)
    assert a is not None, f"arena unexpectedly full for {nbytes} bytes"
    return a


def test_buffer_bytes_read_back(arena: HostArena) -> None:
    slots = [_alloc(arena, n) for n in (1, 63, 64, 4096, 5000, 300_000)]
    for i, s in enumerate(slots):
        buf = arena.buffer(s)
        assert len(buf) == s.nbytes and not buf.readonly
        buf[:] = bytes([i + 1]) * s.nbytes
        buf.release()
    for i, s in enumerate(slots):
        assert arena.as_numpy(s).tobytes() == bytes([i + 1]) * s.nbytes


def test_close_with_live_views_keeps_them_readable(tmp_path: Path) -> None:
    for path in (None, tmp_path / "closing.arena"):
        arena = HostArena("1MiB", path=path)
        slot = _alloc(arena, 4000)
        view = arena.view(slot, torch.float64, (500,))
        view.copy_(torch.linspace(0, 1, 500, dtype=torch.float64))
        buf = arena.buffer(slot)
        arena.close()
        arena.close()  # idempotent
        assert arena.closed
        assert torch.equal(view, torch.linspace(0, 1, 500, dtype=torch.float64))
        assert bytes(buf[:8]) == view[:1].numpy().tobytes()
        with pytest.raises(StoreClosedError):
            arena.alloc(10)
        del view, buf
        gc.collect()  # the mapping goes with its last view; nothing may crash here


def test_file_is_reserved_kept_and_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "l2.arena"
    with HostArena(MiB, path=path) as arena:
        st = os.stat(path)
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB  # real blocks, not a sparse hole
        slot = _alloc(arena, 5000)
        arena.as_numpy(slot)[:] = 0xAB
    with HostArena(MiB, path=path) as again:  # a fresh allocator hands out the same first slot
        assert again.as_numpy(_alloc(again, 5000)).tobytes() == b"\xab" * 5000
    with open(path, "r+b") as f:
        f.truncate(3 * MiB)
    with HostArena(MiB, path=path):
        assert os.stat(path).st_size == 3 * MiB


def test_full_disk_is_a_clean_store_full_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(StoreFullError) as info:
            HostArena(4 * MiB, path=mnt / "l2.arena")
        assert "no space" in str(info.value)
        assert not (mnt / "l2.arena").exists()  # a file we created is not left half-reserved
        with HostArena(512 * 1024, path=mnt / "small.arena") as arena:
            slot = _alloc(arena, 400_000)
            arena.as_numpy(slot)[:] = 7  # every byte is backed: no SIGBUS
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_stats_report_unpinned_on_cpu_with_a_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the unpinned path is for CPU-only machines")
    with HostArena("1MiB") as arena:
        s = arena.stats()
        assert not arena.pinned and not s.pinned
        assert "CUDA" in arena.pin_reason and s.pin_reason == arena.pin_reason
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        assert s.memlock_limit == (None if soft == resource.RLIM_INFINITY else soft)
        assert s.prefaulted and s.path is None and s.capacity == MiB
        assert s.allocator.capacity == MiB and s.allocator.used == 0
    with HostArena("1MiB", pin=False, prefault=False) as arena:
        s = arena.stats()
        assert "pin=False" in s.pin_reason and not s.locked and not s.prefaulted


def test_prefault_without_madvise_touches_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l2_slab, "_MADV_POPULATE_WRITE", None)  # as on a kernel before 5.14
    with HostArena("1MiB") as arena:
        assert arena.stats().prefaulted
        slot = _alloc(arena, 300_000)
        assert not arena.as_numpy(slot).any()  # touching left the (zero) contents alone


def test_capacity_parsing_and_limits() -> None:
    with HostArena(5000, prefault=False) as arena:
        assert arena.capacity == 4096  # whole pages only
    with pytest.raises(ConfigError):
        HostArena(100)
    with pytest.raises(ConfigError):
        HostArena("lots")


def test_misuse_raises_clear_errors(arena: HostArena) -> None:
    slot = _alloc(arena, 64)
    with pytest.raises(ValueError, match="needs 128 bytes"):
        arena.view(slot, torch.float64, (16,))
    with pytest.raises(ValueError, match="negative"):
        arena.view(slot, torch.float32, (-1,))
    with pytest.raises(UnsupportedTensorError):
        arena.view(slot, torch.qint8, (4,))
    with HostArena("1MiB", prefault=False) as other:
        foreign = _alloc(other, 64)  # same offset and size as `slot`, but another owner
        assert (foreign.offset, foreign.size) == (slot.offset, slot.size)
        with pytest.raises(ValueError, match="not a live allocation"):
            arena.buffer(foreign)
    arena.free(slot)
    with pytest.raises(ValueError, match="not a live allocation"):
        arena.view(slot, torch.uint8, (64,))
    with pytest.raises(ValueError):
        arena.free(slot)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("backed", [False, True], ids=["anonymous", "file"])
def test_close_gives_back_every_page_no_live_view_covers(tmp_path: Path, backed: bool) -> None:
    """A closed arena behind one live 1 MiB view keeps that slot resident, not its 128 MiB mapping."""
    size = 128 << 20
    arena = HostArena(size, path=tmp_path / "l2.bin" if backed else None, pin=False)
    slots = [arena.alloc(1 << 20) for _ in range(4)]
    kept = slots[2]
    assert kept is not None
    arena.as_numpy(kept)[:] = 7
    view = arena.view(kept, torch.uint8, (1 << 20,))
    before = _rss()
    arena.close()
    after = _rss()
    assert before - after >= size - (8 << 20), (before, after)
    assert int(view.sum()) == 7 << 20  # the viewed slot kept its bytes
    del view
    gc.collect()


def test_views_dropped_in_other_threads_leave_the_live_set_exact() -> None:
    """Views die (and their finalizers run) in four threads at once; close keeps exactly the survivors."""
    import threading

    arena = HostArena(16 << 20, pin=False)
    slots = [_alloc(arena, 1 << 16) for _ in range(64)]
    for i, slot in enumerate(slots):
        arena.as_numpy(slot)[:] = i
    views = [[arena.view(s, torch.uint8, (1 << 16,)) for s in slots] for _ in range(4)]
    survivors = [arena.view(slots[i], torch.uint8, (1 << 16,)) for i in (5, 40)]

    def drop(mine: list[torch.Tensor]) -> None:
        while mine:
            mine.pop()

    threads = [threading.Thread(target=drop, args=(v,)) for v in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    arena.close()
    assert [int(v[0]) for v in survivors] == [5, 40]
    assert all(bool((v == v[0]).all()) for v in survivors)
