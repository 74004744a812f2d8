"""Tables (markdown) and plots (PNG) drawn from a saved results file, so any run can be redrawn.

``render(doc)`` gives the markdown; ``draw_plots(doc, json_path)`` writes the PNGs beside the
JSON file: the layer speedup against k/n per width (one figure per timed pass), the time
split of MNIST training, and the parser's training time split with its decoding speed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import offset_copy

from mesimp_gpu.bench.config import Pass, Provider, Suite
from mesimp_gpu.bench.tagger import tagger_section
from mesimp_gpu.bench.traffic import traffic_section
from mesimp_gpu.plots import new_figure, save_figure
from mesimp_gpu.train.records import PHASES

Row = dict[str, Any]


def load(path: str | Path) -> dict[str, Any]:
    """Read a results file written by ``mesimp-gpu bench``; ValueError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or "rows" not in doc or "header" not in doc:
        raise ValueError(f"{path} is not a mesimp-gpu bench results file (no header and rows)")
    return doc


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers must already be formatted."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def suite_rows(doc: dict[str, Any], suite: Suite) -> list[Row]:
    return [r for r in doc["rows"] if r["suite"] == suite.value]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def duration(seconds: float) -> str:
    """``seconds`` in the unit that keeps 1 to 3 digits before the point: µs, ms or s."""
    for unit, scale in (("µs", 1e6), ("ms", 1e3)):
        if seconds * scale < 1000:
            return f"{seconds * scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def marked(r: Row, text: str) -> str:
    """``text`` with a warning mark when the row failed its correctness check."""
    return text if r.get("check_passed", True) else f"{text} ✗"


def labels_in_order(rows: Sequence[Row]) -> list[str]:
    """Provider labels as they first appear (the order the suite ran them)."""
    return list(dict.fromkeys(r["label"] for r in rows))


def layer_table(rows: Sequence[Row], mode: Pass, cell: Callable[[Row], str]) -> str:
    """One line per (batch, width, k); a column per provider holding ``cell(row)``; dense time first."""
    timed = [r for r in rows if r.get("pass") == mode.value]
    providers = [p for p in labels_in_order(timed) if p != Provider.DENSE.value]
    dense = {(r["batch"], r["width"]): r for r in timed if r["provider"] == Provider.DENSE.value}
    cells: dict[tuple[int, int, int], dict[str, str]] = {}
    for r in timed:
        if r["provider"] != Provider.DENSE.value:
            cells.setdefault((r["batch"], r["width"], r["k"]), {})[r["label"]] = (
                marked(r, cell(r)) if r["status"] == "ok" else "skipped")
    for r in rows:  # providers skipped for memory at some k
        if r["status"] == "skipped" and r.get("k") is not None:
            cells.setdefault((r["batch"], r["width"], r["k"]), {})[r["label"]] = "skipped"
    body = []
    for (batch, width, k), by_label in sorted(cells.items()):
        d = dense.get((batch, width))
        body.append([batch, width, k, f"{k / width:.3g}", marked(d, ms(d["median_s"])) if d else "",
                     *[by_label.get(p, "") for p in providers]])
    return markdown_table(["B", "n", "k", "k/n", "dense ms", *providers], body)


def layer_section(doc: dict[str, Any]) -> str:
    rows = suite_rows(doc, Suite.LAYER)
    if not rows:
        return ""
    parts = ["## Layer: speedup over dense autograd (n -> n linear layer, float32)", "",
             "Cells are dense median / provider median on the same tensors, timed side by side; "
             "✗ marks a failed correctness check."]
    for mode in Pass:
        parts += ["", f"### {mode.value}", "", layer_table(rows, mode, lambda r: f"{r['speedup']:.2f}x")]
    if any("hw_fraction" in r for r in rows):
        parts += ["", "### Fraction of the hardware roofline (backward)", "",
                  layer_table(rows, Pass.BACKWARD, lambda r: f"{r['hw_fraction']:.2f}")]
    skipped = [r for r in rows if r["status"] == "skipped" and r.get("k") is None]
    if skipped:
        parts += ["", "Skipped shapes: " + "; ".join(f"B={r['batch']} n={r['width']} ({r['reason']})" for r in skipped)]
    return "\n".join(parts)


