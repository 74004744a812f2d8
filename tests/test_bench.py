"""The benchmark harness on a tiny configuration, its statistics helpers and its command line.

No test looks at how fast anything is: timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.bench.calibrate import add_hardware_fractions
from mesimp_gpu.bench.common import available_backends, check_fields, relative_error
from mesimp_gpu.bench.config import QUICK, BenchConfig, Pass, Provider, Suite, make_config
from mesimp_gpu.bench.report import load, markdown_table, plot_links, plot_paths, render, report_file
from mesimp_gpu.bench.parse import UD_ENV, load_treebank
from mesimp_gpu.bench.runner import run_bench
from mesimp_gpu.bench.train import take_turns
from mesimp_gpu.bench.layer import Candidate, Oracle, check, meprop_layer
from mesimp_gpu.bench.timing import CpuClock, measure, rounds_for, speedup, summarize
from mesimp_gpu.bench.topk import mismatch
from mesimp_gpu.cli import app
from mesimp_gpu.data.mnist import Mnist, Split
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode

HAS_CUDA = torch.cuda.is_available()


#: the suites that need no treebank
NO_TREEBANK = (Suite.LAYER, Suite.TOPK, Suite.TRAIN)


def tiny_config(tmp_path, **changes) -> BenchConfig:
    """Every suite on shapes that take milliseconds; one sample per provider; a parser of 24 hidden units on 60
    sentences (the parse suite only runs where a test names a treebank: ``ud_dir`` points nowhere otherwise)."""
    settings = dict(suites=NO_TREEBANK, batches=(4,), widths=(32,), ks=(3,), k_fraction=1 / 8, warmup=1,
                    min_repeats=2, max_repeats=2, budget_s=1e-3, min_sample_s=1e-5, train_limit=100, train_epochs=2,
                    parse_limit=60, parse_epochs=1, parse_k=4, parse_hidden=24, parse_decode_repeats=2,
                    ud_dir=str(tmp_path / "no-treebank-here"), threads=1, out_dir=str(tmp_path))
    return make_config(**{**settings, **changes})


def fake_mnist(n: int = 300) -> Mnist:
    """Random images and labels shaped like MNIST (the train suite needs no real data to run)."""
    gen = torch.Generator().manual_seed(0)

    def split(size: int) -> Split:
        return Split(torch.rand(size, 784, generator=gen), torch.randint(0, 10, (size,), generator=gen))

    return Mnist(split(n), split(100), split(100))


# --- statistics helpers -------------------------------------------------------------------------


def test_summarize_median_and_percentiles():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0], inner=7)
    assert (stats.median, stats.p20, stats.p80) == (3.0, 1.8, 4.2)
    assert (stats.repeats, stats.inner) == (5, 7)
    assert summarize([2.5]).median == 2.5
    with pytest.raises(ValueError):
        summarize([])


def test_speedup_is_ratio_of_medians():
    assert speedup(summarize([4.0, 4.0]), summarize([1.0, 1.0])) == 4.0


def test_rounds_fit_budget_within_bounds():
    assert rounds_for([0.1, 0.1], budget_s=1.0, min_repeats=2, max_repeats=50) == 5
    assert rounds_for([10.0], budget_s=1.0, min_repeats=3, max_repeats=50) == 3
    assert rounds_for([1e-6], budget_s=1.0, min_repeats=3, max_repeats=50) == 50
    assert rounds_for([0.0], budget_s=1.0, min_repeats=3, max_repeats=9) == 9


def test_measure_calls_every_provider_side_by_side():
    calls = {"a": 0, "b": 0}

    def make(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    plan = BenchConfig(warmup=2, min_repeats=4, max_repeats=4, budget_s=1.0, min_sample_s=1e-9)
    stats = measure([make("a"), make("b")], CpuClock(), plan)
    assert [s.repeats for s in stats] == [4, 4]
    assert all(s.p20 <= s.median <= s.p80 for s in stats)
    assert calls["a"] == calls["b"] >= 2 + 1 + 4  # warm-up, estimate, samples


def test_relative_error_and_check():
    expected = torch.tensor([[2.0, -4.0]])
    assert relative_error(expected.clone(), expected) == 0.0
    assert relative_error(torch.tensor([[2.0, -3.0]]), expected) == pytest.approx(0.25)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert check_fields(0.25, 1e-4) == {"max_error": 0.25, "check_passed": False}
    assert check_fields(0.0, 0.0)["check_passed"]


def test_mismatch_compares_index_sets():
    expected = torch.tensor([[0, 2], [1, 3]])
    assert mismatch(torch.tensor([[2, 0], [3, 1]]), expected) == 0.0
    assert mismatch(torch.tensor([[2, 0], [3, 0]]), expected) == 0.5


def test_layer_ks_and_presets():
    config = BenchConfig(ks=(5, 20, 160), k_fraction=1 / 16)
    assert config.layer_ks(500) == [5, 20, 31, 160]
    assert config.layer_ks(64) == [4, 5, 20]  # k >= n is dense, left out
    assert BenchConfig(ks=(5,), k_fraction=0).layer_ks(500) == [5]
    quick = make_config(quick=True, batches=[7, 7, 3], threads=None)
    assert quick.quick and quick.batches == (7, 3) and quick.widths == QUICK["widths"]
    assert make_config().batches == (10, 100, 1024)
    assert Suite.PARSE in BenchConfig().suites and BenchConfig().parse_limit is None  # all of the treebank
    assert make_config(quick=True).parse_limit == QUICK["parse_limit"] and make_config(quick=True).parse_epochs == 1
    assert BenchConfig().thread_count >= 1


@pytest.mark.parametrize("changes", [dict(batches=(0,)), dict(ks=()), dict(threads=0), dict(min_repeats=0),
                                     dict(min_repeats=5, max_repeats=2), dict(k_fraction=1.0), dict(suites=()),
                                     dict(parse_limit=0), dict(parse_epochs=0), dict(parse_decode_repeats=0),
                                     dict(parse_k=30, parse_hidden=20)])
def test_bad_config_is_rejected(changes):
    with pytest.raises(ValueError):
        BenchConfig(**changes)


def test_check_catches_a_wrong_result():
    torch.manual_seed(0)
    shared = MePropLinear(32, 32)
    x, g = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    oracle, params = Oracle(x, g, shared.weight, seed=0), (shared.weight, shared.bias)
    for mode, provider in [(MePropMode.TOPK, Provider.TOPK), (MePropMode.RANDOM, Provider.RANDOM)]:
        right = Candidate(provider, "torch", 3, meprop_layer(shared, MePropConfig(mode, 3, "torch")))
        assert check(right, oracle, x, g, params) < 1e-5
    assert shared.config.mode is MePropMode.TOPK  # the views did not change the shared layer
    dense_claiming_topk = Candidate(Provider.TOPK, None, 3, meprop_layer(shared, MePropConfig(MePropMode.DENSE)))
    assert check(dense_claiming_topk, oracle, x, g, params) > 0.1


def test_cpu_backends_exclude_gpu_ones():
    loaded, skipped = available_backends(torch.device("cpu"))
    assert "torch" in loaded and "reference" not in loaded
    assert "triton" in skipped and "cupy" in skipped  # Triton's interpreter is not a benchmark


def test_hardware_fraction_from_calibration():
    rows = [{"suite": Suite.LAYER.value, "status": "ok", "provider": Provider.DENSE.value, "batch": 100,
             "width": 1000, "k": None, "pass": Pass.BACKWARD.value, "median_s": 1e-3},
            {"suite": Suite.LAYER.value, "status": "ok", "provider": Provider.TOPK.value, "batch": 100,
             "width": 1000, "k": 10, "pass": Pass.FORWARD_BACKWARD.value, "median_s": 1e-3},
            {"suite": Suite.TOPK.value, "status": "ok", "median_s": 1e-3}]
    add_hardware_fractions(rows, {"matmul_fp32_tflops": 0.4, "copy_gbs": 1000.0})
    assert rows[0]["roofline_s"] == pytest.approx(4 * 100 * 1000 * 1000 / 0.4e12)  # compute bound
    assert rows[0]["hw_fraction"] == pytest.approx(1.0)
    forward_and_sparse_backward = 2 * 100 * 1000 * 1000 + 4 * 100 * 10 * 1000
    assert rows[1]["roofline_s"] == pytest.approx(forward_and_sparse_backward / 0.4e12)
    assert "hw_fraction" not in rows[2]


# --- the harness end to end -----------------------------------------------------------------------


def test_harness_runs_writes_and_redraws(tmp_path):
    config = tiny_config(tmp_path)
    lines: list[str] = []
    path, doc = run_bench(config, command="mesimp-gpu bench (test)", data=fake_mnist(), log=lines.append)
    assert path.parent == tmp_path and path.name.startswith("bench-cpu-") and path.suffix == ".json"
    saved = load(path)
    assert saved["finished"] and saved["header"]["machine"]["cpu_count"] >= 1
    assert saved["header"]["threads"] == 1 and saved["header"]["command"] == "mesimp-gpu bench (test)"
    assert {"torch"} <= set(saved["header"]["backends"])
    rows = saved["rows"]
    assert {r["suite"] for r in rows} == {s.value for s in NO_TREEBANK}

    layer = [r for r in rows if r["suite"] == Suite.LAYER.value]
    labels = {r["label"] for r in layer}
    assert {"dense", "meprop-topk[torch]", "meprop-unified[torch]", "meprop-random[torch]", "prior-scatter",
            "prior-sparse"} <= labels
    assert {r["k"] for r in layer if r["k"]} == {3, 4}
    assert {r["pass"] for r in layer} == {p.value for p in Pass}
    for r in layer + [r for r in rows if r["suite"] == Suite.TOPK.value]:
        assert r["status"] == "ok" and r["check_passed"], r
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["speedup"] > 0
    assert all(r["speedup"] == 1.0 for r in layer if r["provider"] == Provider.DENSE.value)

    topk = [r for r in rows if r["suite"] == Suite.TOPK.value]
    assert {r["label"] for r in topk} >= {"torch.topk", "topk_indices[torch]"}
    assert all(r["bandwidth_gbs"] > 0 for r in topk)

    train = [r for r in rows if r["suite"] == Suite.TRAIN.value]
    assert [r["label"] for r in train] == ["dense", "dense --lazy", "meprop", "meprop --lazy", "mesimp",
                                           "mesimp --lazy"]
    assert all(r["lazy"] == r["label"].endswith("--lazy") for r in train)
    assert train[0]["run_speedup"] == 1.0 and all(r["run_s"] > 0 for r in train)
    assert all(set(r["phases_s"]) == {"forward", "backward", "update"} for r in train)
    assert all(0 <= r["test_acc"] <= 100 and r["images"] == 100 for r in train)
    assert all(r["repeats"] == 2 for r in train)  # methods take turns by epoch, continued from checkpoints

    plots = plot_paths(path, saved)
    assert plots and all(p.is_file() for p in plots.values())
    for p in plots.values():
        p.unlink()
    text = report_file(path)
    assert all(p.is_file() for p in plots.values())
    assert text == render(saved, plot_links(saved, path))
    assert all(f"]({p.name})" in text for p in plots.values())
    assert "### backward" in text and "| B | n | k |" in text and "torch.topk" in text and "meprop" in text
    assert any(line.startswith("layer B=4 n=32") for line in lines)

    # a CUDA run's report: calibration table and roofline fractions (computed here from made-up figures)
    saved["header"]["calibration"] = {"copy_gbs": 100.0, "matmul_fp32_tflops": 1.0, "matmul_tf32_tflops": 2.0,
                                      "matmul_bf16_tflops": 4.0, "launch_us": 3.0}
    add_hardware_fractions(saved["rows"], saved["header"]["calibration"])
    gpu_text = render(saved)
    assert "## Calibration" in gpu_text and "Fraction of the hardware roofline" in gpu_text
    next(r for r in saved["rows"] if r["label"] == "prior-sparse")["check_passed"] = False
    assert "✗" in render(saved)  # a failed check is marked in the tables


def test_memory_limit_and_cpu_flop_cap_skip_with_reasons(tmp_path):
    config = tiny_config(tmp_path, suites=(Suite.LAYER,), batches=(4, 64), widths=(32,), ks=(3,), k_fraction=0,
                         memory_limit_gib=1e-9, cpu_max_gflop=6 * 16 * 32 * 32 / 1e9)
    _, doc = run_bench(config, log=lambda line: None)
    rows = doc["rows"]
    shape_skip = [r for r in rows if r["batch"] == 64]
    assert len(shape_skip) == 1 and shape_skip[0]["status"] == "skipped" and "GFLOP" in shape_skip[0]["reason"]
    gathered = [r for r in rows if r["label"] == "meprop-topk[torch]"]
    assert gathered and all(r["status"] == "skipped" and "GiB" in r["reason"] for r in gathered)
    unified = [r for r in rows if r["label"] == "meprop-unified[torch]"]
    assert unified and all(r["status"] == "ok" for r in unified)  # no gather: within any limit
    assert "skipped" in render(doc)


# --- the parse suite -------------------------------------------------------------------------------


def test_take_turns_goes_epoch_by_epoch_and_keeps_the_last_result():
    calls: list[tuple[str, int]] = []

    def train_to(name: str, epoch: int) -> str:
        calls.append((name, epoch))
        return f"{name}@{epoch}"

    assert take_turns(["a", "b", "c"], 2, train_to) == {"a": "a@2", "b": "b@2", "c": "c@2"}
    assert calls == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)]


@pytest.fixture(scope="module")
def parse_run(ud_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The parse suite once on 60 training sentences of UD English EWT (100 dev and test), 24 hidden units,
    two epochs (the second continues each run's checkpoint)."""
    tmp = tmp_path_factory.mktemp("bench-parse")
    config = tiny_config(tmp, suites=(Suite.PARSE,), ud_dir=str(ud_dir), parse_epochs=2)
    return run_bench(config, command="mesimp-gpu bench (parse test)", log=lambda line: None)


