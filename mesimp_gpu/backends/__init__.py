"""Backend registry: one place that turns a name (``--backend``) into a :class:`Backend`.

Backends are imported lazily, so a missing optional dependency (Triton, CuPy, a compiler) only
matters when that backend is asked for. A backend asked for by name that cannot load raises
:class:`BackendUnavailable` with the reason; ``auto`` walks a preference list for the device and
logs why it skipped each unavailable entry.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from mesimp_gpu.backends.base import Backend, InvalidGradientError

log = logging.getLogger(__name__)

#: name -> (module, class). Each module may raise BackendUnavailable on import or construction.
REGISTRY: dict[str, tuple[str, str]] = {
    "reference": ("mesimp_gpu.backends.reference", "ReferenceBackend"),
    "torch": ("mesimp_gpu.backends.torch_backend", "TorchBackend"),
    "cpu": ("mesimp_gpu.backends.cpu", "CpuBackend"),
    "triton": ("mesimp_gpu.backends.triton_backend", "TritonBackend"),
    "cupy": ("mesimp_gpu.backends.cupy_backend", "CupyBackend"),
}

#: the order ``auto`` tries, per device type; the first that loads wins
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cupy", "torch"),
    "cpu": ("cpu", "torch"),
}

BACKEND_NAMES = ("auto", *REGISTRY)


class BackendUnavailable(RuntimeError):
    """A backend exists but cannot run here (missing package, compiler or device)."""


@functools.cache
def load_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name`` (cached); raise :class:`BackendUnavailable` if it cannot load."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    module_name, class_name = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)()
    except BackendUnavailable:
        raise
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot load: {exc}") from exc


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """Return the backend called ``name``; ``auto`` picks the first available for ``device``."""
    if name != "auto":
        return load_backend(name)
    device_type = torch.device(device).type
    for candidate in AUTO_ORDER.get(device_type, ("torch",)):
        if candidate not in REGISTRY:
            continue
        try:
            backend = load_backend(candidate)
        except BackendUnavailable as exc:
            log.warning("backend auto: skipping %s (%s)", candidate, exc)
            continue
        log.info("backend auto: using %s on %s", candidate, device_type)
        return backend
    return load_backend("torch")


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailable",
    "InvalidGradientError",
    "REGISTRY",
    "get_backend",
    "load_backend",
]
