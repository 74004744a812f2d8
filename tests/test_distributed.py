"""Data-parallel training: 2 gloo processes on the CPU (1 thread each) against one process on the same global batches.

Tolerance: after the same update steps, N=2 and N=1 differ only in the order of the gradient sums (each process
sums its half of the batch, then the two halves are added); float32 parameters agree within atol = rtol = 1e-5
(the float32 entry of the tolerance table), the selections and meSimp's kept neurons exactly. Every process of a
run must hold bit-identical parameters. Each communication hook must give the same model as DDP's dense
all-reduce, within the same tolerance (it adds the same rows in the same order; only the packing differs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from mesimp_gpu.bench import distributed as bench
from mesimp_gpu.bench.distributed import Spec
from mesimp_gpu.data.mnist import Mnist, Split
from mesimp_gpu.meprop import MePropMode
from mesimp_gpu.train.distributed import Comm, DistributedOptions, Processes, check_lazy, configure, launch
from mesimp_gpu.train.mnist import MnistConfig, train_mnist
from mesimp_gpu.train.settings import Method
from reference import tolerance

#: float32 sums in another order (the float32 entry of the one tolerance table)
ATOL, RTOL = tolerance(torch.float32)


def tiny_data(seed: int = 0) -> Mnist:
    """Random 'images' whose labels depend on them (so training moves), 256 train and 64 dev/test examples."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.rand(n, 784, generator=g)
        labels = (images[:, :10].argmax(dim=1)).long()
        return Split(images, labels)

    return Mnist(split(256), split(64), split(64))


def tiny_config(out: Path, method: Method, **overrides) -> MnistConfig:
    settings = dict(method=method, k=4, hidden_sizes=(24, 16), epochs=2, batch_size=32, chunks=2, cycle=1,
                    prune=0.2, threads=1, backend="torch", out=str(out), progress=False)
    return MnistConfig(**{**settings, **overrides})


class KeepStates:
    """Keeps the model's parameters after every piece (after its prune step)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_chunk_end(self, trainer, epoch: int, chunk: int) -> dict:
        self.states.append({k: v.clone() for k, v in trainer.model.state_dict().items() if k.endswith(("weight", "bias"))})
        return {}


def run_and_save(config: MnistConfig, comm: str, resume: bool = False) -> None:
    """One process of a run (or the single one): train, then save this process's parameters after every piece."""
    configure(DistributedOptions(comm=Comm(comm), timeout_s=60))
    keep = KeepStates()
    results = train_mnist(config, resume=resume, data=tiny_data(), hooks=(keep,))
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"results": results, "states": keep.states}, Path(config.out) / f"rank{rank}.pt")


def run_all(runs: list[tuple[MnistConfig, str, bool]], specs: list[Spec], folder: Path) -> None:
    """Several runs (config, comm, resume) one after another in the same processes (one start-up for all),
    then the bench suite's measurements of ``specs``."""
    for config, comm, resume in runs:
        run_and_save(config, comm, resume)
    data = tiny_data()
    bench.worker(specs, data.train.images.repeat(4, 1), data.train.labels.repeat(4), "cpu", str(folder))


#: (method, comm) of every two-process run the tests compare
CASES = [(Method.DENSE, "dense"), (Method.MEPROP, "dense"), (Method.UNIFIED, "dense"), (Method.MESIMP, "dense"),
         (Method.MEPROP, "rows"), (Method.UNIFIED, "rows"), (Method.MESIMP, "rows")]


