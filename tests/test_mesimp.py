"""meSimp: hit records, the prune rule, real shrinking (outputs, optimizer state, save/load), the
schedule on a tiny MNIST run, resume of a shrunk run, and the command line."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mesimp_gpu.backends import BackendUnavailable, get_backend
from mesimp_gpu.cli import app
from mesimp_gpu.data.mnist import load_mnist
from mesimp_gpu.mesimp import HitRule, MomentReset, PruneOrder, ends_cycle, prune_mask, prunes_in, reference_hits
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from mesimp_gpu.models.mlp import MLP, load_mlp, save_mlp
from mesimp_gpu.optim import OptimizerName, build_optimizer
from mesimp_gpu.train.records import accuracy
from mesimp_gpu.train.mnist import Method, MnistConfig, Preset, mnist_config, train_mnist

runner = CliRunner()


def available_backends() -> list[str]:
    names = []
    for name in ("reference", "torch", "cpu"):
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


# -- hit records and the prune rule ---------------------------------------------------------------


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("nonzero, expected", [(False, [2, 2, 1, 0, 1]), (True, [1, 2, 0, 0, 1])])
def test_hits_count_every_selected_index_or_only_nonzero(backend: str, nonzero: bool, expected: list[int]) -> None:
    layer = MePropLinear(4, 5, MePropConfig(MePropMode.TOPK, 3, backend, nonzero_hits=nonzero), track_hits=True)
    # row 0: two non-zero entries, the third slot goes to the lowest zero column (0);
    # row 1: a tie |-3| = |3| and then the lowest zero column (2)
    g = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0], [-3.0, 3.0, 0.0, 0.0, 0.0]])
    layer(torch.randn(2, 4)).backward(g)
    assert layer.hits.tolist() == expected and layer.refer == 2


def test_hits_when_k_covers_the_layer() -> None:
    layer = MePropLinear(4, 3, MePropConfig(MePropMode.TOPK, 5, "torch"), track_hits=True)
    layer(torch.randn(6, 4)).backward(torch.tensor([[1.0, 0.0, 2.0]]).repeat(6, 1))
    assert layer.hits.tolist() == [6, 6, 6], "k >= width: every neuron is in every example's set"
    with torch.no_grad():
        layer(torch.randn(6, 4))
    layer.eval()
    layer(torch.randn(6, 4)).sum().backward()
    assert layer.refer == 6, "evaluation and no-grad passes do not count"


def heap_top(row: list[float], k: int) -> set[int]:
    """A direct port of the C#'s ``TopNHeap.GetAbsTop`` (min-heap seeded with columns 0..k-1, a later
    column replaces the root only when strictly larger, ties between children go to the left one)."""
    values, index = [abs(x) for x in row[:k]], list(range(k))

    def shift_down(cur: int) -> None:
        while True:
            left, right = 2 * cur + 1, 2 * cur + 2
            if left >= k:
                return
            nxt = left if right >= k else (right if values[left] > values[right] else left)
            if values[cur] > values[nxt]:
                values[cur], values[nxt] = values[nxt], values[cur]
                index[cur], index[nxt] = index[nxt], index[cur]
                cur = nxt
            else:
                return

    for i in range(k >> 1, -1, -1):
        shift_down(i)
    for i in range(k, len(row)):
        if abs(row[i]) > values[0]:
            values[0], index[0] = abs(row[i]), i
            shift_down(0)
    return set(index)


def original_rows(generator: torch.Generator, batch: int, width: int, live: int, ties: bool) -> tuple:
    """Gradients over an original width with ``width - live`` pruned columns (zero), dead neurons (zero
    per row) and, with ``ties``, values repeated within rows -> ``(full [B, width], columns [live])``."""
    columns = torch.randperm(width, generator=generator)[:live].sort().values
    full = torch.zeros(batch, width)
    g = torch.randn(batch, live, generator=generator)
    g[torch.rand(batch, live, generator=generator) < 0.5] = 0.0  # ReLU-dead entries
    if ties:
        g = (g * 2).round() / 2  # few distinct magnitudes: many ties
    full[:, columns] = g
    return full, columns


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("width, live, k", [(40, 40, 7), (40, 25, 12), (40, 9, 12), (31, 20, 31), (16, 3, 1)])
def test_reference_hits_against_a_port_of_the_heap(seed: int, ties: bool, width: int, live: int, k: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    full, columns = original_rows(generator, 24, width, live, ties)
    hits = reference_hits(full[:, columns], columns, k)
    every = reference_hits(full, torch.arange(width), k)
    assert torch.equal(hits, every[columns]), "live columns alone give the original row's live picks"
    for row in full:
        mine = set(torch.nonzero(reference_hits(row[None], torch.arange(width), k)).flatten().tolist())
        heap = heap_top(row.tolist(), k)
        # the rule itself: the k first of a stable sort by magnitude, ties to the lower position
        order = torch.sort(-row.abs(), stable=True).indices[:k]
        assert mine == set(order.tolist())
        v = float(row.abs().sort(descending=True).values[k - 1])
        assert {j for j in mine if abs(row[j]) != v} == {j for j in heap if abs(row[j]) != v}, \
            "the heap's set for every magnitude but the k-th"
        assert len(mine) == len(heap) == k
        if v == 0:
            assert all(j < k for j in mine | heap if row[j] == 0), "leftover slots fall on seed zeros"
        boundary_tie = k < width and float(row.abs().sort(descending=True).values[k]) == v
        if not boundary_tie:
            assert mine == heap


def test_reference_hits_on_hand_made_rows() -> None:
    # original width 8, live positions 1, 4, 5, 6; k = 3. Row 0: two non-zeros, the leftover slot falls on
    # the pruned position 0, not on the live zeros at 1 and 5. Row 1: one non-zero, leftover slots on 0
    # (pruned) and 1 (live), not on the live zeros at 4 and 5. Row 2: more non-zeros than k: the top 3.
    columns = torch.tensor([1, 4, 5, 6])
    g = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [1.0, -4.0, 2.0, 3.0]])
    assert reference_hits(g, columns, 3).tolist() == [1, 2, 1, 3]
    # a layer narrower than k still prunes: live zeros at positions >= k are never hit
    assert reference_hits(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0, 6, 7]), 5).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="columns"):
        reference_hits(g, columns[:3], 3)


@pytest.mark.parametrize("backend", available_backends())
def test_layer_with_reference_hits(backend: str, seed: int) -> None:
    torch.manual_seed(seed)
    config = MePropConfig(MePropMode.TOPK, 4, backend)
    layer = MePropLinear(6, 10, config, track_hits=True, reference_hits=True).double()
    plain = copy.deepcopy(layer)
    plain.columns = None
    keep = torch.tensor([True, False, True, True, False, False, True, True, False, True])
    nxt = MePropLinear(10, 3, config)
    layer.prune_outputs_(keep, copy.deepcopy(nxt).double())
    plain.prune_outputs_(keep, copy.deepcopy(nxt).double())
    assert layer.columns.tolist() == [0, 2, 3, 6, 7, 9], "each live neuron remembers its original position"
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    g = torch.randn(5, 6, dtype=torch.double)
    g[torch.rand(5, 6) < 0.5] = 0.0
    layer(x).backward(g)
    dx = x.grad.clone()
    x.grad = None
    plain(x).backward(g)
    assert torch.equal(dx, x.grad) and torch.equal(layer.weight.grad, plain.weight.grad), "gradients unchanged"
    assert layer.hits.tolist() == reference_hits(g, layer.columns, 4).tolist() and layer.refer == 5
    with pytest.raises(ValueError, match="track_hits"):
        MePropLinear(6, 10, config, reference_hits=True)


def test_prune_rule_on_hand_made_hits() -> None:
    hits = torch.tensor([0, 9, 10, 11, 3, 100])
    assert prune_mask(hits, refer=100, threshold=0.1).tolist() == [False, False, True, True, False, True]
    assert prune_mask(hits, refer=99, threshold=0.1).tolist() == [False, True, True, True, False, True], "floor(9.9) = 9"
    assert prune_mask(hits, refer=0, threshold=0.1).all(), "an empty record removes nothing"
    assert prune_mask(hits, refer=100, threshold=0.0).all()
    assert prune_mask(torch.tensor([1, 4, 2]), refer=100, threshold=0.5).tolist() == [False, True, False], \
        "the most-hit neuron survives even when all fall below the bar"
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            prune_mask(hits, 100, bad)


def test_schedule_rule() -> None:
    assert [prunes_in(e, 5) for e in range(20)] == [True] * 5 + [False] * 5 + [True] * 5 + [False] * 5
    assert [e for e in range(20) if ends_cycle(e, 5)] == [4, 9, 14, 19]
    assert all(prunes_in(e, 0) for e in range(7)) and not any(ends_cycle(e, 0) for e in range(7))


# -- real shrinking ----------------------------------------------------------------------------------


def tiny_mlp(sizes=(7, 12, 9, 4), mode=MePropMode.TOPK, k=5) -> MLP:
    return MLP(list(sizes), MePropConfig(mode, k, "torch"), track_hits=True).double()


def masked_forward(model: MLP, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """The reference's masked network: pruned neurons output zero, nothing is deleted."""
    for layer, mask in zip(model.hidden, masks):
        x = nn.functional.relu(layer(x)) * mask
    return model.layers[-1](x)


