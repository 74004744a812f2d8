"""The ``cpu`` backend against the float64 reference: indices, products, hits, threads, fallback.

The kernel tests run at every instruction-set level this machine executes (:data:`LEVELS`: ``native``
and each named level below the best one, e.g. ``x86-64-v3`` on an AVX-512 machine). The first run
builds each level (1-2 minutes each on 2 cores); later runs load them from their build folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mesimp_gpu.backends import load_backend
from mesimp_gpu.backends.base import InvalidGradientError
from mesimp_gpu.backends import cpu as cpu_module
from mesimp_gpu.backends.cpu import ARCH_LEVELS, DENSE_PRODUCTS_FRACTION, level_backend, runnable_levels
from mesimp_gpu.backends.reference import topk_mask
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode, random_indices
from reference import REF, assert_close_to_reference, assert_valid_selection, gradient

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler: the cpu backend cannot build here", allow_module_level=True)

#: (batch, in, out, k): 1 row, odd widths, k = 1, k = out, k > out, width 1, a few vectors wide;
#: k / out on both sides of DENSE_PRODUCTS_FRACTION (sparse loops below, BLAS products above)
SHAPES = [
    (1, 7, 5, 1),
    (1, 9, 9, 9),
    (5, 33, 17, 5),
    (3, 1, 1, 1),
    (6, 10, 10, 15),
    (64, 130, 257, 20),
    (17, 301, 64, 63),
    (9, 70, 257, 40),  # k above the kernel's 8-term passes of a weighted row sum
]


def levels_to_test() -> list[str]:
    """``native`` and every named level this CPU runs except its best one (which ``native`` covers)."""
    named = [level for level in runnable_levels() if level != "native"]
    return ["native", *named[:-1]]


LEVELS = levels_to_test()


@pytest.fixture(scope="module", params=LEVELS)
def cpu(request: pytest.FixtureRequest):
    backend = level_backend(request.param)
    assert backend.arch == request.param
    return backend


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch,n_in,n_out,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_backward_matches_reference(cpu, threads, seed, batch, n_in, n_out, k, dtype):
    g = gradient(batch, n_out, "halves", dtype)
    x = torch.randn(batch, n_in, dtype=dtype)
    w = torch.randn(n_out, n_in, dtype=dtype)
    start = torch.randint(0, 5, (n_out,))
    hits, ref_hits = start.clone(), start.clone()
    dx, dw, idx = cpu.topk_backward(g, x, w, k, hits)
    ref_dx, ref_dw, ref_idx = REF.topk_backward(g, x, w, k, ref_hits)
    assert torch.equal(idx, ref_idx)
    assert_valid_selection(g, idx, k)
    assert torch.equal(hits, ref_hits)
    # dx sums the min(k, out) kept entries of a row, dW the batch (the result dtypes are checked too)
    assert_close_to_reference(dx, ref_dx, dtype, terms=min(k, n_out))
    assert_close_to_reference(dw, ref_dw, dtype, terms=batch)


@pytest.mark.parametrize("k", [8, 40], ids=["sparse-loops", "blas-products"])
def test_need_dx_false_skips_only_dx(cpu, seed, k):
    """Below and above DENSE_PRODUCTS_FRACTION of the 64 columns: same dW, idx and hits, no dx."""
    assert (k > DENSE_PRODUCTS_FRACTION * 64) == (k == 40)
    g, x, w = gradient(12, 64, "halves"), torch.randn(12, 33), torch.randn(64, 33)
    hits, hits_without = torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long)
    dx, dw, idx = cpu.topk_backward(g, x, w, k, hits)
    none, dw_without, idx_without = cpu.topk_backward(g, x, w, k, hits_without, need_dx=False)
    assert none is None and dx is not None
    assert torch.equal(dw, dw_without) and torch.equal(idx, idx_without) and torch.equal(hits, hits_without)
    assert_close_to_reference(dw, REF.topk_backward(g, x, w, k)[1], torch.float32, terms=12)


@pytest.mark.parametrize("batch,n_in,n_out,k", SHAPES)
def test_topk_indices_and_sparse_backward(cpu, threads, seed, batch, n_in, n_out, k):
    g = gradient(batch, n_out, "halves")
    assert torch.equal(cpu.topk_indices(g, k), REF.topk_indices(g, k))
    idx = random_indices(batch, n_out, min(k, n_out), g.device)  # any kept set, not only the top-k
    x, w = torch.randn(batch, n_in), torch.randn(n_out, n_in)
    dx, dw = cpu.sparse_backward(g, idx, x, w)
    ref_dx, ref_dw = REF.sparse_backward(g, idx, x, w)
    assert_close_to_reference(dx, ref_dx, torch.float32, terms=min(k, n_out))
    assert_close_to_reference(dw, ref_dw, torch.float32, terms=batch)


def test_selection_matches_reference_on_many_rows(cpu, seed):
    """Wide rows, many ties, k from 1 to out: the tie rule on the threshold matters most here."""
    for k in (1, 2, 3, 16, 17, 99, 100, 255, 256):
        g = (torch.randn(97, 256) * 3).round()  # few distinct magnitudes: ties at every threshold
        assert torch.equal(cpu.topk_indices(g, k), topk_mask(g, k).nonzero()[:, 1].reshape(97, k)), k


@pytest.mark.parametrize("zero_fraction", [0.5, 0.9, 0.97, 1.0])
def test_selection_on_mostly_zero_rows(cpu, seed, zero_fraction):
    """Gradients behind inactive ReLUs: rows with fewer non-zeros than k keep them all plus the lowest
    zero columns; rows with more keep the k largest."""
    g = torch.randn(64, 500)
    g[torch.rand(64, 500) < zero_fraction] = 0.0
    for k in (1, 5, 20, 160):
        assert torch.equal(cpu.topk_indices(g, k), REF.topk_indices(g, k)), k


def test_subnormal_gradients_are_ranked_and_flushed(cpu, seed):
    """Subnormal entries (late in training) keep their rank in the selection; in the products they
    count as zero (the kernel flushes subnormals), which is within any tolerance of the reference."""
    g = torch.randn(16, 300) * 1e-39  # subnormal in float32
    g[:, ::7] = torch.randn(16, 43)  # some normal entries per row
    x, w = torch.randn(16, 40), torch.randn(300, 40)
    dx, dw, idx = cpu.topk_backward(g, x, w, 60)  # more than the 43 normal entries: subnormals selected
    ref_dx, ref_dw, ref_idx = REF.topk_backward(g, x, w, 60)
    assert torch.equal(idx, ref_idx)
    assert_close_to_reference(dx, ref_dx, torch.float32)
    assert_close_to_reference(dw, ref_dw, torch.float32)


def test_results_do_not_depend_on_thread_count(cpu, seed):
    g, x, w = torch.randn(40, 300), torch.randn(40, 200), torch.randn(300, 200)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.topk_backward(g, x, w, 30)
        torch.set_num_threads(2)
        two = cpu.topk_backward(g, x, w, 30)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_out_of_range_indices_are_rejected(cpu):
    g, x, w = torch.randn(2, 6), torch.randn(2, 3), torch.randn(6, 3)
    with pytest.raises(RuntimeError, match="outside"):
        cpu.sparse_backward(g, torch.tensor([[0, 6], [1, 2]]), x, w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_is_rejected(cpu, bad):
    g = torch.randn(4, 30)
    g[2, 7] = bad
    with pytest.raises(InvalidGradientError):
        cpu.topk_indices(g, 5)
    with pytest.raises(InvalidGradientError):
        cpu.topk_backward(g, torch.randn(4, 6), torch.randn(30, 6), 5)


@pytest.mark.parametrize("batch,n_in,n_out,k", SHAPES)
def test_unified_backward_matches_reference(cpu, threads, seed, batch, n_in, n_out, k):
    g = gradient(batch, n_out, "halves", torch.float64)
    x, w = torch.randn(batch, n_in, dtype=torch.float64), torch.randn(n_out, n_in, dtype=torch.float64)
    dx, dw, cols = cpu.unified_backward(g, x, w, k)
    ref_dx, ref_dw, ref_cols = REF.unified_backward(g, x, w, k)
    assert torch.equal(cols, ref_cols)
    assert_close_to_reference(dx, ref_dx, torch.float64, terms=min(k, n_out))
    assert_close_to_reference(dw, ref_dw, torch.float64, terms=batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unified_backward_is_the_shared_one_with_the_kernel_hooks(cpu, seed, dtype):
    """The kernel's selection and row writes change no bit of the shared unified products."""
    g, x, w = gradient(19, 70, "halves", dtype), torch.randn(19, 33, dtype=dtype), torch.randn(70, 33, dtype=dtype)
    portable = load_backend("torch")
    for need_dx in (True, False):
        for got, want in zip(cpu.unified_backward(g, x, w, 9, need_dx), portable.unified_backward(g, x, w, 9, need_dx)):
            assert (got is None and want is None) or torch.equal(got, want)
    cols = torch.tensor([2, 5, 69])
    src = torch.randn(3, 33, dtype=dtype)
    assert torch.equal(cpu.scatter_rows(src, cols, 70), portable.scatter_rows(src, cols, 70))


