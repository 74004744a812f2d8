"""meSimp: model simplification by meProp hit records, with real (not masked) pruning.

Every meProp hidden layer built with ``track_hits`` keeps, per output neuron, ``hits[j]`` (how
often ``j`` was in an example's top-k set) and ``refer`` (examples seen); see
:class:`~mesimp_gpu.meprop.MePropLinear`. A prune step removes, for good, every neuron with
``hits[j] < floor(refer * p)`` and resets the record. "Removes" means the layer's weight rows and
bias entries, the next layer's input columns and the optimizer state of all of them are sliced
away (:meth:`~mesimp_gpu.meprop.MePropLinear.prune_outputs_`,
:meth:`~mesimp_gpu.lstm.MePropLSTM.prune_units_`): parameter count, memory and the cost of the
forward and backward passes all fall, and the network computes exactly what the masked network
would (a pruned neuron contributed nothing through the next layer's deleted column).

Live columns versus the reference's masks. The reference keeps all ``out`` columns and gives a
pruned column ``G = 0``; its top-k runs over all columns. Here the pruned columns no longer exist,
so the top-k runs over the live columns only. The training step is the same either way: a pruned
column can only be picked with ``G = 0``, which adds nothing to ``dx`` or ``dW``. The hit records
differ in one corner: where an example has fewer than ``k`` non-zero live entries, the reference
fills its set with zero columns by lowest index, pruned ones included, while here only live zero
columns fill it. So live hits here are at least the reference's, and equal whenever every example
has ``k`` non-zero live entries. Both stop pruning once a layer has at most ``k`` neurons (here
exactly: ``k >= width`` is dense, so every neuron is hit by every example). With the
``nonzero_hits`` switch (count only selected entries with ``G != 0``) the two agree exactly, and
pruning can go on below ``k``.

Schedule (the reference's, in epochs): cycles of ``cycle`` epochs. In even cycles (epochs
``0 .. cycle-1``, ``2*cycle .. 3*cycle-1``, ...) a prune step follows every chunk of training; in odd
cycles the sizes stay fixed while the record keeps counting, so the first prune step of the next
even cycle judges the whole odd cycle plus one chunk (as the reference's record does). Adam's
moments (``m`` and ``v``, not the step count) are reset at every cycle boundary: after the last chunk
of each cycle, the final one included, so that a run resumed with more epochs continues exactly as
an uninterrupted one. ``cycle = 0`` prunes after every chunk of every epoch.

Two deliberate differences from the reference's C# loop (``Mnist.cs``): it scores dev (and test) and
*then* prunes, so its reported score can belong to a network that is pruned right after; here the
prune step runs before the chunk's evaluation, so every score belongs to the network as it then
exists. And it re-initialises Adam after *every* chunk of the last epoch of a cycle (its test is
per epoch, inside the chunk loop); here the moments are reset once, at the boundary, as the paper
describes, unless :attr:`MomentReset.LAST_EPOCH` asks for the C# behaviour.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from mesimp_gpu.optim import reset_moments


class MomentReset(str, enum.Enum):
    """When meSimp zeroes Adam's moments ``m`` and ``v`` (never the step count ``t``)."""

    CYCLE = "cycle"  # once, after the last chunk of each cycle (the paper)
    LAST_EPOCH = "last-epoch"  # after every chunk of each cycle's last epoch (what the C# loop does)
    NONE = "none"  # never


def check_threshold(threshold: float) -> None:
    """Raise ValueError unless the prune threshold ``p`` lies in ``[0, 1)``."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"prune threshold must be in [0, 1), got {threshold}")


def prune_mask(hits: Tensor, refer: int, threshold: float) -> Tensor:
    """Neurons that survive a prune step: ``hits`` ``[out]`` -> ``[out]`` bool, ``hits >= floor(refer * p)``.

    At least the most-hit neuron always survives, so a layer never disappears.
    """
    check_threshold(threshold)
    keep = hits >= math.floor(refer * threshold)
    if not bool(keep.any()):
        keep[int(hits.argmax())] = True
    return keep


def prunes_in(epoch: int, cycle: int) -> bool:
    """Whether meSimp prunes during ``epoch`` (0-based): in even cycles of ``cycle`` epochs; always if ``cycle`` is 0."""
    return cycle == 0 or (epoch // cycle) % 2 == 0


def ends_cycle(epoch: int, cycle: int) -> bool:
    """Whether ``epoch`` (0-based) is the last epoch of a cycle (moments reset after it); never if ``cycle`` is 0."""
    return cycle > 0 and (epoch + 1) % cycle == 0


class Prunable(Protocol):
    """A model meSimp can shrink: every model with hit records (MLP, tagger, parser) offers this call."""

    def mesimp_prune_(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Delete the neurons with ``hits < floor(refer * threshold)`` for good (optimizer state too), reset
        the records, and return the new hidden sizes."""


@dataclass(frozen=True)
class MesimpSchedule:
    """The meSimp schedule every trainer runs between a piece of training and its evaluation.

    In pruning epochs a prune step follows every piece; at a cycle's end Adam's moments are reset (see
    the module docstring for the cycle rule and :class:`MomentReset` for when). The hit records travel
    in the model's checkpoint, so a resumed run prunes exactly as an uninterrupted one.
    """

    threshold: float = 0.1  # remove neurons with hits < floor(refer * threshold), in [0, 1)
    cycle: int = 5  # epochs per cycle; prune in even cycles; 0: prune after every piece of every epoch
    reset_moments: MomentReset = MomentReset.CYCLE  # when Adam's m and v (not t) are zeroed

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.cycle < 0:
            raise ValueError(f"cycle must be at least 0, got {self.cycle}")
        object.__setattr__(self, "reset_moments", MomentReset(self.reset_moments))

    def resets_moments(self, epoch: int, last_piece: bool) -> bool:
        """Whether the moments are reset after a piece of ``epoch`` (``last_piece``: the epoch's last one)."""
        if not ends_cycle(epoch, self.cycle):
            return False
        return self.reset_moments is MomentReset.LAST_EPOCH or (self.reset_moments is MomentReset.CYCLE and last_piece)

    def after_piece(
        self, model: Prunable, optimizer: torch.optim.Optimizer, epoch: int, last_piece: bool
    ) -> dict[str, Any]:
        """Prune in pruning epochs, reset moments at a cycle's end; returns the fields for the history record."""
        record: dict[str, Any] = {"pruned": prunes_in(epoch, self.cycle), "moments_reset": False}
        start = time.perf_counter()
        if record["pruned"]:
            model.mesimp_prune_(self.threshold, optimizer)
        record["prune_seconds"] = time.perf_counter() - start
        if self.resets_moments(epoch, last_piece):
            reset_moments(optimizer)
            record["moments_reset"] = True
        return record