def random_keeps(model: MLP, generator: torch.Generator) -> list[torch.Tensor]:
    keeps = []
    for layer in model.hidden:
        keep = torch.rand(layer.out_features, generator=generator) < 0.6
        keep[0] = True
        keeps.append(keep)
    return keeps


def set_hits(model: MLP, keeps: list[torch.Tensor], refer: int = 50, threshold: float = 0.2) -> None:
    """A record that makes ``model.mesimp_prune_(threshold)`` keep exactly ``keeps``."""
    bar = int(refer * threshold)
    for layer, keep in zip(model.hidden, keeps):
        layer.hits.copy_(torch.where(keep, torch.full_like(layer.hits, bar), torch.full_like(layer.hits, bar - 1)))
        layer.refer = refer


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pruned_network_equals_masked_network(seed: int, depth: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mlp((7, *[12] * depth, 4))
    masked = copy.deepcopy(model)
    keeps = random_keeps(model, gen)
    set_hits(model, keeps)
    before = sum(p.numel() for p in model.parameters())
    sizes = model.mesimp_prune_(0.2)
    assert sizes == [int(k.sum()) for k in keeps] and model.sizes == [7, *sizes, 4]
    assert sum(p.numel() for p in model.parameters()) < before
    assert all(int(layer.hits.sum()) == 0 and layer.refer == 0 for layer in model.hidden), "records reset"
    x = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    masks = [k.double() for k in keeps]
    torch.testing.assert_close(model(x), masked_forward(masked, x, masks), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", [OptimizerName.ADAM, OptimizerName.ADAGRAD])
def test_optimizer_step_after_slicing_equals_unsliced_step(seed: int, name: OptimizerName) -> None:
    gen = torch.Generator().manual_seed(seed)
    sliced = tiny_mlp()
    full = copy.deepcopy(sliced)
    lr = 1e-2 if name is OptimizerName.ADAM else 0.1
    opt_sliced = build_optimizer(name, sliced.parameters(), lr)
    opt_full = build_optimizer(name, full.parameters(), lr)
    keeps = random_keeps(sliced, gen)
    masks = [torch.ones(k.shape, dtype=torch.float64) for k in keeps]

    def step(model: MLP, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, masks) -> None:
        opt.zero_grad()
        out = model(x) if masks is None else masked_forward(model, x, masks)
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
        opt.step()

    for _ in range(3):  # build up optimizer state on both, identically
        x, y = torch.randn(8, 7, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen)
        step(sliced, opt_sliced, x, y, None)
        step(full, opt_full, x, y, masks)
    set_hits(sliced, keeps)
    sliced.mesimp_prune_(0.2, opt_sliced)
    params = list(sliced.parameters())
    assert [p for g in opt_sliced.param_groups for p in g["params"]] == params, "optimizer holds the new Parameters"
    assert set(opt_sliced.state) == set(params)
    for _ in range(2):  # steps after slicing: the full model masks the pruned neurons
        x, y = torch.randn(8, 7, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen)
        step(sliced, opt_sliced, x, y, None)
        step(full, opt_full, x, y, [k.double() for k in keeps])
    # surviving entries: rows of a hidden layer's outputs, columns of the next layer's inputs
    rows = [*keeps, torch.ones(4, dtype=torch.bool)]
    cols = [torch.ones(7, dtype=torch.bool), *keeps]
    for i, (a, b) in enumerate(zip(sliced.layers, full.layers)):
        torch.testing.assert_close(a.weight, b.weight[rows[i]][:, cols[i]], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(a.bias, b.bias[rows[i]], atol=1e-12, rtol=1e-10)
        for key, value in opt_sliced.state[a.weight].items():
            reference = opt_full.state[b.weight][key]
            expected = reference if value.dim() == 0 else reference[rows[i]][:, cols[i]]
            torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-10)


def test_shrink_rejects_bad_masks() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="keep mask"):
        model.layers[0].prune_outputs_(torch.ones(5, dtype=torch.bool), model.layers[1])
    with pytest.raises(ValueError, match="next layer"):
        model.layers[0].prune_outputs_(torch.ones(12, dtype=torch.bool), model.layers[2])
    with pytest.raises(ValueError, match="track_hits"):
        MLP([3, 4, 2], MePropConfig()).mesimp_prune_(0.1)


def test_save_load_round_trip_of_a_shrunk_model(tmp_path: Path, seed: int) -> None:
    model = tiny_mlp((7, 12, 9, 4))
    keeps = random_keeps(model, torch.Generator().manual_seed(seed))
    set_hits(model, keeps)
    model.mesimp_prune_(0.2)
    path = save_mlp(model.float(), tmp_path)
    arch = json.loads(path.read_text())
    assert arch["sizes"] == model.sizes and arch["parameters"] == sum(p.numel() for p in model.parameters())
    loaded = load_mlp(tmp_path)
    assert loaded.sizes == model.sizes and loaded.layers[0].config == model.layers[0].config
    x = torch.randn(5, 7)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ValueError, match="not an MLP architecture"):
        load_mlp(tmp_path)