def test_wide_layer_streaming_stores_and_recycled_buffers(cpu, seed):
    """dW of 8 MiB and more is written around the caches into recycled buffers: same values, every call."""
    g, x, w = gradient(8, 2048, "halves"), torch.randn(8, 1024), torch.randn(2048, 1024)
    ref_dx, ref_dw, _ = REF.topk_backward(g, x, w, 5)
    ref_unified = REF.unified_backward(g, x, w, 5)
    for _ in range(3):  # later calls reuse the buffers the earlier ones returned
        dx, dw, _ = cpu.topk_backward(g, x, w, 5)
        assert_close_to_reference(dw, ref_dw, torch.float32, terms=8)  # sums over the 8 rows
        assert_close_to_reference(dx, ref_dx, torch.float32, terms=5)  # sums over the 5 kept columns
        udx, udw, ucols = cpu.unified_backward(g, x, w, 5)
        assert torch.equal(ucols, ref_unified[2])
        assert_close_to_reference(udx, ref_unified[0], torch.float32, terms=5)
        assert_close_to_reference(udw, ref_unified[1], torch.float32, terms=8)
        del dx, dw


def test_other_dtypes_use_the_portable_path(cpu, seed):
    g, x, w = (torch.randn(6, 40).bfloat16(), torch.randn(6, 12).bfloat16(), torch.randn(40, 12).bfloat16())
    torch_backend = load_backend("torch")
    for a, b in zip(cpu.topk_backward(g, x, w, 7), torch_backend.topk_backward(g, x, w, 7)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED, MePropMode.RANDOM, MePropMode.DENSE])
