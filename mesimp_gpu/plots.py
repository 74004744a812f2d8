"""PNG plots drawn from saved history records (matplotlib, headless).

Figures are built as :class:`matplotlib.figure.Figure` objects and rendered by :func:`save_figure`
with the Agg canvas, so no global pyplot backend is chosen and importing this module changes nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mesimp_gpu.io import write_bytes


def new_figure(
    rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6, 4), sharey: bool = False
) -> tuple[Figure, Any]:
    """A figure with a ``rows x columns`` grid of axes (a 2-D array of Axes), not registered with pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, columns, squeeze=False, sharey=sharey)


def save_figure(fig: Figure, path: str | Path) -> None:
    """Render ``fig`` to PNG with the Agg canvas (headless) and write it atomically to ``path``."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def hidden_sizes(history: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Hidden widths per record (``sizes`` without the input and output layers)."""
    return [r["sizes"][1:-1] for r in history]


def draw_dev_accuracy(ax: Axes, runs: dict[str, Sequence[dict[str, Any]]], title: str) -> None:
    """Dev accuracy against update step, one line per labelled history (legend when more than one)."""
    for label, history in runs.items():
        ax.plot([r["step"] for r in history], [r["dev_acc"] for r in history], marker=".", label=label)
    ax.set(xlabel="update step", ylabel="dev accuracy (%)", title=title)
    if len(runs) > 1:
        ax.legend()
    ax.grid(alpha=0.3)


def draw_hidden_sizes(
    ax: Axes, history: Sequence[dict[str, Any]], title: str = "hidden sizes", initial: Sequence[int] | None = None
) -> None:
    """Neurons kept per hidden layer against update step (a step line: sizes change only at prune steps);
    ``initial`` (hidden widths before training) is drawn at step 0."""
    steps, sizes = [r["step"] for r in history], hidden_sizes(history)
    if initial is not None:
        steps, sizes = [0, *steps], [list(initial), *sizes]
    for layer in range(len(sizes[0])):
        ax.plot(steps, [s[layer] for s in sizes], drawstyle="steps-post", label=f"hidden layer {layer + 1}")
    ax.set(xlabel="update step", ylabel="neurons kept", title=title)
    ax.legend()
    ax.grid(alpha=0.3)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Dev accuracy (and hidden sizes, when they change) against training step, side by side in one PNG."""
    if not history:
        return
    sizes = hidden_sizes(history)
    shrinks = any(s != sizes[0] for s in sizes)
    fig, axes = new_figure(1, 2 if shrinks else 1, figsize=(11 if shrinks else 6, 4))
    draw_dev_accuracy(axes[0][0], {title: history}, title)
    if shrinks:
        draw_hidden_sizes(axes[0][1], history)
    save_figure(fig, path)


def plot_simplification(
    runs: dict[str, Sequence[dict[str, Any]]],
    sizes_path: str | Path,
    accuracy_path: str | Path,
    title: str,
    initial: Sequence[int] | None = None,
) -> None:
    """Two PNGs for a meSimp run: hidden sizes of the first history in ``runs`` over training (from
    ``initial`` at step 0), and the dev accuracy of every labelled history in ``runs`` (e.g. meSimp
    and a same-size baseline)."""
    first = next(iter(runs.values()), [])
    if not first:
        return
    fig, axes = new_figure()
    draw_hidden_sizes(axes[0][0], first, f"{title}: hidden sizes", initial)
    save_figure(fig, sizes_path)
    fig, axes = new_figure()
    draw_dev_accuracy(axes[0][0], runs, f"{title}: dev accuracy")
    save_figure(fig, accuracy_path)
