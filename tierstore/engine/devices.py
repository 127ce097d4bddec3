"""Devices a handle may place tensors on, checked before torch is asked (torch fails late and oddly)."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InvalidArgumentError

__all__ = ["l1_device", "parse_device", "usable_device"]


def parse_device(device: object) -> torch.device:
    """``device`` as a ``torch.device``, or ``InvalidArgumentError`` naming what was wrong with it."""
    try:
        parsed: torch.device = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"not a device: {device!r} ({str(exc).splitlines()[0]})") from None
    return parsed


def usable_device(device: object) -> torch.device:
    """``device`` parsed, if this process can hold a tensor's data there, else ``InvalidArgumentError``.

    Checked up front because torch reports an absent backend as an AssertionError (CUDA on a
    CPU-only build) or a NotImplementedError (``xla``), and ``meta`` would return a tensor with no data.
    """
    parsed = device if isinstance(device, torch.device) else parse_device(device)
    why = _device_problem(parsed)
    if why is not None:
        raise InvalidArgumentError(f"device {str(parsed)!r}: {why}; use 'cpu' or leave device=None")
    return parsed


def _device_problem(device: torch.device) -> str | None:
    """Why a tensor cannot be placed on ``device`` in this process (None if it can)."""
    kind = device.type
    if kind == "cpu":
        return None
    if kind == "meta":
        return "a meta tensor holds no data"
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        return f"this torch build has no usable {kind!r} backend here"
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        return f"there is no {kind} device {device.index} (this process sees {count()})"
    return None


def l1_device(name: str) -> torch.device:
    """The L1 pool's device from ``l1_device``, or ``ConfigError`` when this machine has none such."""
    device = torch.device(name)  # CacheConfig admits only 'cpu', 'cuda' and 'cuda:N'
    why = _device_problem(device)
    if why is not None:
        raise ConfigError(f"l1_device={name!r}: {why}; open with l1_device=None (the first GPU, if any), "
                          "'cpu' or l1_cache_size=0 (no L1)", tier="L1")
    return device