def test_meprop_linear_cpu_matches_reference(threads, seed, mode):
    layers = {}
    for name in ("cpu", "reference"):
        torch.manual_seed(seed)
        layers[name] = MePropLinear(37, 29, MePropConfig(mode=mode, k=6, backend=name), track_hits=True)
    x = torch.randn(11, 37)
    outputs = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed + 1)  # the same random draws for RANDOM mode
        (layer(xi) ** 2).sum().backward()
        outputs[name] = (xi.grad, layer.weight.grad, layer.bias.grad, layer.hits.clone())
    for got, want in zip(outputs["cpu"][:3], outputs["reference"][:3]):
        # no sum is longer than the 29 outputs (dx in dense mode) or the 11 rows (dW, db)
        assert_close_to_reference(got, want, torch.float32, terms=29)
    assert torch.equal(outputs["cpu"][3], outputs["reference"][3])


#: run in a fresh interpreter (so this process keeps its loaded kernels and build state): the cpu backend by
#: name, then what ``auto`` chooses
LOAD_BY_NAME_THEN_AUTO = textwrap.dedent(
    """
    import logging
    from mesimp_gpu.backends import BackendUnavailable, get_backend, load_backend
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        load_backend("cpu")
    except BackendUnavailable as exc:
        print("BY NAME:", exc)
    print("AUTO:", get_backend("auto", "cpu").name)
    """
)