# -- training schedule and resume on a tiny MNIST subset --------------------------------------------


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path):
    return load_mnist(mnist_dir, download=False)


def tiny(out: Path, **overrides) -> MnistConfig:
    settings = dict(method=Method.MESIMP, k=6, hidden=24, epochs=4, limit=300, chunks=2, batch_size=30, cycle=1,
                    prune=0.2, progress=False, out=str(out), backend="torch")
    settings.update(overrides)
    return MnistConfig(**settings)


class MomentProbe:
    """A chunk hook that runs after meSimp's and records how large Adam's first moments are."""

    def on_chunk_end(self, trainer, epoch: int, chunk: int) -> dict:
        moments = [s["exp_avg"].abs().sum().item() for s in trainer.optimizer.state.values()]
        steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
        return {"moment_mass": sum(moments), "adam_steps": sorted(steps)}


def test_schedule_prunes_in_even_cycles_and_resets_moments(tmp_path: Path, mnist) -> None:
    results = train_mnist(tiny(tmp_path), data=mnist, hooks=(MomentProbe(),))
    history = results["history"]
    assert [(h["epoch"], h["chunk"]) for h in history] == [(e, c) for e in range(4) for c in range(2)]
    assert [h["pruned"] for h in history] == [True, True, False, False, True, True, False, False]
    assert [h["moments_reset"] for h in history] == [False, True] * 4
    for h in history:
        assert (h["moment_mass"] == 0) == h["moments_reset"], "m is zeroed exactly at cycle ends"
        assert h["adam_steps"] == [h["step"]], "the step counter is never reset"
    sizes = [h["sizes"] for h in history]
    assert sizes[0][1:-1] != [24, 24], "the first prune step, before the first evaluation, removed neurons"
    assert sizes[2] == sizes[3] == sizes[1], "odd cycles keep the sizes fixed"
    final = results["final"]
    assert final["sizes"] == sizes[-1] and final["parameters_final"] < final["parameters_initial"]
    assert final["kept_mean"] == sum(final["kept"]) / 2
    assert (tmp_path / "hidden_sizes.png").stat().st_size > 0 and (tmp_path / "dev_accuracy.png").stat().st_size > 0
    best = next(h for h in history if h["dev_acc"] == final["best_dev_acc"])
    saved = load_mlp(tmp_path)
    assert saved.sizes == best["sizes"], "the saved model is the one at the best dev score"
    assert final["kept_at_best_dev"] == best["sizes"][1:-1]
    test = mnist.test.head(100)  # the test subset of limit=300
    assert accuracy(saved, test.images, test.labels) == final["test_acc_at_best_dev"]


