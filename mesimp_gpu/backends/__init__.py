"""Backend registry: one place that turns a name (``--backend``) into a :class:`Backend`.

Backends are imported lazily, so a missing optional dependency (Triton, CuPy, a compiler) only
matters when that backend is asked for. A backend asked for by name that cannot load raises
:class:`BackendUnavailable` with the reason; ``auto`` walks a preference list for the device and
logs why it skipped each unavailable entry.

Every outcome is cached for the process: a backend is imported and constructed (its compiler probed,
its kernels built) at most once, a failure is remembered and re-raised without a second attempt, and
``auto`` logs each skipped backend's reason once. Callers still resolve once and keep the result
(the layers do, per device), since even a cached look-up costs a few dictionary probes per call.
"""

from __future__ import annotations

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

#: backends that take a build variant after ``@``: ``cpu@x86-64-v3`` is the cpu backend built for that
#: instruction-set level (``cpu`` alone: the level of ``MESIMP_CPU_ARCH``), so that levels run side by side
VARIANT_BACKENDS = ("cpu",)


def split_name(name: str) -> tuple[str, str | None]:
    """``"cpu@x86-64-v3"`` -> ``("cpu", "x86-64-v3")``; a name without ``@`` has no variant (None)."""
    base, at, variant = name.partition("@")
    return base, (variant if at else None)


def is_backend_name(name: str) -> bool:
    """Whether ``name`` is ``auto``, a registered backend, or a variant of one that takes variants."""
    base, variant = split_name(name)
    return name == "auto" or name in REGISTRY or (bool(variant) and base in VARIANT_BACKENDS)


class BackendUnavailable(RuntimeError):
    """A backend exists but cannot run here (missing package, compiler or device)."""


#: name -> the loaded backend, or why it cannot load (tried once per process)
_loaded: dict[str, Backend | BackendUnavailable] = {}
#: device type -> the backend ``auto`` chose there
_auto: dict[str, Backend] = {}
#: backends whose failure ``auto`` has logged
_warned: set[str] = set()


def _instantiate(name: str) -> Backend | BackendUnavailable:
    """Import and construct backend ``name`` (a variant is the constructor's argument); its
    :class:`BackendUnavailable` is returned, not raised."""
    base, variant = split_name(name)
    module_name, class_name = REGISTRY[base]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)(*([] if variant is None else [variant]))
    except BackendUnavailable as exc:
        return exc
    except ImportError as exc:
        failure = BackendUnavailable(f"backend {name!r} cannot load: {exc}")
        failure.__cause__ = exc
        return failure


def load_backend(name: str) -> Backend:
    """The backend registered as ``name`` (loaded once); raise :class:`BackendUnavailable` if it cannot load."""
    if name == "auto" or not is_backend_name(name):
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    outcome = _loaded.get(name)
    if outcome is None:
        outcome = _loaded[name] = _instantiate(name)
    if isinstance(outcome, BackendUnavailable):
        raise outcome.with_traceback(None)  # the same reason every time, without piling up tracebacks
    return outcome


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """Return the backend called ``name``; ``auto`` picks the first available for ``device``'s type."""
    if name != "auto":
        return load_backend(name)
    device_type = torch.device(device).type
    chosen = _auto.get(device_type)
    if chosen is None:
        chosen = _auto[device_type] = _choose_auto(device_type)
    return chosen


def _choose_auto(device_type: str) -> Backend:
    """The first backend of ``AUTO_ORDER[device_type]`` that loads; logs (once each) why those before it did not."""
    for candidate in AUTO_ORDER.get(device_type, ("torch",)):
        if candidate not in REGISTRY:
            continue
        try:
            backend = load_backend(candidate)
        except BackendUnavailable as exc:
            if candidate not in _warned:
                _warned.add(candidate)
                log.warning("backend auto: skipping %s (%s)", candidate, exc)
            continue
        log.info("backend auto: using %s on %s", candidate, device_type)
        return backend
    return load_backend("torch")


class BackendCache:
    """What a backend name resolves to, per device: resolved on first use and kept, for one owner (a layer,
    an optimizer) that must not look its backend up on every call.

    Asking for another name drops everything resolved for the previous one. The cache is no state of its
    owner: a copy or an unpickled owner starts empty and resolves again where it runs (a model pickled
    on a GPU machine still loads where Triton is missing).
    """

    def __init__(self) -> None:
        self._name: str | None = None
        self._by_device: dict[torch.device, Backend] = {}

    def resolve(self, name: str, device: torch.device) -> Backend:
        """:func:`get_backend` ``(name, device)``, looked up only the first time for this name and device."""
        if name != self._name:
            self._name, self._by_device = name, {}
        backend = self._by_device.get(device)
        if backend is None:
            backend = self._by_device[device] = get_backend(name, device)
        return backend

    def __reduce__(self) -> tuple[type[BackendCache], tuple[()]]:
        return (BackendCache, ())


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendCache",
    "BackendUnavailable",
    "InvalidGradientError",
    "REGISTRY",
    "get_backend",
    "is_backend_name",
    "load_backend",
    "split_name",
]
