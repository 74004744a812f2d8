"""Touched-row records: the rows of a weight that backward passes may have made non-zero in its gradient.

With per-example meProp, ``dW`` (``[out, in]``) is zero outside the rows of the kept columns. A layer
that knows this reports the rows with :func:`mark` during its backward pass; a consumer that can use
them (a lazy optimizer, which updates only those rows) first arms a record on the parameter with
:func:`arm` and reads it with :func:`take`, which also re-arms it for the next step. Layers never see
the consumer: they only call :func:`mark`, which does nothing for a parameter nobody armed, so
weights under an ordinary optimizer cost nothing.

Policy:

- a record holds the row tensors of every :func:`mark` since it was armed, by reference (no copy, no
  kernel); they are united only when taken, by the consumer's ``union`` (a backend's compiled one,
  say), or folded into one every :data:`MAX_PENDING` marks, so that many backward passes between two
  steps hold a bounded amount of memory;
- a mark of ``None`` ("every row may be non-zero", a dense backward pass) absorbs the record until it
  is taken;
- :func:`take` returns ``None`` whenever the update must be dense: nothing armed, nothing marked,
  every row marked, or the union covering every row.

A record belongs to the parameter object (held weakly: it dies with it). A Parameter that replaces
another (meSimp's slicing) starts unarmed: its first :func:`take` gives a dense update and arms it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from mesimp_gpu.backends.base import union_rows

#: marks kept before they are folded into one index tensor (bounds memory under many backward passes)
MAX_PENDING = 16

#: merges a record's row tensors (any shapes, int64, in ``[0, n_rows)``) -> sorted unique rows ``[r]``
Union = Callable[[list[Tensor], int], Tensor]


class _Record:
    """The rows marked on one parameter since it was armed; ``every_row`` once a dense pass was marked."""

    __slots__ = ("pending", "every_row")

    def __init__(self) -> None:
        self.pending: list[Tensor] = []
        self.every_row = False


#: parameter -> its record; only armed parameters have one
_records: WeakIdKeyDictionary = WeakIdKeyDictionary()


def arm(param: Tensor) -> None:
    """Start (or restart, empty) the record of ``param``, so that later :func:`mark` calls fill it."""
    _records[param] = _Record()


def mark(weight: Tensor, rows: Tensor | None) -> None:
    """Record that a backward pass wrote ``weight``'s gradient only in ``rows`` of dim 0.

    ``rows``: int64 indices of any shape (e.g. the kept columns ``idx`` ``[B, k]``), repeats allowed;
    ``None`` means every row. Does nothing unless ``weight`` is armed.
    """
    record = _records.get(weight)
    if record is None or record.every_row:
        return
    if rows is None:
        record.every_row, record.pending = True, []
        return
    record.pending.append(rows)
    if len(record.pending) > MAX_PENDING:
        record.pending = [union_rows(record.pending, weight.shape[0])]


def take(param: Tensor, union: Union = union_rows) -> Tensor | None:
    """The sorted unique rows (``[r]`` int64) marked on ``param`` since the last call, or ``None`` for a dense update.

    Arms the record afresh, empty. ``union`` merges the marked tensors (default: the portable
    :func:`~mesimp_gpu.backends.base.union_rows`).
    """
    record = _records.get(param)
    arm(param)  # also arms a parameter that replaced an armed one since the last step
    if record is None or record.every_row or not record.pending:
        return None
    rows = union(record.pending, param.shape[0])
    return None if rows.numel() == param.shape[0] else rows
