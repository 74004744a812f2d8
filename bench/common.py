"""Pieces every suite shares: which backends run on the device, result rows, correctness checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mesimp_gpu.backends import AUTO_ORDER, REGISTRY, Backend, BackendUnavailable, load_backend
from mesimp_gpu.bench.config import Provider, Suite
from mesimp_gpu.bench.timing import Stats

#: the oracle every timed result is checked against; it is never timed itself
ORACLE = "reference"

#: largest accepted relative error (max |actual - expected| / max |expected|) per dtype
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-10}


def available_backends(device: torch.device) -> tuple[dict[str, Backend], dict[str, str]]:
    """Backends that run natively on ``device`` -> (loaded backends by name, skipped ones with the reason).

    A backend is native to a device when ``auto`` would consider it there (``AUTO_ORDER``): Triton's
    CPU interpreter and the cpu backend's fallback on CUDA tensors would time something else.
    """
    native = AUTO_ORDER.get(device.type, ("torch",))
    loaded: dict[str, Backend] = {}
    skipped: dict[str, str] = {}
    for name in REGISTRY:
        if name == ORACLE:
            continue
        if name not in native:
            skipped[name] = f"not a {device.type} backend (runs on {_devices_of(name)} tensors)"
            continue
        try:
            loaded[name] = load_backend(name)
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
    return loaded, skipped


def _devices_of(name: str) -> str:
    """The device types whose ``auto`` order lists backend ``name``."""
    return " or ".join(kind for kind, names in AUTO_ORDER.items() if name in names) or "other"


def label(provider: Provider, backend: str | None) -> str:
    """Display name of a provider, e.g. ``meprop-topk[cpu]``."""
    return f"{provider.value}[{backend}]" if backend else provider.value


def row(suite: Suite, provider: Provider, backend: str | None, **fields: Any) -> dict[str, Any]:
    """A result row: what was measured (suite, provider, backend) and the given fields."""
    return {"suite": suite.value, "provider": provider.value, "backend": backend,
            "label": label(provider, backend), **fields}


def timed_fields(stats: Stats, baseline: Stats) -> dict[str, Any]:
    """The timing fields of a row: median and spread in seconds, repeats, speedup over ``baseline``."""
    return {"status": "ok", "median_s": stats.median, "p20_s": stats.p20, "p80_s": stats.p80,
            "repeats": stats.repeats, "inner": stats.inner, "speedup": baseline.median / stats.median}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (0 when both are zero)."""
    expected = expected.double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((actual.double() - expected).abs().max()) if expected.numel() else 0.0
    return diff / scale if scale else diff


def check_fields(error: float, tolerance: float) -> dict[str, Any]:
    """The correctness fields of a row: the error and whether it is within ``tolerance``."""
    return {"max_error": error, "check_passed": bool(error <= tolerance)}