def test_schedule_without_moment_resets(tmp_path: Path, mnist) -> None:
    results = train_mnist(tiny(tmp_path, epochs=2, reset_moments=MomentReset.NONE, cycle=0), data=mnist,
                          hooks=(MomentProbe(),))
    assert all(h["pruned"] and not h["moments_reset"] and h["moment_mass"] > 0 for h in results["history"])


def test_moment_resets_after_every_chunk_of_a_cycles_last_epoch(tmp_path: Path, mnist) -> None:
    config = tiny(tmp_path, epochs=4, cycle=2, reset_moments=MomentReset.LAST_EPOCH)
    history = train_mnist(config, data=mnist, hooks=(MomentProbe(),))["history"]
    assert [h["moments_reset"] for h in history] == [False, False, True, True] * 2
    assert all((h["moment_mass"] == 0) == h["moments_reset"] for h in history)


def test_evaluate_first_scores_the_network_before_its_prune_step(tmp_path: Path, mnist) -> None:
    config = tiny(tmp_path, epochs=2, order=PruneOrder.EVALUATE_FIRST, hits=HitRule.REFERENCE)
    history = train_mnist(config, data=mnist)["history"]
    assert history[0]["sizes"] == [784, 24, 24, 10], "the first evaluation precedes the first prune step"
    assert history[0]["pruned"] and history[1]["sizes"] != history[0]["sizes"]
    first = train_mnist(tiny(tmp_path / "prune-first", epochs=2, hits=HitRule.REFERENCE), data=mnist)["history"]
    assert first[0]["sizes"] == history[1]["sizes"], "same training, the scores are taken one prune step apart"


