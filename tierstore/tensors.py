"""Keys and tensors: what the store accepts, and the bytes <-> tensor mapping.

A block is stored as its raw little-endian bytes plus ``(dtype, shape)``.
Every fixed-size torch dtype round-trips bit-exactly because nothing here
converts values: tensors are reinterpreted as ``uint8`` and back.
"""

from __future__ import annotations

import math
import mmap
import sys
from typing import Any

import numpy as np
import torch

from .errors import InvalidKeyError, UnsupportedTensorError

__all__ = [
    "MAX_KEY_BYTES",
    "check_key",
    "check_tensor",
    "dtype_name",
    "dtype_from_name",
    "tensor_bytes",
    "copy_bytes",
    "tensor_from_bytes",
    "HUGE_FROM",
    "host_bytes",
]

MAX_KEY_BYTES = 1024

if sys.byteorder != "little":  # pragma: no cover - every supported machine is little-endian
    raise ImportError("tierstore stores little-endian bytes and needs a little-endian host")

_DTYPES: dict[str, torch.dtype] = {}
for _name in (
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
):
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        _DTYPES[_name] = _dt
_NAMES = {dt: name for name, dt in _DTYPES.items()}


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid block key, else raise ``InvalidKeyError``.

    Keys are non-empty ``str`` of at most 1024 UTF-8 bytes without NUL. They
    never name a file, so path separators and ``..`` are ordinary characters.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"keys are str, not {type(key).__name__} ({key!r:.60})")
    if not key:
        raise InvalidKeyError("keys must not be empty")
    if "\x00" in key:
        raise InvalidKeyError(f"keys must not contain NUL: {key!r:.80}", key=key)
    if key.isascii():  # the common case, on every get: no encoding needed to know the size
        size = len(key)
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(f"key {key!r:.80} is not valid Unicode text ({exc.reason})") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is {size} UTF-8 bytes; the limit is {MAX_KEY_BYTES}", key=key[:64])
    return key


def dtype_name(dtype: torch.dtype) -> str:
    """The catalog's name for ``dtype`` (``torch.bfloat16`` -> ``'bfloat16'``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise UnsupportedTensorError(f"dtype {dtype} is not a fixed-size dtype tierstore can store") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise UnsupportedTensorError(f"catalog names dtype {name!r}, which this torch build lacks") from None


def check_tensor(value: Any) -> torch.Tensor:
    """Return ``value`` if the store can keep it, else raise ``UnsupportedTensorError``."""
    if not isinstance(value, torch.Tensor):
        raise UnsupportedTensorError(f"put() takes a torch.Tensor, not {type(value).__name__}")
    if value.is_nested:
        raise UnsupportedTensorError("nested tensors are not supported; store each component")
    if value.layout != torch.strided:
        raise UnsupportedTensorError(f"{value.layout} tensors are not supported; call .to_dense() first")
    if value.is_quantized:
        raise UnsupportedTensorError("quantized tensors are not supported; store int_repr() and the scales")
    if value.is_meta or value.device.type == "meta":
        raise UnsupportedTensorError("meta tensors have no data to store")
    dtype_name(value.dtype)
    return value


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat ``uint8`` array, without a copy when it is contiguous on the CPU."""
    if tensor.device.type != "cpu":
        tensor = tensor.detach().to("cpu")
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy()


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy a contiguous CPU tensor's bytes into ``dst`` (same size); returns ``dst``.

    numpy's copy is a plain memcpy: ~6x faster here than ``Tensor.copy_`` on the same memory.
    """
    if dst.numel():
        np.copyto(tensor_bytes(dst), tensor_bytes(src))
    return dst


def tensor_from_bytes(buf: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``buf`` (a writable buffer of exactly the right size); no copy."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


HUGE_FROM = 4 << 20
"""From this size on, :func:`host_bytes` backs a buffer with transparent huge pages where the OS has them."""
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def host_bytes(nbytes: int) -> np.ndarray:
    """A fresh writable flat ``uint8`` buffer of ``nbytes`` for a large read, huge-page backed where possible.

    Below :data:`HUGE_FROM`, or where ``madvise(MADV_HUGEPAGE)`` is missing (not Linux), this is
    ``np.empty``. Above it, the buffer is its own anonymous mapping marked for transparent huge
    pages (with the usual ``transparent_hugepage=madvise`` setting they are used only where asked
    for). On the virtualised machines measured (BENCHMARKS.md, L3 cold reads) writing into 4 KiB
    pages cost more than the bytes: a copy of 128 MiB out of the page cache took 78-97 ms into
    4 KiB pages and 41-46 ms into huge pages (fewer TLB misses and page faults), and every pass of a
    decode into the buffer gains the same way. The mapping is unmapped when the last array or
    tensor over it is garbage-collected. A ``MemoryError`` when the process cannot map it.
    """
    if nbytes < HUGE_FROM or _HUGEPAGE is None:
        return np.empty(nbytes, dtype=np.uint8)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise MemoryError(f"cannot map {nbytes} bytes: {exc}") from None
    try:
        region.madvise(_HUGEPAGE)
    except OSError:  # transparent huge pages disabled: the mapping still works with small pages
        pass
    return np.frombuffer(region, dtype=np.uint8)
