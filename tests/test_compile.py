"""torch.compile: the meProp operators' registrations, and the MLP and the tagger compiled with
``fullgraph=True`` (no graph break) training as they do in eager mode, meSimp hit records included.

Compiles take tens of seconds on a small CPU, so there are two, on tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from mesimp_gpu.data.conllu import EncodedSentence, make_batch
from mesimp_gpu.lstm import GateSelection, lstm_backward_op, lstm_op
from mesimp_gpu.meprop import MePropConfig, MePropMode, linear_backward_op, linear_op
from mesimp_gpu.models.mlp import MLP
from mesimp_gpu.models.tagger import Tagger
from reference import assert_close_to_reference


def opcheck(op, args: tuple) -> None:
    """``torch.library.opcheck``: schema (declared mutations), autograd registration, fake implementation
    and AOT dispatch of ``op`` on ``args``."""
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("mode", ["topk", "unified", "dense"])
def test_operators_pass_opcheck(mode: str) -> None:
    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((5, 7), (6, 7), (6,)))
    hits = torch.zeros(6, dtype=torch.long)
    opcheck(linear_op, (x, w, b, hits, None, mode, 2, "torch", True, False))
    opcheck(linear_op, (x, w, None, None, torch.bfloat16, mode, 2, "torch", False, True))
    opcheck(linear_backward_op, (torch.randn(5, 6), x.detach(), w.detach(), hits, None, mode, 2, "torch", False,
                                 False, True, False, True))
    xs, w_ih, w_hh, bias = (torch.randn(*shape, requires_grad=True) for shape in ((4, 3, 5), (8, 5), (8, 2), (8,)))
    mask = torch.tensor([[True, True, True]] * 3 + [[True, False, True]])
    settings = (False, mode, 1, "torch", False, False, GateSelection.PER_GATE.value, "any")
    opcheck(lstm_op, (xs, mask, w_ih, w_hh, bias, torch.zeros(2, dtype=torch.long), None, *settings))
    saved = [t.detach() for t in lstm_op(xs, mask, w_ih, w_hh, bias, None, None, *settings)[1:]]
    opcheck(lstm_backward_op, (torch.randn(4, 3, 2), xs.detach(), mask, w_ih.detach(), w_hh.detach(), *saved,
                               torch.zeros(2, dtype=torch.long), None, *settings, True, True, False))


def train_twice(model: nn.Module, loss) -> list[Tensor]:
    """Two backward passes of ``loss(model)``; returns the accumulated parameter gradients."""
    for _ in range(2):
        loss(model).backward()
    return [p.grad for p in model.parameters()]


def assert_same_training(eager: nn.Module, compiled: nn.Module, loss, records) -> None:
    """``compiled`` (``torch.compile`` of an identical copy of ``eager``) gives the eager gradients and meSimp
    records: ``records(model)`` lists them (hits tensors and refer counts). The compiled module forwards
    attribute access to the module it compiled."""
    want = train_twice(eager, loss)
    got = train_twice(compiled, loss)
    for a, b in zip(got, want, strict=True):  # inductor fuses the ops around the meProp operators its own way
        assert_close_to_reference(a, b, torch.float32)
    for a, b in zip(records(compiled), records(eager), strict=True):
        assert (a.tolist() if isinstance(a, Tensor) else a) == (b.tolist() if isinstance(b, Tensor) else b)


@pytest.mark.slow
def test_compiled_mlp_trains_as_eager(seed: int) -> None:
    torch._dynamo.reset()
    eager = MLP([12, 9, 7, 3], MePropConfig(MePropMode.TOPK, 3, "auto"), track_hits=True)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)  # fullgraph: a graph break is an error
    x, target = torch.randn(5, 12), torch.randint(0, 3, (5,))

    assert_same_training(
        eager, compiled, lambda model: nn.functional.cross_entropy(model(x), target),
        lambda model: [record for layer in model.hidden for record in (layer.hits, layer.refer)],
    )
    assert compiled.hidden[0].refer == 10


@pytest.mark.slow
def test_compiled_tagger_trains_as_eager(seed: int) -> None:
    torch._dynamo.reset()
    eager = Tagger(20, [3, 4], 5, MePropConfig(MePropMode.TOPK, 2, "auto"), hidden=6, word_dim=4, feature_dim=2,
                   bidirectional=True, track_hits=True)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    batch = make_batch([
        EncodedSentence(torch.randint(1, 20, (n,)), torch.randint(1, 3, (n, 2)), torch.randint(0, 5, (n,)),
                        torch.randint(1, 9, (n, 3)))
        for n in (4, 2, 3)
    ])

    assert_same_training(
        eager, compiled, lambda model: model.loss(model(batch), batch.tags),
        lambda model: [record for d in model.lstm.directions for record in (d.hits, d.refer)],
    )
    assert [d.refer for d in compiled.lstm.directions] == [18, 18]
