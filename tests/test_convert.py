"""The converter on a model this project did not write: torch's own ``nn.TransformerEncoder``.

Its layers' MLP blocks (``linear2(dropout(activation(linear1(x))))``) become meProp layers with the same
Parameters and outputs; their backward pass is then the masked gradient of the unconverted model (a hook
masks the output gradient by the reference rule); and meSimp prunes the blocks' hidden neurons exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from mesimp_gpu import LinearChains, MePropLinear, MePropMode, convert, mesimp_chains
from mesimp_gpu.backends.reference import topk_mask
from reference import assert_close_to_reference

D_MODEL, HEADS, FEEDFORWARD, LAYERS = 8, 2, 24, 2


def encoder() -> nn.TransformerEncoder:
    """A two-layer transformer encoder without dropout (so that two runs compute the same), in training mode."""
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEEDFORWARD, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).train()


def inputs() -> Tensor:
    return torch.randn(3, 5, D_MODEL)


def test_convert_keeps_parameters_and_outputs(seed: int) -> None:
    model = encoder()
    original = copy.deepcopy(model)
    before = {name: p for name, p in model.named_parameters()}
    names = convert(model, k=3, include="*.linear*")
    assert names == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    for name in names:
        assert isinstance(model.get_submodule(name), MePropLinear)
    # the same Parameter objects, in the same order: an optimizer built before converting still applies
    assert list(model.named_parameters()) == list(before.items())
    assert not isinstance(model.layers[0].self_attn.out_proj, MePropLinear)
    x = inputs()
    assert torch.equal(model(x), original(x))


def test_include_and_exclude_choose_by_name() -> None:
    model = encoder()
    assert convert(model, k=2, exclude=["layers.1.*", "*linear2"]) == ["layers.0.linear1"]
    assert type(model.layers[1].linear1) is nn.Linear


@pytest.mark.parametrize(("include", "message"), [
    ("*.out_proj", "matches only layers.0.self_attn.out_proj (NonDynamicallyQuantizableLinear)"),
    ("decoder.*", "matches no nn.Linear"),
])
def test_bad_patterns_are_clear_errors(include: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(encoder(), include=include)


def test_nothing_left_to_convert_is_an_error() -> None:
    with pytest.raises(ValueError, match="no nn.Linear module to convert"):
        convert(encoder(), exclude="*")


def masked_output_gradients(model: nn.Module, names: list[str], k: int) -> None:
    """Hooks on ``model``'s modules ``names``: each output gradient (``[..., out]``) keeps only the top-k
    entries of each row by the reference rule, as meProp with ``sparse_bias`` does."""
    def mask(g: Tensor) -> Tensor:
        rows = g.reshape(-1, g.shape[-1])
        return torch.where(topk_mask(rows, k), rows, 0.0).reshape(g.shape)

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        out.register_hook(mask)

    for name in names:
        model.get_submodule(name).register_forward_hook(hook)


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_backward_is_the_masked_gradient_of_the_original(seed: int, backend: str) -> None:
    model = encoder()
    original = copy.deepcopy(model)
    names = convert(model, k=3, mode="topk", include="*.linear1", backend=backend, sparse_bias=True)
    masked_output_gradients(original, names, 3)
    x, weights = inputs(), torch.randn(3, 5, D_MODEL)
    for m in (model, original):
        (m(x) * weights).sum().backward()
    for (name, ours), ref in zip(model.named_parameters(), original.parameters(), strict=True):
        # dense layers too: the sparse gradient flows back through attention and the first layer
        assert_close_to_reference(ours.grad, ref.grad, torch.float32, terms=FEEDFORWARD, msg=f"{name} differs")
    assert int((model.layers[0].linear1.weight.grad.abs().sum(dim=1) != 0).sum()) < FEEDFORWARD


def test_mesimp_prunes_the_mlp_blocks_exactly(seed: int) -> None:
    model = encoder()
    convert(model, k=4, include="*.linear1", backend="torch")
    chains = mesimp_chains(model, "linear1", "linear2")
    assert isinstance(chains, LinearChains) and [c.name for c in chains.chains] == ["layers.0", "layers.1"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = inputs()
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    records = [(c.first.hits.clone(), c.first.refer) for c in chains.chains]
    assert all(refer == 3 * 3 * 5 and int(hits.sum()) == refer * 4 for hits, refer in records)

    # what pruning must preserve: the network with the pruned neurons' columns of linear2 zeroed
    masked = copy.deepcopy(model)
    threshold = 0.15
    keeps = [hits >= int(refer * threshold) for hits, refer in records]
    assert not all(bool(keep.all()) for keep in keeps), "the test needs some neurons below the threshold"
    with torch.no_grad():
        for layer, keep in zip(masked.layers, keeps):
            layer.linear2.weight[:, ~keep] = 0.0

    sizes = chains.mesimp_prune_(threshold, optimizer)
    assert sizes == [int(keep.sum()) for keep in keeps]
    for layer, size in zip(model.layers, sizes):
        assert layer.linear1.weight.shape == (size, D_MODEL) and layer.linear2.weight.shape == (D_MODEL, size)
        assert optimizer.state[layer.linear2.weight]["exp_avg"].shape == (D_MODEL, size)
        assert layer.linear1.hits.tolist() == [0] * size and layer.linear1.refer == 0
    torch.testing.assert_close(model(x), masked(x))
    model(x).square().mean().backward()  # the pruned model trains on, with its sliced optimizer state
    optimizer.step()


def test_chains_need_converted_first_layers() -> None:
    with pytest.raises(ValueError, match=r"layers.0.linear1 is a Linear; convert it"):
        mesimp_chains(encoder(), "linear1", "linear2")
    with pytest.raises(ValueError, match="no module of the model has both 'linear1' and 'fc2'"):
        mesimp_chains(encoder(), "linear1", "fc2")
