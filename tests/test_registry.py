"""The backend registry caches every outcome, and layers resolve their backend once per device.

Each test starts from empty registry caches (monkeypatched), so the counts do not depend on what
other tests loaded before.
"""

from __future__ import annotations

import copy
import logging
import pickle
from dataclasses import replace

import pytest
import torch

from mesimp_gpu import backends
from mesimp_gpu.backends import Backend, BackendUnavailable, get_backend, load_backend
from mesimp_gpu.lstm import MePropLSTM
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Empty registry caches; returns name -> how many times the registry tried to import and construct it."""
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_auto", {})
    monkeypatch.setattr(backends, "_warned", set())
    attempts: dict[str, int] = {}
    real = backends._instantiate

    def counting(name: str) -> Backend | BackendUnavailable:
        attempts[name] = attempts.get(name, 0) + 1
        return real(name)

    monkeypatch.setattr(backends, "_instantiate", counting)
    return attempts


@pytest.fixture
def broken_first_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered backend whose module does not exist, first in ``auto``'s CPU order."""
    monkeypatch.setitem(backends.REGISTRY, "broken", ("mesimp_gpu.backends.no_such_module", "Nothing"))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("broken", "torch"))


def test_a_failing_backend_under_auto_is_tried_and_reported_once(
    fresh_registry: dict[str, int], broken_first_on_cpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mesimp_gpu.backends"):
        chosen = {get_backend("auto", "cpu").name for _ in range(50)}
        with pytest.raises(BackendUnavailable, match="'broken' cannot load"):
            load_backend("broken")  # by name: the remembered reason, not a second import
    assert chosen == {"torch"}
    assert fresh_registry == {"broken": 1, "torch": 1}
    warnings = [r.getMessage() for r in caplog.records if "skipping broken" in r.getMessage()]
    assert len(warnings) == 1 and "no_such_module" in warnings[0]


def test_a_layer_resolves_its_backend_once(
    fresh_registry: dict[str, int], broken_first_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many forward and backward passes: one look-up, one load attempt per backend, until the config changes."""
    lookups: list[tuple[str, str]] = []
    real = backends.get_backend

    def counting(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
        lookups.append((name, torch.device(device).type))
        return real(name, device)

    monkeypatch.setattr(backends, "get_backend", counting)
    layer = MePropLinear(7, 9, MePropConfig(MePropMode.TOPK, 3, "auto"))
    lstm = MePropLSTM(4, 5, MePropConfig(MePropMode.TOPK, 2, "auto"))
    for _ in range(20):
        layer(torch.randn(3, 7, requires_grad=True)).sum().backward()
        lstm(torch.randn(2, 3, 4, requires_grad=True)).sum().backward()
    assert lookups == [("auto", "cpu"), ("auto", "cpu")]
    assert fresh_registry == {"broken": 1, "torch": 1}

    layer.config = replace(layer.config, backend="reference")
    for _ in range(5):
        layer(torch.randn(3, 7)).sum().backward()
    assert lookups[2:] == [("reference", "cpu")]


def test_the_kept_backends_are_not_part_of_a_copy_or_pickle() -> None:
    """A layer that has resolved its backend copies and pickles (the backend holds compiled code)."""
    try:
        load_backend("cpu")
        name = "cpu"
    except BackendUnavailable:
        name = "torch"
    layer = MePropLinear(6, 8, MePropConfig(MePropMode.TOPK, 2, name))
    layer(torch.randn(2, 6)).sum().backward()
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin.weight, layer.weight) and set(twin.state_dict()) == {"weight", "bias"}
        twin(torch.randn(2, 6)).sum().backward()  # resolves afresh
        assert twin.weight.grad is not None