def test_missing_compiler_falls_back_to_torch(tmp_path):
    """No compiler (CXX points nowhere, empty cache): ``auto`` warns and uses torch; by name it is a clear error.

    Runs in a fresh interpreter so that this process keeps its loaded kernels and build state.
    """
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    run = subprocess.run([sys.executable, "-c", LOAD_BY_NAME_THEN_AUTO], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "BY NAME: backend 'cpu' needs a C++ compiler" in run.stdout
    assert "AUTO: torch" in run.stdout
    warnings = [line for line in run.stderr.splitlines() if "skipping cpu" in line]
    assert len(warnings) == 1 and "compiler" in warnings[0]


def test_levels_agree_bit_for_bit(seed):
    """Every level sums each element in the same order (the vector tails too), so the AVX2 and AVX-512
    builds give the same bits; widths with tails at every vector size."""
    if len(LEVELS) < 2:
        pytest.skip(f"this machine runs one level only ({LEVELS})")
    g, x, w = gradient(37, 203, "halves"), torch.randn(37, 77), torch.randn(203, 77)
    idx = random_indices(37, 203, 30, g.device)
    results = {}
    for level in LEVELS:
        backend = level_backend(level)
        results[level] = (*backend.topk_backward(g, x, w, 30), *backend.sparse_backward(g, idx, x, w))
    first, *others = results.values()
    for other in others:
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_build_folders_are_keyed_by_level_torch_and_python(monkeypatch):
    """Two environments (another torch install or Python) never share, and so never rebuild, a folder."""
    from torch.utils import cpp_extension

    names = {level: cpu_module.build_directory(level)[0] for level in ARCH_LEVELS}
    assert len(set(names.values())) == len(ARCH_LEVELS)
    assert all(name.startswith(f"mesimp_cpu_{level.replace('-', '_')}_") for level, name in names.items())
    before = cpu_module.build_directory("x86-64-v3")
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/another/venv/torch/include"])
    other_torch = cpu_module.build_directory("x86-64-v3")
    monkeypatch.setattr(sys.implementation, "cache_tag", "cpython-399")
    other_python = cpu_module.build_directory("x86-64-v3")
    assert len({before, other_torch, other_python}) == 3
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/some/root")
    assert cpu_module.build_directory("x86-64-v3")[1].parent == Path("/some/root/mesimp_gpu")


def test_unknown_or_foreign_level_is_a_clear_error(monkeypatch):
    from mesimp_gpu.backends import BackendUnavailable

    monkeypatch.setenv("MESIMP_CPU_ARCH", "pentium")
    with pytest.raises(BackendUnavailable, match="MESIMP_CPU_ARCH='pentium'.*x86-64-v3"):
        cpu_module.CpuBackend()
    foreign = [level for level in ARCH_LEVELS if level not in runnable_levels()]
    if foreign:
        with pytest.raises(BackendUnavailable, match="cannot run here"):
            cpu_module.CpuBackend(foreign[0])


def test_failed_build_falls_back_to_torch_with_the_compilers_message(tmp_path):
    """A compiler that fails: one line announces the build, the error names the compiler's first error, and
    ``auto`` uses torch. Runs in a fresh interpreter with its own (empty) extensions folder."""
    fake = tmp_path / "c++"
    # answers torch's version probe like the real compiler, fails every compile
    fake.write_text("#!/bin/sh\ncase \"$1\" in --version|-v|-dumpversion) exec c++ \"$@\";; esac\n"
                    "echo 'main.cpp:12:3: error: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, CXX=str(fake), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), MESIMP_CPU_ARCH="native")
    run = subprocess.run([sys.executable, "-c", LOAD_BY_NAME_THEN_AUTO], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "main.cpp:12:3: error: simulated failure" in run.stdout
    assert "AUTO: torch" in run.stdout
    announced = [line for line in run.stderr.splitlines() if "building the cpu backend's kernels for native" in line]
    assert len(announced) == 1 and "minutes" in announced[0]


def test_levels_are_backend_names_for_layers_and_the_bench(seed):
    """``cpu@<level>`` is a registry name (layers resolve it by name), and the bench's ``--cpu-arch`` puts one
    such backend per level where ``cpu`` was, skipping a level this CPU cannot run with the reason."""
    from mesimp_gpu.backends import is_backend_name
    from mesimp_gpu.bench.runner import cpu_levels, with_cpu_levels

    assert is_backend_name("cpu@x86-64-v3") and not is_backend_name("torch@x86-64-v3") and not is_backend_name("cpu@")
    level = LEVELS[-1]
    layers = {}
    for name in (f"cpu@{level}", "reference"):
        torch.manual_seed(seed)
        layers[name] = MePropLinear(23, 31, MePropConfig(MePropMode.TOPK, k=4, backend=name))
    x = torch.randn(7, 23)
    grads = []
    for layer in layers.values():
        (layer(x) ** 2).sum().backward()
        grads.append(layer.weight.grad)
    assert_close_to_reference(grads[0], grads[1], torch.float32, terms=7)
    foreign = [name for name in ARCH_LEVELS if name not in runnable_levels()]
    backends, skipped = with_cpu_levels({"torch": load_backend("torch"), "cpu": load_backend("cpu")}, {},
                                        (*LEVELS, *foreign[:1]))
    assert list(backends) == ["torch", *(f"cpu@{name}" for name in LEVELS)]
    assert all(backends[f"cpu@{name}"].arch == name for name in LEVELS)
    if foreign:
        assert "cannot run here" in skipped[f"cpu@{foreign[0]}"]
    assert set(cpu_levels(backends)) == {f"cpu@{name}" for name in LEVELS}


def test_train_suite_runs_each_level_as_its_own_set():
    from mesimp_gpu.bench.config import BenchConfig
    from mesimp_gpu.bench.train import train_backends

    cpu_device = torch.device("cpu")
    assert train_backends(BenchConfig(cpu_archs=("x86-64-v3", "native")), cpu_device) == [
        ("cpu@x86-64-v3", " [cpu@x86-64-v3]"), ("cpu@native", " [cpu@native]")]
    assert train_backends(BenchConfig(), cpu_device) == [("cpu", "")]
    with pytest.raises(ValueError, match="--cpu-arch 'pentium'"):
        BenchConfig(cpu_archs=("pentium",))


def test_process_clock_counts_computing_not_waiting():
    """--cpu-clock process: a call that sleeps (as a descheduled process waits) costs nothing on it."""
    import time

    from mesimp_gpu.bench.config import BenchConfig
    from mesimp_gpu.bench.timing import clock_for

    cpu_device = torch.device("cpu")
    assert clock_for(cpu_device, "process").per_call(lambda: time.sleep(0.05), 1) < 0.02
    assert clock_for(cpu_device, "wall").per_call(lambda: time.sleep(0.05), 1) >= 0.05
    with pytest.raises(ValueError, match="--cpu-clock"):
        BenchConfig(cpu_clock="tsc")


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path, capsys) -> None:
    from mesimp_gpu.backends.cpu import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    lock.write_text("")
    clear_stale_lock(tmp_path)
    assert lock.exists(), "a fresh lock belongs to a build that is running"
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    clear_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in capsys.readouterr().err
    clear_stale_lock(tmp_path)  # no lock: nothing to do
