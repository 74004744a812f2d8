"""What machine a run or benchmark ran on: CPU model and instruction set, GPU, software versions, commit.

Every results file carries :func:`describe`'s dictionary. The facts are read once per process
(``/proc/cpuinfo`` is parsed in one place, the git lookup runs once) and shared by the trainers, the
benchmark and the cpu backend, which keys its compiled kernels on :func:`cpu_flags`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: instruction-set extensions worth recording beside a CPU timing (those the fast paths can use)
NOTABLE_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "amx_tile", "asimd", "sve", "sve2")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # one processor is enough: they are alike
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name (``model name``, else the platform's processor or machine name)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``), sorted; empty where unknown."""
    info = _cpuinfo()
    return tuple(sorted((info.get("flags") or info.get("Features") or "").split()))


def instruction_sets() -> list[str]:
    """The :data:`NOTABLE_FLAGS` this CPU has, e.g. ``["avx", "avx2", "fma"]`` on an AVX2 machine."""
    flags = set(cpu_flags())
    return [flag for flag in NOTABLE_FLAGS if flag in flags]


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit when the package runs from a git tree, else None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(module: str) -> str | None:
    """``module.__version__``, or None when the optional package is absent or fails to import."""
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an optional package that fails to import is simply absent
        return None


def package_version() -> str | None:
    """This package's installed version (None when it runs from an uninstalled source tree)."""
    try:
        return importlib.metadata.version("mesimp-gpu")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _static() -> dict[str, Any]:
    """The part of the description that cannot change during a process."""
    return {
        "cpu": cpu_model(),
        "cpu_isa": instruction_sets(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": _version("triton"),
        "cupy": _version("cupy"),
        "mesimp_gpu": package_version(),
        "git_commit": git_commit(),
    }


def describe(device: torch.device | None = None) -> dict[str, Any]:
    """The machine and software versions for a results file; ``device`` adds the GPU when it is CUDA.

    ``torch_threads`` is read at each call: a run may change it.
    """
    info = {**_static(), "torch_threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info
