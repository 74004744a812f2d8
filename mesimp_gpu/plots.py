"""PNG plots drawn from saved history records (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from mesimp_gpu.io import write_bytes  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Render ``fig`` to PNG and write it atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Dev accuracy (and hidden sizes, when they change) against training step."""
    if not history:
        return
    steps = [r["step"] for r in history]
    sizes = [r["sizes"][1:-1] for r in history]
    shrinks = any(s != sizes[0] for s in sizes)
    fig, axes = plt.subplots(1, 2 if shrinks else 1, figsize=(11 if shrinks else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["dev_acc"] for r in history], marker=".")
    ax.set(xlabel="update step", ylabel="dev accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if shrinks:
        ax = axes[0][1]
        for layer in range(len(sizes[0])):
            ax.plot(steps, [s[layer] for s in sizes], label=f"hidden layer {layer + 1}")
        ax.set(xlabel="update step", ylabel="neurons kept", title="hidden sizes")
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, path)