def test_parse_suite_trains_three_methods_and_times_both_decoders(parse_run):
    path, doc = parse_run
    rows = load(path)["rows"]
    assert all(r["suite"] == Suite.PARSE.value and r["status"] == "ok" for r in rows)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["label"] for r in train] == ["dense", "meprop", "mesimp"]
    assert [r["k"] for r in train] == [None, 4, 4] and all(r["hidden"] == 24 for r in train)
    for r in train:
        assert r["sentences"] == 60 and r["dev_sentences"] == r["test_sentences"] == 100
        assert r["transitions"] > 0 and r["epochs"] == 2 and r["repeats"] == 2  # one sample per epoch
        assert set(r["phases_s"]) == {"forward", "backward", "update"} and all(v > 0 for v in r["phases_s"].values())
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["run_s"] == pytest.approx(2 * r["median_s"])
        assert r["speedup"] > 0 and r["run_speedup"] > 0 and r["backward_speedup"] > 0
        assert 0 <= r["test_las"] <= r["test_uas"] <= 100 and 0 <= r["test_las_no_punct"] <= r["test_uas_no_punct"]
        assert 1 <= r["kept_at_best_dev"] <= 24 and 1 <= r["kept"] <= r["kept_at_best_dev"]
    assert train[0]["speedup"] == train[0]["run_speedup"] == train[0]["backward_speedup"] == 1.0
    dense_backward, meprop_backward = (r["phases_s"]["backward"] for r in train[:2])
    assert train[1]["backward_speedup"] == pytest.approx(dense_backward / meprop_backward)
    assert train[0]["kept"] == train[1]["kept"] == 24, "only meSimp prunes"
    assert train[2]["kept"] < 24, "meSimp removed hidden units"
    assert train[0]["provider"] == Provider.DENSE.value and train[2]["provider"] == Provider.TOPK.value

    decode = [r for r in rows if r["kind"] == "decode"]
    assert [r["label"] for r in decode] == ["dense parser", "mesimp parser"]
    assert [r["provider"] for r in decode] == [Provider.DENSE.value, Provider.SIMPLIFIED.value]
    dense, simplified = decode
    assert dense["hidden"] == 24 and simplified["hidden"] == train[2]["kept_at_best_dev"] < 24
    assert simplified["parameters"] < dense["parameters"]
    for r in decode:
        assert r["split"] == "dev" and r["sentences"] == 100 and r["words"] > r["sentences"]
        assert r["repeats"] == 2 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["sentences_per_s_p20"] <= r["sentences_per_s"] <= r["sentences_per_s_p80"]
        assert r["sentences_per_s"] == pytest.approx(100 / r["median_s"])
        assert r["check_passed"], r  # the timed model is the one the trainer scored (same dev UAS)
    assert dense["speedup"] == 1.0
    assert simplified["speedup"] == pytest.approx(dense["median_s"] / simplified["median_s"])
    assert any(n.startswith("parse suite: the first 60 training sentences") for n in doc["header"]["notes"])