def topk_section(doc: dict[str, Any]) -> str:
    rows = suite_rows(doc, Suite.TOPK)
    if not rows:
        return ""
    providers = labels_in_order(rows)
    by_shape: dict[tuple[int, int, int], dict[str, str]] = {}
    for r in rows:
        by_shape.setdefault((r["batch"], r["width"], r["k"]), {})[r["label"]] = marked(
            r, f"{duration(r['median_s'])}, {r['speedup']:.2f}x, {r['bandwidth_gbs']:.3g} GB/s")
    body = [[b, n, k, *[cells.get(p, "") for p in providers]] for (b, n, k), cells in sorted(by_shape.items())]
    return "\n".join(["## Top-k selection: time, speedup over torch.topk, bytes of G read per second", "",
                      markdown_table(["B", "n", "k", *providers], body)])


def train_section(doc: dict[str, Any]) -> str:
    rows = suite_rows(doc, Suite.TRAIN)
    if not rows:
        return ""
    first = rows[0]
    body = [[r["label"], r["k"] if r["k"] is not None else "-", *[f"{r['phases_s'][p]:.2f}" for p in PHASES],
             f"{r['median_s']:.2f}", f"{r['full_epoch_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['run_s']:.1f}",
             f"{r['run_speedup']:.2f}x", f"{r['backward_speedup']:.2f}x", f"{r['test_acc']:.2f}",
             "-".join(map(str, r["sizes"]))] for r in rows]
    return "\n".join([
        "## Training: MNIST MLP, seconds per epoch by phase", "",
        f"{first['images']} training images, {first['epochs']} epoch(s), batch {first['batch']}, "
        f"{first.get('optimizer', 'adam')} at lr {first.get('lr', 1e-3):g}, backend "
        f"{first['backend']}; the median epoch is shown (a full 55,000-image epoch extrapolated linearly when fewer "
        "images were used), then the whole run; speedups are over plain dense. The accuracy is that of this short "
        "run (not the papers' 20 epochs).", "",
        markdown_table(["method", "k", *[f"{p} s" for p in PHASES], "epoch s", "full epoch s (est.)",
                        "epoch speedup", "run s", "run speedup", "backward speedup", "test acc %", "final sizes"],
                       body)])


def distributed_section(doc: dict[str, Any]) -> str:
    """The distributed suite's table: payload per step against the dense all-reduce's, and time per step."""
    rows = suite_rows(doc, Suite.DISTRIBUTED)
    if not rows:
        return ""
    body = []
    for r in rows:
        share = f"{r['bytes_per_step'] / r['dense_bytes_per_step']:.3f}" if r["dense_bytes_per_step"] else "-"
        step = f"{r['median_s'] * 1e3:.1f}" if r["median_s"] is not None else "(volume only)"
        body.append([r["model"], r["method"], r["comm"], r["processes"], f"{r['bytes_per_step'] / 1e3:,.1f}",
                     share, f"{r['wire_bytes_per_step'] / 1e3:,.1f}", step])
    first = rows[0]
    return "\n".join([
        "## Data-parallel training: bytes sent and time per step", "",
        f"Global batch {first['batch']}, k = {first['k']}, {first['steps']} timed steps; payload: bytes each process "
        "hands to all-reduces per step (gradients, row masks, unified column scores); wire: a ring all-reduce's "
        "2 (N-1)/N of it; share: payload over the dense all-reduce's. Step time: process 0's median, only where "
        "every process has a core (or GPU) of its own.", "",
        markdown_table(["model", "method", "comm", "N", "payload kB/step", "share of dense", "wire kB/step",
                        "step ms"], body)])


def score(value: float | None) -> str:
    """A UAS/LAS percentage, or a dash when the run never scored test."""
    return "-" if value is None else f"{value:.2f}"


