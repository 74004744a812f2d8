"""Checkpoints that resume a run exactly: written atomically, loaded with a clear error, RNG states included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp_gpu.io import save_torch


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error when it is missing or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run without --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it or run without --resume") from exc


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash keeps the previous one)."""
    save_torch(path, payload)


def rng_state() -> dict[str, Any]:
    """All random generator states a run depends on."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