def test_parse_report_renders_the_tables_and_redraws_the_plot(parse_run):
    path, _ = parse_run
    saved = load(path)
    plots = plot_paths(path, saved)
    assert list(plots) == ["parse"] and plots["parse"].is_file()
    plots["parse"].unlink()
    text = report_file(path)
    assert plots["parse"].stat().st_size > 0
    assert text == render(saved, plot_links(saved, path))
    assert "## Parsing: transition parser on ud-english-ewt" in text and "### Decoding" in text
    assert "| dense parser | 24 |" in text and "| mesimp parser |" in text and "| meprop | 4 |" in text
    assert f"]({plots['parse'].name})" in text
    next(r for r in saved["rows"] if r["label"] == "mesimp parser")["check_passed"] = False
    assert "mesimp parser ✗" in render(saved)


def test_parse_suite_without_a_treebank_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(UD_ENV, raising=False)
    reason = load_treebank(tiny_config(tmp_path, ud_dir=None))
    assert isinstance(reason, str) and reason.startswith("no treebank given") and "--ud-dir" in reason
    half = tmp_path / "half"
    half.mkdir()
    (half / "x-train.conllu").write_text("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n\n")
    monkeypatch.setenv(UD_ENV, str(half))  # the environment variable is read when no --ud-dir is given
    reason = load_treebank(tiny_config(tmp_path, ud_dir=None))
    assert isinstance(reason, str) and str(half) in reason and "*dev.conllu" in reason and UD_ENV in reason

    path, doc = run_bench(tiny_config(tmp_path, suites=(Suite.PARSE,)), log=lambda line: None)
    [row] = doc["rows"]
    assert row["status"] == "skipped" and "no-treebank-here" in row["reason"] and "--ud-dir" in row["reason"]
    assert any(n.startswith("parse suite skipped:") for n in doc["header"]["notes"])
    assert not plot_paths(path, doc)
    assert "## Parsing\n\nSkipped: no usable treebank" in render(doc)