def test_reference_hits_prune_below_k(tmp_path: Path, mnist) -> None:
    """Once a layer is no wider than k the project's rule hits every neuron every time; the C#'s does not."""
    settings = dict(k=12, prune=0.5, epochs=2, cycle=0)
    kept = train_mnist(tiny(tmp_path / "kept", **settings), data=mnist)["history"]
    reference = train_mnist(tiny(tmp_path / "ref", **settings, hits=HitRule.REFERENCE), data=mnist)["history"]
    for before, after in zip(kept, kept[1:]):
        assert all(b == a for b, a in zip(before["sizes"], after["sizes"]) if b <= 12), "kept: pruning stops at k"
    assert max(reference[-1]["sizes"][1:-1]) < 12


def test_moment_resets_before_pruning_skip_the_last_cycle(tmp_path: Path, mnist) -> None:
    config = tiny(tmp_path, epochs=4, cycle=1, reset_moments=MomentReset.BEFORE_PRUNING)
    history = train_mnist(config, data=mnist, hooks=(MomentProbe(),))["history"]
    # cycles of one epoch: epochs 0 and 2 prune; a later cycle prunes after epochs 0 and 1, not after 2 and 3
    assert [h["moments_reset"] for h in history] == [True, True] * 2 + [False, False] * 2
    assert all((h["moment_mass"] == 0) == h["moments_reset"] for h in history)


class LearningRateProbe:
    def on_chunk_end(self, trainer, epoch: int, chunk: int) -> dict:
        return {"lr": {g["lr"] for g in trainer.optimizer.param_groups}}


def test_final_lr_in_the_last_cycle_also_for_the_same_size_baseline(tmp_path: Path, mnist) -> None:
    config = tiny(tmp_path, epochs=4, cycle=2, final_lr=1e-4, compare_same_size=True)
    results = train_mnist(config, data=mnist, hooks=(LearningRateProbe(),))
    assert [h["lr"] for h in results["history"]] == [{1e-3}] * 4 + [{1e-4}] * 4
    baseline = json.loads((tmp_path / "same-size" / "results.json").read_text())
    assert baseline["config"]["final_lr"] == 1e-4 and baseline["config"]["cycle"] == 2
    with pytest.raises(ValueError, match="--final-lr"):
        tiny(tmp_path, final_lr=1e-4, cycle=0)


def test_results_name_the_final_network_and_its_test_score(tmp_path: Path, mnist) -> None:
    results = train_mnist(tiny(tmp_path, epochs=2), data=mnist)
    final = results["final"]
    best = next(h for h in results["history"] if h["step"] == final["best_step"])
    assert final["sizes_at_best_dev"] == best["sizes"] and final["sizes"] == results["history"][-1]["sizes"]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    model = MLP(final["sizes"], MePropConfig(MePropMode.TOPK, 6, "torch"), track_hits=True)
    model.load_state_dict(checkpoint["model"])
    test = mnist.test.head(100)
    assert final["test_acc_final_network"] == accuracy(model, test.images, test.labels)


