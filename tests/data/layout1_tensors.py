"""The tensors of ``tests/data/layout1_store``: a store written by tierstore's L3 layout 1.

``python tests/data/layout1_tensors.py OUT`` with a tierstore of layout 1 on the path (the code
before layout 2) wrote that store; ``tests/test_zarr_compat.py`` reads it with today's code.
"""

from __future__ import annotations

import sys

import torch


def tensors() -> dict[str, torch.Tensor]:
    """Small (packed) and large blocks of several codecs, deterministic and mostly compressible."""
    g = torch.Generator().manual_seed(17)
    ramp = torch.arange(200_000, dtype=torch.float32).remainder(251)
    return {
        "w/bf16": torch.randn(64, 32, generator=g).to(torch.bfloat16),  # one granule, shuffle2-zstd1
        "w/fp32": torch.randn(3000, generator=g),  # three granules, shuffle4-zstd1 or raw
        "w/int8": torch.arange(5000, dtype=torch.int64).remainder(7).to(torch.int8),  # zstd1
        "w/bool": torch.arange(100).remainder(3) == 0,
        "w/empty": torch.empty(0, 4, dtype=torch.float16),
        "w/large-bf16": ramp.reshape(400, 500).to(torch.bfloat16),  # an array of its own
        "w/large-fp32": ramp.reshape(2, 100_000),
        "w/after-gap": torch.full((7, 7), 3.5, dtype=torch.bfloat16),  # after a deleted neighbour
    }


def main(out: str) -> None:
    import tierstore

    with tierstore.open(out, l2_cache_size=0, l1_cache_size=0) as db:
        data = tensors()
        for key, value in data.items():
            if key == "w/after-gap":
                db.put("w/deleted", torch.ones(900, dtype=torch.bfloat16))
                db.delete("w/deleted")
            db.put(key, value)


if __name__ == "__main__":
    main(sys.argv[1])