def test_cli_parse_options_reach_the_config(tmp_path):
    gz = tmp_path / "tb"
    gz.mkdir()
    for split in ("train", "dev"):  # no test file: skipped, and fast
        with gzip.open(gz / f"en-{split}.conllu.gz", "wt") as f:
            f.write("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n\n")
    result = CliRunner().invoke(app, ["bench", "--suite", "parse", "--ud-dir", str(gz), "--parse-limit", "7",
                                      "--parse-epochs", "3", "--parse-k", "5", "--parse-hidden", "9",
                                      "--parse-decode-repeats", "4", "--threads", "1", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Skipped: no usable treebank" in result.output and "*test.conllu" in result.output
    [saved] = tmp_path.glob("bench-cpu-*.json")
    config = load(saved)["header"]["config"]
    assert (config["parse_limit"], config["parse_epochs"], config["parse_k"], config["parse_hidden"],
            config["parse_decode_repeats"], config["ud_dir"]) == (7, 3, 5, 9, 4, str(gz))


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown where CUDA is missing")
def test_cli_cuda_without_cuda_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--quick", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--batch", "0"], ["--report", "missing.json"], ["--threads", "-2"],
                                  ["--parse-k", "600"]])
def test_cli_bad_arguments_exit_2(tmp_path, args):
    result = CliRunner().invoke(app, ["bench", "--out-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error:")


def test_cli_report_redraws_saved_file(tmp_path):
    path, _ = run_bench(tiny_config(tmp_path, suites=(Suite.TOPK,)), log=lambda line: None)
    result = CliRunner().invoke(app, ["bench", "--report", str(path)])
    assert result.exit_code == 0, result.output
    assert "Top-k selection" in result.output
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    result = CliRunner().invoke(app, ["bench", "--report", str(bad)])
    assert result.exit_code == 2 and "not a mesimp-gpu bench results file" in result.output


def test_numba_twin_of_the_cpu_kernel_matches_the_reference(seed) -> None:
    """The tool comparison times a Numba version of the cpu backend's algorithm: it must be right too."""
    pytest.importorskip("numba")
    from mesimp_gpu.backends.reference import ReferenceBackend
    from mesimp_gpu.bench.tools import numba_kernels, numba_topk_backward

    g = (torch.randn(9, 70) * 2).round() / 2  # ties in magnitude
    x, w = torch.randn(9, 13), torch.randn(70, 13)
    dx, dw, idx = numba_topk_backward(numba_kernels(), g, x, w, 6)
    ref_dx, ref_dw, ref_idx = ReferenceBackend().topk_backward(g, x, w, 6)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dx, ref_dx.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, ref_dw.float(), atol=1e-5, rtol=1e-5)
