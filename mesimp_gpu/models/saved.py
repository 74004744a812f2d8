"""Saved models: an architecture file (``model.json``) beside the parameters (``model.pt``).

Every kind of model writes its ``format`` tag, the fields that rebuild it at its current (possibly
meSimp-shrunk) size, its meProp settings and, for the taggers and parsers, its vocabularies. Both
files are written atomically. Loading checks the tag and turns every problem (missing file, bad
JSON, a file of another kind, weights that do not fit) into one error naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from mesimp_gpu.io import save_torch, write_json
from mesimp_gpu.meprop import MePropConfig, MePropMode

MODEL_FILE = "model.json"
WEIGHTS_FILE = "model.pt"

Model = TypeVar("Model", bound=nn.Module)


def meprop_settings(config: MePropConfig) -> dict[str, Any]:
    """``config`` as JSON values."""
    return {**asdict(config), "mode": config.mode.value}


def meprop_config(settings: dict[str, Any]) -> MePropConfig:
    """The inverse of :func:`meprop_settings`."""
    return MePropConfig(**{**settings, "mode": MePropMode(settings["mode"])})


def save_model(model: nn.Module, directory: str | Path, fmt: str, fields: dict[str, Any]) -> Path:
    """Write ``model``'s parameters and ``{format, **fields}`` into ``directory``; returns the JSON path."""
    directory = Path(directory)
    arch = {"format": fmt, **fields, "parameters": sum(p.numel() for p in model.parameters()),
            "weights": WEIGHTS_FILE}
    save_torch(directory / WEIGHTS_FILE, {name: p.detach().cpu() for name, p in model.named_parameters()})
    write_json(directory / MODEL_FILE, arch)
    return directory / MODEL_FILE


def read_architecture(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The architecture dict of a saved model and the JSON file's path (``path``: the ``model.json`` or its
    folder); FileNotFoundError or ValueError naming the file when it is missing or not a model file."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path}: expected the {MODEL_FILE} written by a training run "
                                "(a run writes it at its first dev evaluation)")
    try:
        arch = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(arch, dict):
        raise ValueError(f"{path} is not a model file of this package (a JSON object with a format tag)")
    return arch, path


def load_model(
    path: str | Path, fmt: str, kind: str, build: Callable[[dict[str, Any]], Model], device: torch.device | str
) -> tuple[Model, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` with format ``fmt`` -> ``(model on device, architecture)``.

    ``path`` is the ``model.json`` or its folder; ``kind`` names the model in messages (e.g. "an MLP");
    ``build`` makes the model from the architecture dict. FileNotFoundError or ValueError name the file.
    """
    arch, path = read_architecture(path)
    if arch.get("format") != fmt:
        raise ValueError(f"{path} is not {kind} architecture file (format {fmt!r} expected)")
    try:
        model = build(arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} does not describe {kind} ({exc!r})") from exc
    weights = path.parent / arch.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights} (named by {path})")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or mismatched file
        raise ValueError(f"weights {weights} are unreadable or do not fit the architecture in {path} ({exc})") from exc
    return model.to(device), arch
