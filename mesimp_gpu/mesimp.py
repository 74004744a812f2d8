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
so the top-k of the backward pass runs over the live columns only. The training step is the same
either way: a pruned column can only be picked with ``G = 0``, which adds nothing to ``dx`` or
``dW``. Only the hit records can differ, where an example has fewer than ``k`` non-zero entries;
:class:`HitRule` names the three ways of counting:

- ``kept`` (default): every index of the live top-k set is a hit; leftover slots go to the lowest
  live zero columns, and once a layer is no wider than ``k`` every neuron is hit by every example,
  so pruning stops at ``k``.
- ``nonzero``: only kept entries with ``G != 0`` count; pruning can go below ``k``.
- ``reference``: the C#'s count (:func:`reference_hits`). Its heap (``TopNHeap.GetAbsTop``) runs
  over the original width with pruned columns as zeros, is seeded with columns ``0..k-1`` and takes
  a later column only for a strictly larger magnitude. So the leftover slots of a row with fewer
  than ``k`` non-zero entries fall on zero columns among original positions ``0..k-1`` (pruned or
  live), a live neuron at position ``k`` or above is hit only with ``G != 0``, and the layer can
  shrink below ``k`` (the reference ends MNIST at about 147/142 with ``k = 160``).

Schedule (the reference's, in epochs): cycles of ``cycle`` epochs. In even cycles (epochs
``0 .. cycle-1``, ``2*cycle .. 3*cycle-1``, ...) a prune step follows every chunk of training; in odd
cycles the sizes stay fixed while the record keeps counting, so the first prune step of the next
even cycle judges the whole odd cycle plus one chunk (as the reference's record does). Adam's
moments (``m`` and ``v``, not the step count) are reset at every cycle boundary: after the last chunk
of each cycle, the final one included, so that a run resumed with more epochs continues exactly as
an uninterrupted one. ``cycle = 0`` prunes after every chunk of every epoch.

Two defaults differ from the reference's C# loop (``Mnist.cs``), each with a switch for the C#
behaviour: it scores dev (and test) and *then* prunes, so its reported score can belong to a network
that is pruned right after; here the prune step runs before the chunk's evaluation, so every score
belongs to the network as it then exists (:attr:`PruneOrder.EVALUATE_FIRST` is the C# order). And it
re-initialises Adam after *every* chunk of the last epoch of a cycle (its test is per epoch, inside
the chunk loop); here the moments are reset once, at the boundary, as the paper describes
(:attr:`MomentReset.LAST_EPOCH` is the C# behaviour).
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
    # as last-epoch, but only where a later cycle of the run still prunes: the bursts of large Adam steps
    # after a reset silence neurons that the following prune steps remove; in the last pruning cycle and
    # after it they cost the network the run ends with more accuracy than they save neurons
    BEFORE_PRUNING = "before-pruning"
    NONE = "none"  # never


class PruneOrder(str, enum.Enum):
    """Whether a piece's prune step runs before its evaluation (every score belongs to a network that
    exists afterwards) or after it (the C#: the score can belong to the network pruned right after)."""

    PRUNE_FIRST = "prune-first"
    EVALUATE_FIRST = "evaluate-first"


class HitRule(str, enum.Enum):
    """Which kept entries of an example's top-k set count as hits of their neurons (see the module docstring)."""

    KEPT = "kept"  # every kept index over the live columns, zeros included
    NONZERO = "nonzero"  # only kept entries with a non-zero gradient
    REFERENCE = "reference"  # the C# heap over the original width, pruned columns as zeros; live picks count


def reference_hits(g: Tensor, columns: Tensor, k: int) -> Tensor:
    """Hits per live neuron of one backward pass under the reference's selection -> ``[w]`` int64.

    ``g`` ``[B, w]`` is the output gradient of the live columns, ``columns`` ``[w]`` their original
    positions (ascending, as pruning keeps the order); the pruned positions of the original width are
    zeros. Per row, the selection is the ``k`` largest magnitudes of the original row, ties to the
    lower original position: every entry above the row's ``k``-th largest magnitude ``v``, then the
    lowest positions among the entries equal to ``v``. Where a row has fewer than ``k`` non-zero
    entries, ``v = 0`` and the leftover slots are the lowest zero positions of the original row, all
    among ``0..k-1``, pruned ones included; only live picks are returned.

    This is the C# heap's set (seeded with ``0..k-1``, replaced only by a strictly larger magnitude)
    for every entry whose magnitude is not ``v``, and it picks as many entries equal to ``v`` as the
    heap does. Which of the tied entries the heap keeps depends on its internal order (for ``v = 0``:
    which seed zeros a replacement evicts); this rule keeps the lowest positions instead. Computed on
    the live columns only (``[B, w]`` work, no loop over rows): the rank of a live zero among the
    original row's zeros is its position minus the non-zero entries before it.
    """
    if g.dim() != 2 or columns.shape != (g.shape[1],):
        raise ValueError(f"reference_hits needs g [B, w] and columns [w], got {tuple(g.shape)} and "
                         f"{tuple(columns.shape)}")
    batch, width = g.shape
    a = g.detach().abs()
    nonzero = a != 0
    count = nonzero.sum(dim=1, keepdim=True)  # (B, 1)
    if width >= k:
        kth = a.topk(k, dim=1).values[:, -1:]  # (B, 1) k-th largest live magnitude
    else:
        kth = a.new_zeros(batch, 1)
    v = torch.where(count >= k, kth, torch.zeros_like(kth))  # the original row's k-th largest magnitude
    above = a > v
    need = k - above.sum(dim=1, keepdim=True)  # slots left for entries equal to v
    tied = a == v
    # 1-based rank of a tied entry among the original row's entries equal to v, by position: for v > 0
    # only live columns can tie; for v = 0 the pruned positions before it are zeros too
    rank = torch.where(v > 0, tied.cumsum(dim=1), columns.to(g.device) + 1 - nonzero.cumsum(dim=1))
    picked = above | (tied & (rank <= need))
    return picked.sum(dim=0)


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
    order: PruneOrder = PruneOrder.PRUNE_FIRST  # prune before a piece's evaluation, or after it (the C#)
    epochs: int | None = None  # the run's length (before-pruning resets need it); None: unbounded

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.cycle < 0:
            raise ValueError(f"cycle must be at least 0, got {self.cycle}")
        object.__setattr__(self, "reset_moments", MomentReset(self.reset_moments))
        object.__setattr__(self, "order", PruneOrder(self.order))

    def resets_moments(self, epoch: int, last_piece: bool) -> bool:
        """Whether the moments are reset after a piece of ``epoch`` (``last_piece``: the epoch's last one)."""
        if not ends_cycle(epoch, self.cycle):
            return False
        if self.reset_moments is MomentReset.BEFORE_PRUNING:
            # epoch + 1 starts the next cycle; a pruning cycle follows within the run (the one after the next
            # prunes when the next does not, so an unbounded run always has one)
            following = range(epoch + 1, epoch + 1 + 2 * self.cycle if self.epochs is None else self.epochs)
            return any(prunes_in(e, self.cycle) for e in following)
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