def parse_section(doc: dict[str, Any]) -> str:
    rows = suite_rows(doc, Suite.PARSE)
    if not rows:
        return ""
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        return "\n".join(["## Parsing", "", *[f"Skipped: {r['reason']}" for r in skipped]])
    train = [r for r in rows if r.get("kind") == "train"]
    decode = [r for r in rows if r.get("kind") == "decode"]
    parts = []
    if train:
        first = train[0]
        body = [[r["label"], r["k"] if r["k"] is not None else "-", *[f"{r['phases_s'][p]:.2f}" for p in PHASES],
                 f"{r['median_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['run_s']:.1f}", f"{r['run_speedup']:.2f}x",
                 f"{r['backward_speedup']:.2f}x", score(r["test_uas"]), score(r["test_las"]),
                 f"{r['kept_at_best_dev']} ({r['kept']})"] for r in train]
        parts += [
            f"## Parsing: transition parser on {first['treebank']}, seconds per epoch by phase", "",
            f"{first['sentences']} training sentences ({first['transitions']} oracle transitions), {first['epochs']} "
            f"epoch(s), {first['hidden']} hidden units ({first['activation']}), batch {first['batch']} transitions, "
            f"{first['optimizer']} at lr {first['lr']:g}, backend {first['backend']}; the median epoch is shown, then "
            "the whole run (meSimp's pruning counts in full there); speedups are over dense. Test UAS/LAS over all "
            f"words at the best dev UAS ({first['test_sentences']} test sentences), of this short run; hidden units: "
            "at the best dev (at the end).", "",
            markdown_table(["method", "k", *[f"{p} s" for p in PHASES], "epoch s", "epoch speedup", "run s",
                            "run speedup", "backward speedup", "test UAS", "test LAS", "hidden units"], body)]
    if decode:
        first = decode[0]
        body = [[marked(r, r["label"]), r["hidden"], f"{r['parameters']:,}",
                 f"{r['sentences_per_s']:.0f} ({r['sentences_per_s_p20']:.0f}-{r['sentences_per_s_p80']:.0f})",
                 f"{r['words_per_s']:.0f}", f"{r['speedup']:.2f}x", score(r["dev_uas"])] for r in decode]
        if parts:
            parts.append("")
        parts += [
            f"### Decoding: sentences per second on {first['split']}", "",
            f"{first['sentences']} {first['split']} sentences ({first['words']} words), greedy, batches of "
            f"{first['batch']} sentences; the parsers take turns, one untimed pass each, then {first['repeats']} "
            "timed full passes each: median (p20-p80). The simplified parser is the meSimp run's model at its best "
            "dev; only its hidden layer is smaller. ✗ marks a timed pass whose dev UAS differs from the trainer's "
            "record of that model.", "",
            markdown_table(["parser", "hidden units", "parameters", "sentences/s", "words/s", "speedup over dense",
                            "dev UAS"], body)]
    return "\n".join(parts)


def calibration_section(doc: dict[str, Any]) -> str:
    cal = doc["header"].get("calibration")
    if not cal:
        return ""
    body = [["device-to-device copy", f"{cal['copy_gbs']:.0f} GB/s"],
            *[[f"matmul {p}", f"{cal[f'matmul_{p}_tflops']:.1f} TFLOP/s"] for p in ("fp32", "tf32", "bf16")],
            ["empty kernel launch", f"{cal['launch_us']:.2f} µs"]]
    return "\n".join(["## Calibration", "", markdown_table(["quantity", "measured"], body)])


def header_section(doc: dict[str, Any]) -> str:
    h = doc["header"]
    m = h["machine"]
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else ""
    lines = [f"# mesimp-gpu benchmark: {h['device']} ({h['created']})", "",
             f"- command: `{h['command']}`",
             f"- machine: {m['cpu']}, {m['cpu_count']} cores, {h['threads']} torch threads{gpu}; "
             f"load average {h['load_average_start']} at start",
             f"- software: torch {m['torch']}, triton {m['triton']}, cupy {m['cupy']}, mesimp-gpu {m['mesimp_gpu']} "
             f"(commit {m['git_commit']}"
             + (f", plus uncommitted changes to {', '.join(h['modified_files'])})" if h.get("modified_files") else ")"),
             f"- backends: {', '.join(h['backends'])}; skipped: "
             + ("; ".join(f"{k} ({v})" for k, v in h["skipped_backends"].items()) or "none")]
    lines += [f"- note: {n}" for n in h.get("notes", [])]
    return "\n".join(lines)


