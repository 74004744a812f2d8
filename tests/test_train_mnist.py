"""The MNIST trainer on a small subset: it learns, repeats exactly with a seed, resumes exactly,
and writes its files; plus the optimizers' clipping and moment reset."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mesimp_gpu.data.mnist import load_mnist
from mesimp_gpu.optim import OptimizerName, build_optimizer, clip_elementwise, reset_moments
from mesimp_gpu.lazy_optim import LazyAdam
from mesimp_gpu.train.mnist import Method, MnistConfig, MnistTrainer, train_mnist


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path):
    return load_mnist(mnist_dir, download=False)


def small(out: Path, **overrides) -> MnistConfig:
    settings = dict(method=Method.MEPROP, k=8, hidden=48, epochs=1, limit=1200, chunks=3, batch_size=20, progress=False,
                    out=str(out), backend="torch")
    settings.update(overrides)
    return MnistConfig(**settings)


@pytest.mark.parametrize("method", [Method.DENSE, Method.MEPROP, Method.UNIFIED, Method.RANDOM])
def test_training_learns_and_writes_results(tmp_path: Path, mnist, method) -> None:
    results = train_mnist(small(tmp_path, method=method, epochs=2), data=mnist)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["finished"] and saved["config"]["method"] == method.value
    assert len(saved["history"]) == 2 * 3
    assert saved["final"]["test_acc_at_best_dev"] > 35.0, "a 784-48-48-10 MLP must beat chance (10%) by far"
    assert saved["final"] == json.loads(json.dumps(results["final"]))
    for phase in ("forward", "backward", "update"):
        assert saved["final"]["mean_epoch_seconds"][phase] > 0
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "curves.png").stat().st_size > 0
    assert "cpu" in saved["machine"] and saved["machine"]["torch"] == torch.__version__


def test_same_seed_same_run(tmp_path: Path, mnist) -> None:
    a = train_mnist(small(tmp_path / "a", method=Method.RANDOM), data=mnist)
    b = train_mnist(small(tmp_path / "b", method=Method.RANDOM), data=mnist)
    c = train_mnist(small(tmp_path / "c", method=Method.RANDOM, seed=2), data=mnist)
    losses = lambda r: [h["train_loss"] for h in r["history"]]  # noqa: E731
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


@pytest.mark.parametrize("lazy", [False, True], ids=["dense-adam", "lazy-adam"])
def test_resume_continues_exactly(tmp_path: Path, mnist, lazy) -> None:
    full = train_mnist(small(tmp_path / "full", epochs=2, lazy=lazy), data=mnist)
    train_mnist(small(tmp_path / "cut", epochs=1, lazy=lazy), data=mnist)
    resumed = train_mnist(small(tmp_path / "cut", epochs=2, lazy=lazy), resume=True, data=mnist)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert resumed["final"]["test_acc_at_best_dev"] == full["final"]["test_acc_at_best_dev"]


def test_resume_refuses_other_settings(tmp_path: Path, mnist) -> None:
    train_mnist(small(tmp_path), data=mnist)
    with pytest.raises(ValueError, match="different settings.*hidden"):
        train_mnist(small(tmp_path, hidden=40), resume=True, data=mnist)


def test_resume_without_checkpoint_or_with_corrupt_one(tmp_path: Path, mnist) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_mnist(small(tmp_path), resume=True, data=mnist)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        train_mnist(small(tmp_path), resume=True, data=mnist)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(k=0), "--k must be at least 1"),
        (dict(hidden=-3), "--hidden must be at least 1"),
        (dict(k=600, hidden=500), "exceeds the hidden width"),
        (dict(lr=0.0), "--lr must be a? ?positive"),
        (dict(limit=0), "--limit must be at least 1"),
    ],
)
def test_impossible_settings(tmp_path: Path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        small(tmp_path, **overrides)


@pytest.mark.parametrize("method", [Method.MEPROP, Method.MESIMP])
def test_lazy_training_learns_and_updates_rows_only(tmp_path: Path, mnist, method) -> None:
    """A lazy run learns; rows of a hidden weight that meProp never selected in a step stay put in it."""
    config = small(tmp_path, method=method, lazy=True, epochs=2)
    results = train_mnist(config, data=mnist)
    assert results["final"]["test_acc_at_best_dev"] > 35.0
    trainer = MnistTrainer(replace(config, out=str(tmp_path / "steps")), mnist)
    assert isinstance(trainer.optimizer, LazyAdam)
    layer = trainer.model.layers[0]
    x, y = trainer.train_set.images[:3], trainer.train_set.labels[:3]  # 3 examples x k = 8: at most 24 of 48 rows
    trainer.update_step(lambda: trainer.loss_fn(trainer.model(x), y))
    trainer.update_step(lambda: trainer.loss_fn(trainer.model(x), y))  # Adam's moments move touched rows again
    before = layer.weight.detach().clone()
    trainer.update_step(lambda: trainer.loss_fn(trainer.model(x), y))
    moved = (layer.weight.detach() != before).any(dim=1).sum()
    assert 0 < moved <= 3 * config.k


def test_clip_is_elementwise() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([-9.0, -1.0, 2.0, 7.0])
    clip_elementwise([p], 5.0)
    assert p.grad.tolist() == [-5.0, -1.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="clip"):
        clip_elementwise([p], -1.0)


@pytest.mark.parametrize("name", list(OptimizerName))
def test_optimizers_follow_the_papers(name) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(name, [p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    if name is OptimizerName.SGD:
        expected = [0.9, 1.2, 1.0]
    elif name is OptimizerName.ADAM:
        expected = [0.9, 1.1, 1.0]  # first Adam step moves by lr * sign(g)
    else:
        expected = [1 - 0.1 / (1 + 1e-6), 1 + 0.1 * 2 / (2 + 1e-6), 1.0]  # AdaGrad eps 1e-6
    torch.testing.assert_close(p.detach(), torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="learning rate"):
        build_optimizer(name, [p], lr=0.0)


def test_reset_moments_keeps_step() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(OptimizerName.ADAM, [p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    reset_moments(opt)
    state = opt.state[p]
    assert float(state["exp_avg"].abs().sum()) == 0 and float(state["exp_avg_sq"].abs().sum()) == 0
    assert float(state["step"]) == 1


def test_uniform_init_and_dropout() -> None:
    from mesimp_gpu.meprop import MePropConfig, MePropMode
    from mesimp_gpu.models.mlp import MLP, Init

    torch.manual_seed(0)
    model = MLP([784, 512, 512, 10], MePropConfig(MePropMode.TOPK, 30, "torch"), dropout=0.5, init=Init.UNIFORM)
    for layer in model.layers:
        bound = 1 / layer.out_features ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound, "U(-1/sqrt(out), ...)"
        assert layer.bias.abs().max() <= bound and layer.bias.std() > 0.3 * bound, "biases too"
    x = torch.rand(64, 784)
    model.eval()
    assert torch.equal(model(x), model(x)), "no dropout in evaluation"
    model.train()
    assert not torch.equal(model(x), model(x)), "dropout in training"
    normal = MLP([784, 500, 10], MePropConfig(MePropMode.TOPK, 30, "torch"))
    assert abs(float(normal.layers[0].weight.std()) - (6 / 1284) ** 0.5) < 0.01 and normal.layers[0].bias.eq(0).all()
    with pytest.raises(ValueError, match="dropout"):
        MLP([784, 10], MePropConfig(), dropout=1.0)


def test_meprop_pytorch_preset() -> None:
    from mesimp_gpu.models.mlp import BiasGrad, Init
    from mesimp_gpu.train.mnist import Preset, mnist_config

    c = mnist_config(Preset.MEPROP_PYTORCH)
    assert (c.method, c.k, c.sizes, c.batch_size, c.grad_sum, c.clip, c.lr, c.optimizer) == \
        (Method.MEPROP, 30, [784, 512, 512, 10], 32, False, None, 1e-3, OptimizerName.ADAM)
    assert (c.dropout, c.init, c.epochs, c.chunks, c.bias) == (0.1, Init.UNIFORM, 20, 1, BiasGrad.FROZEN)
    with pytest.raises(ValueError, match="--dropout"):
        mnist_config(Preset.MEPROP_PYTORCH, dropout=-0.1)


@pytest.mark.parametrize("bias", ["dense", "kept", "frozen"])
def test_bias_gradient_rules(bias: str) -> None:
    from mesimp_gpu.meprop import MePropConfig, MePropMode
    from mesimp_gpu.models.mlp import MLP, BiasGrad

    torch.manual_seed(0)
    model = MLP([6, 8, 3], MePropConfig(MePropMode.TOPK, 2, "torch"), bias_grad=BiasGrad(bias))
    x = torch.randn(4, 6, requires_grad=True)  # so that the module hook sees input gradients too
    hidden = model.layers[0]
    captured = {}
    hidden.register_full_backward_hook(lambda m, gi, go: captured.update(g=go[0]))
    model(x).sum().backward()
    g = captured["g"]
    if bias == "frozen":
        assert all(layer.bias.grad is None and not layer.bias.requires_grad for layer in model.layers)
        return
    kept = torch.zeros_like(g).scatter(1, g.abs().topk(2, dim=1).indices, 1.0)
    expected = g.sum(0) if bias == "dense" else (g * kept).sum(0)
    assert torch.allclose(hidden.bias.grad, expected)
    assert model.layers[1].bias.grad is not None, "the output layer's bias learns"
