"""Fresh host buffers for large reads: exact size, writable, independent, huge-page backed where the OS has it.

``host_bytes`` is what an L3 read decodes into (``Mover.read_l3``), so a large ``get`` from L3 must
return the right bytes in such a buffer, from several threads at once, and the buffer must go away
with the last tensor over it.
"""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.tensors import HUGE_FROM, host_bytes, tensor_from_bytes

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not _THP.exists()
                         or "[never]" in _THP.read_text(), reason="needs Linux with transparent huge pages")


def mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping holding ``address`` (None: no mapping holds it)."""
    found: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if found is not None:
                return found
            found = {} if lo <= address < hi else None
        elif found is not None:
            name, _, value = line.partition(":")
            found[name] = value.strip()
    return found


@pytest.mark.parametrize("nbytes", [0, 1, 4097, HUGE_FROM - 1, HUGE_FROM, HUGE_FROM + 12_345])
def test_buffers_have_the_exact_size_are_writable_and_independent(nbytes: int) -> None:
    a, b = host_bytes(nbytes), host_bytes(nbytes)
    assert a.dtype == np.uint8 and a.shape == (nbytes,) and a.flags.writeable and a.flags.c_contiguous
    if nbytes:
        a[:] = 7
        b[:] = 9
        assert int(a.min()) == int(a.max()) == 7 and int(b[-1]) == 9
        tensor = tensor_from_bytes(a, torch.uint8, (nbytes,))  # no copy: the tensor is the buffer
        tensor[-1] = 3
        assert int(a[-1]) == 3


@thp
def test_a_large_buffer_is_its_own_mapping_marked_for_huge_pages_and_goes_with_its_last_tensor() -> None:
    buf = host_bytes(HUGE_FROM + 12_345)
    address = buf.ctypes.data
    fields = mapping_of(address)
    assert fields is not None and fields["THPeligible"] == "1"
    tensor = tensor_from_bytes(buf, torch.uint8, (buf.nbytes,))
    del buf
    gc.collect()
    assert mapping_of(address) is not None  # the tensor keeps it
    tensor.fill_(1)
    del tensor
    gc.collect()
    assert mapping_of(address) is None


@thp
def test_large_gets_from_l3_come_back_right_in_huge_page_memory_from_several_threads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn((2100 + 17 * i, 1024), generator=g).to(torch.bfloat16) for i in range(4)}
    tensors["raw"] = torch.randint(0, 255, (HUGE_FROM + 3,), generator=g, dtype=torch.uint8)
    with tierstore.open(tmp_path / "s", l2_cache_size=0) as db, db.transaction():
        for key, value in tensors.items():
            db.put(key, value)
    errors: list[BaseException] = []
    start = threading.Barrier(4)
    with tierstore.open(tmp_path / "s", l2_cache_size=0, readonly=True) as db:
        def read(seed: int) -> None:
            try:
                start.wait()
                for key in list(tensors)[seed:] + list(tensors)[:seed]:
                    got = db.get(key)
                    assert torch.equal(got.view(torch.uint8), tensors[key].view(torch.uint8)), key
                    fields = mapping_of(got.data_ptr())
                    assert fields is not None and fields["THPeligible"] == "1", key
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