#: the bench suite's configurations measured by two processes (dense, row hook, shared unified set)
BENCH_SPECS = [Spec("mnist-mlp", MePropMode.DENSE, Comm.DENSE, 20, 100, 2, "torch"),
               Spec("mnist-mlp", MePropMode.TOPK, Comm.ROWS, 20, 100, 2, "torch"),
               Spec("mnist-mlp", MePropMode.UNIFIED, Comm.ROWS, 20, 100, 2, "torch")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case of :data:`CASES` run by one process (``one-<method>``) and by two (``two-<method>-<comm>``)."""
    root = tmp_path_factory.mktemp("distributed")
    for method in dict(CASES):
        run_and_save(tiny_config(root / f"one-{method.value}", method), "dense")
    run_and_save(tiny_config(root / "one-meprop-lazy", Method.MEPROP, lazy=True, batch_size=4), "dense")
    runs = [(tiny_config(root / f"two-{m.value}-{c}", m), c, False) for m, c in CASES]
    runs.append((tiny_config(root / "two-meprop-lazy", Method.MEPROP, lazy=True, batch_size=4), "rows",
                 False))
    stopped = root / "two-mesimp-resumed"  # stopped after its first epoch, then resumed
    runs += [(tiny_config(stopped, Method.MESIMP, epochs=1), "rows", False),
             (tiny_config(stopped, Method.MESIMP), "rows", True)]
    launch(2, run_all, runs, BENCH_SPECS, root, threads=1)
    return root


def saved(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def assert_close_models(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=name)


def test_shards_cover_the_batch_once() -> None:
    for n in (0, 1, 5, 32, 33):
        for world in (1, 2, 3, 4):
            parts = [Processes(r, world).shard(list(range(n))) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]


@pytest.mark.parametrize("method", [Method.DENSE, Method.MEPROP, Method.UNIFIED, Method.MESIMP])
def test_two_processes_equal_one(runs: Path, method: Method) -> None:
    one, two = runs / f"one-{method.value}", runs / f"two-{method.value}-dense"
    single, main, other = saved(one), saved(two, 0), saved(two, 1)
    assert len(single["states"]) == len(main["states"]) == 4
    for s1, s2, s3 in zip(single["states"], main["states"], other["states"]):
        assert_close_models(s1, s2)
        for name in s2:  # every process holds exactly the same parameters, after every prune step too
            assert torch.equal(s2[name], s3[name]), name
    h1, h2 = single["results"]["history"], main["results"]["history"]
    assert [r["sizes"] for r in h1] == [r["sizes"] for r in h2]  # meSimp removed the same neurons
    if method is Method.MESIMP:
        assert h1[-1]["sizes"] != tiny_config(one, method).sizes  # it did prune
    for r1, r2 in zip(h1, h2):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r2["dev_acc"] == r1["dev_acc"]
    assert untimed(other["results"]["history"]) == untimed(h2)  # the other process ran the same run
    written = json.loads((two / "results.json").read_text())
    assert written["final"]["sizes"] == main["results"]["final"]["sizes"]


@pytest.mark.parametrize("method", [Method.MEPROP, Method.UNIFIED, Method.MESIMP])
def test_row_hook_gives_the_dense_all_reduce_model(runs: Path, method: Method) -> None:
    dense, rows = saved(runs / f"two-{method.value}-dense"), saved(runs / f"two-{method.value}-rows")
    for s1, s2, s3 in zip(dense["states"], rows["states"], saved(runs / f"two-{method.value}-rows", 1)["states"]):
        assert_close_models(s1, s2)
        for name in s2:
            assert torch.equal(s2[name], s3[name]), name
    assert [r["sizes"] for r in dense["results"]["history"]] == [r["sizes"] for r in rows["results"]["history"]]


def test_resumed_run_continues_exactly(runs: Path) -> None:
    whole, resumed = saved(runs / "two-mesimp-rows"), saved(runs / "two-mesimp-resumed")
    assert len(resumed["states"]) == 2  # the second epoch's pieces
    for rank in (0, 1):
        for s1, s2 in zip(saved(runs / "two-mesimp-rows", rank)["states"][2:],
                          saved(runs / "two-mesimp-resumed", rank)["states"]):
            for name in s1:
                assert torch.equal(s1[name], s2[name]), name
    assert untimed(resumed["results"]["history"]) == untimed(whole["results"]["history"])


def test_resume_needs_the_same_number_of_processes(runs: Path) -> None:
    config = tiny_config(runs / "two-mesimp-resumed", Method.MESIMP, epochs=3)
    with pytest.raises(ValueError, match="written by a run of 2 process.*--nproc 2"):
        train_mnist(config, resume=True, data=tiny_data())


class FailAt:
    """Makes process ``rank`` raise (or hang) after its first piece."""

    def __init__(self, rank: int, hang: bool) -> None:
        self.rank, self.hang = rank, hang

    def on_chunk_end(self, trainer, epoch: int, chunk: int) -> dict:
        if trainer.dist.procs.rank == self.rank:
            if self.hang:
                time.sleep(600)
            raise ValueError("injected failure")
        return {}


def fail_run(config: MnistConfig, rank: int, hang: bool) -> None:
    configure(DistributedOptions(timeout_s=5))
    train_mnist(config, data=tiny_data(), hooks=(FailAt(rank, hang),))


def test_a_failing_process_stops_the_others(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match="process 1 of 2 failed: ValueError: injected failure; the other processes "
                                         "were stopped"):
        launch(2, fail_run, tiny_config(tmp_path, Method.MEPROP), 1, False, threads=1)
    assert time.monotonic() - start < 120  # no hang (generous: process start-up on a busy machine)


def test_a_silent_process_makes_the_others_stop_after_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"process 0 of 2 failed: PeerFailure: process 0 of 2: another process of "
                                         r"the run stopped or did not answer within 5 s"):
        launch(2, fail_run, tiny_config(tmp_path, Method.MEPROP), 1, True, threads=1)
    assert time.monotonic() - start < 120


def test_bench_counts_the_bytes_each_communication_sends(runs: Path) -> None:
    dense, rows, shared = torch.load(runs / "measured.pt", weights_only=False)
    # DDP's all-reduce: every gradient entry of 784-500-500-10, float32
    full = 4 * (784 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10)
    assert dense["bytes"] == [full, full] and dense["dense_bytes"] == full
    # shared unified set: k = 20 rows of each hidden weight, the other gradients in full, and the
    # column scores of both hidden layers; no row masks
    expected = 4 * (20 * 784 + 20 * 500 + 500 + 500 + 500 * 10 + 10 + 2 * 500)
    assert shared["bytes"] == [expected, expected]
    # row hook: one mask byte per hidden row, then the union's rows (at least k, at most all)
    others = 4 * (500 + 500 + 500 * 10 + 10)
    for sent in rows["bytes"]:
        assert 1000 + others + 4 * 20 * (784 + 500) <= sent <= 1000 + full


def test_lazy_optimizer_updates_the_rows_every_process_touched(runs: Path) -> None:
    single, main, other = (saved(runs / "one-meprop-lazy"), saved(runs / "two-meprop-lazy"),
                           saved(runs / "two-meprop-lazy", 1))
    for s1, s2, s3 in zip(single["states"], main["states"], other["states"]):
        assert_close_models(s1, s2)
        for name in s2:
            assert torch.equal(s2[name], s3[name]), name


def test_lazy_optimizer_needs_the_row_hook() -> None:
    with pytest.raises(ValueError, match="--lazy over several processes needs --comm rows"):
        check_lazy(True, 2, Comm.DENSE)
    check_lazy(True, 2, Comm.ROWS)
    check_lazy(True, 1, Comm.DENSE)