def plots_section(links: dict[str, str]) -> str:
    """Image links, one per plot (title -> link)."""
    if not links:
        return ""
    return "\n\n".join(["## Plots", *[f"![{title}]({link})" for title, link in links.items()]])


def render(doc: dict[str, Any], plot_links: dict[str, str] | None = None) -> str:
    """The whole report as markdown; ``plot_links`` (title -> link) adds the plots at the end."""
    sections = [header_section(doc), calibration_section(doc), layer_section(doc), topk_section(doc),
                traffic_section(doc, markdown_table),
                train_section(doc), parse_section(doc), tagger_section(suite_rows(doc, Suite.TAGGER), markdown_table),
                distributed_section(doc),
                plots_section(plot_links or {})]
    return "\n\n".join(s for s in sections if s) + "\n"


def plot_links(doc: dict[str, Any], json_path: str | Path) -> dict[str, str]:
    """Links to the plots of a results file, relative to the folder that holds it."""
    return {title: path.name for title, path in plot_paths(json_path, doc).items()}


def plot_paths(json_path: str | Path, doc: dict[str, Any]) -> dict[str, Path]:
    """Where the plots of a results file go: beside it, named after it."""
    path = Path(json_path)
    out = {}
    if suite_rows(doc, Suite.LAYER):
        for mode in Pass:
            out[f"layer {mode.value}"] = path.with_name(f"{path.stem}-layer-{mode.value.replace('+', '-')}.png")
    if suite_rows(doc, Suite.TRAIN):
        out["train"] = path.with_name(f"{path.stem}-train.png")
    if any(r["status"] == "ok" for r in suite_rows(doc, Suite.PARSE)):
        out["parse"] = path.with_name(f"{path.stem}-parse.png")
    return out


#: line colour per provider and line style per backend (in order of appearance), so that the
#: selection rule and the implementation can be told apart
PROVIDER_COLOURS = {Provider.TOPK.value: "tab:red", Provider.UNIFIED.value: "tab:blue",
                    Provider.RANDOM.value: "tab:green", Provider.PRIOR_SCATTER.value: "tab:gray",
                    Provider.PRIOR_SPARSE.value: "black"}
BACKEND_STYLES = ("-", "--", ":", "-.")


def plot_layer(rows: Sequence[Row], mode: Pass, path: Path, title: str) -> None:
    """Speedup over dense against k/n: one panel per (batch, width), one line per provider."""
    timed = [r for r in rows if r.get("pass") == mode.value and r["status"] == "ok"
             and r["provider"] != Provider.DENSE.value]
    if not timed:
        return
    skipped = {(r["batch"], r["width"]): r["reason"] for r in rows if r["status"] == "skipped" and r.get("k") is None}
    batches = sorted({r["batch"] for r in rows})
    widths = sorted({r["width"] for r in rows})
    backends = list(dict.fromkeys(r["backend"] for r in timed if r["backend"]))
    fig, axes = new_figure(len(batches), len(widths), figsize=(4.2 * len(widths), 3.4 * len(batches)), sharey=True)
    for i, batch in enumerate(batches):
        for j, width in enumerate(widths):
            ax = axes[i][j]
            for name in labels_in_order(timed):
                mine = [r for r in timed if r["label"] == name and r["batch"] == batch and r["width"] == width]
                if mine:
                    style = BACKEND_STYLES[backends.index(mine[0]["backend"]) % 4] if mine[0]["backend"] else ":"
                    ax.plot(*zip(*sorted((r["k_fraction"], r["speedup"]) for r in mine)), marker="o", label=name,
                            color=PROVIDER_COLOURS.get(mine[0]["provider"]), linestyle=style)
            ax.set_title(f"B={batch}, n={width}")
            if (batch, width) in skipped:
                ax.text(0.5, 0.5, "skipped\n(see the results file)", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set(xscale="log", yscale="log", xlabel="k / n")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
            fractions = [r["k_fraction"] for r in timed if r["batch"] == batch and r["width"] == width]
            if fractions and max(fractions) < 10 * min(fractions):  # no power of ten inside: label 1, 2, 5 x 10^i
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            if j == 0:
                ax.set_ylabel("speedup over dense")
            ax.grid(alpha=0.3, which="both")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        more = ax.get_legend_handles_labels()
        if len(more[1]) > len(names):
            handles, names = more
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, path)