def test_resume_of_a_shrunk_run_continues_exactly(tmp_path: Path, mnist) -> None:
    full = train_mnist(tiny(tmp_path / "full", epochs=3), data=mnist)
    train_mnist(tiny(tmp_path / "cut", epochs=2), data=mnist)  # cut after the fixed epoch: a full record
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert checkpoint["hidden_sizes"] != [24, 24], "the checkpoint holds the shrunk network"
    assert all(refer == 300 for refer in checkpoint["refer"]), "the record of the fixed epoch travels along"
    assert int(checkpoint["model"]["layers.0.hits"].sum()) == 300 * 6
    resumed = train_mnist(tiny(tmp_path / "cut", epochs=3), resume=True, data=mnist)
    strip = lambda r: [{k: v for k, v in h.items() if k != "prune_seconds"} for h in r["history"]]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert resumed["final"]["test_acc_at_best_dev"] == full["final"]["test_acc_at_best_dev"]
    assert resumed["final"]["sizes"] == full["final"]["sizes"]


def test_same_size_baseline(tmp_path: Path, mnist) -> None:
    results = train_mnist(tiny(tmp_path, epochs=2, compare_same_size=True), data=mnist)
    base = results["same_size"]
    assert base["sizes"] == results["final"]["sizes"]
    assert base["parameters_initial"] == base["parameters_final"] == results["final"]["parameters_final"]
    saved = json.loads((tmp_path / "same-size" / "results.json").read_text())
    assert saved["config"]["method"] == "dense" and saved["config"]["epochs"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["same_size"]["sizes"] == base["sizes"]


def test_paper_preset_is_the_reference() -> None:
    c = mnist_config(Preset.PAPER)
    assert (c.method, c.k, c.prune, c.batch_size, c.epochs, c.chunks, c.cycle, c.reset_moments) == \
        (Method.MESIMP, 160, 0.1, 100, 20, 8, 5, MomentReset.BEFORE_PRUNING)
    assert (c.sizes, c.optimizer, c.lr, c.clip, c.grad_sum, c.hits, c.order) == \
        ([784, 500, 500, 10], OptimizerName.ADAM, 1e-3, 5.0, True, HitRule.REFERENCE, PruneOrder.PRUNE_FIRST)
    assert c.final_lr == 1e-4
    r = mnist_config(Preset.REFERENCE)
    assert r.final_lr is None
    assert (r.hits, r.reset_moments, r.order) == (HitRule.REFERENCE, MomentReset.LAST_EPOCH, PruneOrder.EVALUATE_FIRST)
    assert (r.k, r.epochs, r.cycle, r.chunks, r.batch_size, r.sizes) == (160, 20, 5, 8, 100, [784, 500, 500, 10])
    assert mnist_config(Preset.PAPER, epochs=3).epochs == 3
    with pytest.raises(ValueError, match="unknown MNIST settings: bogus"):
        mnist_config(Preset.PAPER, bogus=1)


# -- command line ------------------------------------------------------------------------------------


def test_cli_run_with_preset_overrides_then_evaluate(tmp_path: Path, mnist_dir: Path) -> None:
    args = ["train", "mnist", "--preset", "paper", "--k", "6", "--hidden", "24", "--epochs", "2", "--cycle", "1",
            "--chunks", "2", "--limit", "300", "--batch-size", "30", "--data-dir", str(mnist_dir), "--out",
            str(tmp_path), "--no-progress", "--backend", "torch", "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "hidden sizes" in result.output, "each prune step prints the sizes"
    assert "kept at best" in result.output and "params before" in result.output, "the summary table"
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert (config["k"], config["epochs"], config["cycle"]) == (6, 2, 1), "explicit options win"
    assert (config["prune"], config["method"], config["lr"]) == (0.1, "mesimp", 1e-3), "the rest is the preset"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "model.json"), "--data-dir", str(mnist_dir)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "on 10000 images" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prune", "1.0"], "--prune must be in [0, 1)"),
        (["--prune", "-0.5"], "--prune must be in [0, 1)"),
        (["--cycle", "-1"], "--cycle must be at least 0"),
        (["--reset-moments", "sometimes"], "sometimes"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--hidden-sizes", "300,x"], "--hidden-sizes must be comma-separated integers"),
        (["--hidden-sizes", "300,0"], "--hidden-sizes must be positive"),
        (["--method", "dense", "--compare-same-size"], "--compare-same-size needs --method mesimp"),
        (["--preset", "paper", "--prune", "2"], "--prune must be in [0, 1)"),
    ],
)
def test_cli_bad_values_get_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", "mnist", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_evaluate_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no model at" in result.output
    (tmp_path / "model.json").write_text("not json")
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
