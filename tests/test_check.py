"""``mesimp-gpu check``: it passes the backends that are right, and it fails the ones that are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

import mesimp_gpu.backends.check as check
from mesimp_gpu.backends.torch_backend import TorchBackend
from mesimp_gpu.cli import app

runner = CliRunner()


class WrongTieOrder(TorchBackend):
    """Keeps the higher index among equal magnitudes (the rule says the lower)."""

    name = "wrong-ties"

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        flipped = super().topk_indices(g.flip(1), k)
        return (g.shape[1] - 1 - flipped).sort(dim=1).values


class WrongProduct(TorchBackend):
    """dW off by one part in a thousand: far beyond float32 rounding."""

    name = "wrong-dw"

    def sparse_backward(self, g, idx, x, weight, need_dx=True):
        dx, dw = super().sparse_backward(g, idx, x, weight, need_dx)
        return dx, dw * 1.001


class WrongAdam(TorchBackend):
    """Adam without its bias correction."""

    name = "wrong-adam"

    def adam_rows_(self, p, grad, rows, exp_avg, exp_avg_sq, step, lr, betas, eps, clip=None):
        super().adam_rows_(p, grad, rows, exp_avg, exp_avg_sq, 1e9, lr, betas, eps, clip)


def fast_backends_here() -> list:
    """The backends on the CPU, without Triton's interpreter (40 s here; its kernels have their own tests)."""
    return [b for b in check.backends_on(torch.device("cpu"))[0] if b.name != "triton"]


def test_every_backend_here_passes() -> None:
    results, skipped = check.run_checks(torch.device("cpu"), seed=1, backends=fast_backends_here())
    assert {r.backend for r in results} >= {"torch"}
    assert {r.operation for r in results} == set(check.OPERATIONS)
    assert all(r.passed for r in results), check.render_table(results, skipped)
    assert all(r.cases == len(check.CASES) for r in results)


@pytest.mark.parametrize("broken, operations", [(WrongTieOrder(), {"selection", "topk", "unified", "rows"}),
                                                (WrongProduct(), {"topk"}), (WrongAdam(), {"rows"})])
def test_a_wrong_backend_fails_exactly_where_it_is_wrong(broken, operations) -> None:
    results, _ = check.run_checks(torch.device("cpu"), seed=2, backends=[broken])
    failed = {r.operation for r in results if not r.passed}
    # a wrong tie order moves the touched rows of the row updates too, but the update itself is right
    assert failed == operations - ({"rows"} if isinstance(broken, WrongTieOrder) else set())
    assert all(r.failure for r in results if not r.passed)


def test_command_prints_the_table_and_exits_nonzero_on_a_mismatch(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "backends_on", lambda device: ([TorchBackend()], {"triton": "not here"}))
    ok = runner.invoke(app, ["check", "--seed", "3", "--out", str(tmp_path / "check.json")])
    assert ok.exit_code == 0, ok.output
    assert "| torch | topk | float32 |" in ok.output and "not checked: triton: not here" in ok.output
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["seed"] == 3 and saved["machine"] and all(r["passed"] for r in saved["results"])

    monkeypatch.setattr(check, "backends_on", lambda device: ([WrongProduct()], {}))
    bad = runner.invoke(app, ["check", "--seed", "3"])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "--seed 3" in bad.output