def draw_phase_bars(ax: Any, rows: Sequence[Row], title: str) -> None:
    """Stacked horizontal bars on ``ax``: seconds per epoch in forward, backward and update, per row."""
    names = [r["label"] for r in rows]
    left = [0.0] * len(rows)
    for phase in PHASES:
        values = [r["phases_s"][phase] for r in rows]
        ax.barh(names, values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set(xlabel="seconds per epoch (median)", title=title)
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-36, units="points")  # under the x label, whatever the height
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=len(PHASES), frameon=False)
    ax.grid(alpha=0.3, axis="x")


def plot_train(rows: Sequence[Row], path: Path, title: str) -> None:
    """Stacked bars: seconds per epoch in forward, backward and update, per method."""
    fig, axes = new_figure(figsize=(6, 0.8 + 0.6 * len(rows)))
    draw_phase_bars(axes[0][0], rows, title)
    save_figure(fig, path)


def plot_parse(rows: Sequence[Row], path: Path, title: str) -> None:
    """Left: the parser's seconds per training epoch by phase, per method. Right: decoding speed on dev
    (sentences per second, median with p20-p80 whiskers) of the dense and the simplified parser."""
    train = [r for r in rows if r.get("kind") == "train"]
    decode = [r for r in rows if r.get("kind") == "decode"]
    panels = [p for p in (train, decode) if p]
    fig, axes = new_figure(1, len(panels), figsize=(5.5 * len(panels), 1.2 + 0.6 * max(map(len, panels))))
    column = 0
    if train:
        draw_phase_bars(axes[0][column], train, "training")
        column += 1
    if decode:
        ax = axes[0][column]
        names = [f"{r['label']} ({r['hidden']} hidden)" for r in decode]
        speeds = [r["sentences_per_s"] for r in decode]
        whiskers = [[s - r["sentences_per_s_p20"] for s, r in zip(speeds, decode)],
                    [r["sentences_per_s_p80"] - s for s, r in zip(speeds, decode)]]
        bars = ax.barh(names, speeds, xerr=whiskers, color="tab:purple", capsize=4)
        ax.bar_label(bars, labels=[f"{r['speedup']:.2f}x over dense" for r in decode], label_type="center",
                     color="white")
        ax.invert_yaxis()
        ax.set(xlabel="dev sentences per second (median, p20-p80)",
               title=f"decoding {decode[0]['sentences']} {decode[0]['split']} sentences")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def draw_plots(doc: dict[str, Any], json_path: str | Path) -> list[Path]:
    """Write every plot of ``doc`` beside ``json_path``; returns the paths written."""
    paths = plot_paths(json_path, doc)
    device = doc["header"]["device"]
    for mode in Pass:
        key = f"layer {mode.value}"
        if key in paths:
            plot_layer(suite_rows(doc, Suite.LAYER), mode, paths[key], f"meProp layer {mode.value} on {device}")
    if "train" in paths:
        rows = suite_rows(doc, Suite.TRAIN)
        plot_train(rows, paths["train"], f"MNIST MLP on {device}, {rows[0]['images']} images per epoch")
    if "parse" in paths:
        rows = [r for r in suite_rows(doc, Suite.PARSE) if r["status"] == "ok"]
        trained = next((r for r in rows if r.get("kind") == "train"), rows[0])
        plot_parse(rows, paths["parse"], f"Parser on {device}: {trained['treebank']}, "
                   f"{trained['sentences']} training sentences")
    return [p for p in paths.values() if p.exists()]


def report_file(path: str | Path) -> str:
    """Redraw the plots of a saved results file and return its markdown report."""
    doc = load(path)
    draw_plots(doc, path)
    return render(doc, plot_links(doc, path))
