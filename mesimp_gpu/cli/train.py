"""``mesimp-gpu train mnist|pos|parse``: each command's options mirror its config dataclass
(:class:`~mesimp_gpu.train.mnist.MnistConfig`, :class:`~mesimp_gpu.train.pos.PosConfig`,
:class:`~mesimp_gpu.train.parse.ParseConfig`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mesimp_gpu.cli.errors import given_options, resumable, user_errors
from mesimp_gpu.cli.options import (
    comm_option,
    dist_timeout_option,
    nproc_option,
    backend_option,
    clip_option,
    cycle_option,
    device_option,
    field_default,
    limit_note,
    limit_option,
    lr_option,
    nonzero_hits_option,
    optimizer_option,
    out_option,
    overwrite_option,
    progress_option,
    prune_option,
    reset_moments_option,
    resume_option,
    seed_option,
    threads_option,
)
from mesimp_gpu.data.conllu import TagSet
from mesimp_gpu.lstm import GateSelection, HitCounting
from mesimp_gpu.mesimp import HitRule, MomentReset, PruneOrder
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.models.mlp import BiasGrad, Init
from mesimp_gpu.models.parser import Activation
from mesimp_gpu.train.mnist import MnistConfig, Preset, mnist_config
from mesimp_gpu.train.parse import ParseConfig
from mesimp_gpu.train.parse import Preset as ParsePreset
from mesimp_gpu.train.pos import PosConfig
from mesimp_gpu.train.pos import Preset as PosPreset
from mesimp_gpu.train.records import network_line
from mesimp_gpu.train.run_folder import prepare_run_folder
from mesimp_gpu.train.distributed import Comm, DistributedOptions, in_processes
from mesimp_gpu.train.settings import Method

train_app = typer.Typer(help="Train a model.", no_args_is_help=True)

_DEFAULT = MnistConfig()


def parse_widths(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"300,200"`` -> ``(300, 200)``; None stays None. ValueError with the offending text otherwise."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden-sizes must be comma-separated integers like 300,200; got {text!r}") from None


@train_app.command("mnist")
def train_mnist_command(
    ctx: typer.Context,
    preset: Optional[Preset] = typer.Option(None, help="paper: the meSimp paper's settings (k 160, prune 0.1, batch "
                                            "100, 20 epochs, 8 chunks, cycles of 5 epochs) with the C#'s hit rule "
                                            "and moment resets up to the last prune step, and a tenth of the "
                                            "learning rate in the last cycle, so the network at the end is small "
                                            "and accurate; "
                                            "reference: exactly what the authors' C# program does (its hit rule, "
                                            "moment resets and order of evaluation and pruning); meprop-pytorch: "
                                            "the authors' PyTorch meProp script (k 30, batch 32, mean loss, no "
                                            "clipping, hidden 512, dropout 0.1, uniform init, frozen biases); options given "
                                            "explicitly override it."),
    method: Method = typer.Option(_DEFAULT.method, help="mesimp: top-k back propagation plus prune steps that shrink "
                                  "the network; dense: full back propagation; meprop: per-example top-k (the paper); "
                                  "unified: one top-k set per minibatch; random: k random columns."),
    k: int = typer.Option(_DEFAULT.k, help="Gradient entries kept per example in every hidden layer (meSimp "
                          "reference 160; the meProp paper's MNIST runs use 20)."),
    hidden: int = typer.Option(_DEFAULT.hidden, help="Width of each hidden layer."),
    layers: int = typer.Option(_DEFAULT.layers, help="Number of hidden layers."),
    hidden_sizes: Optional[str] = typer.Option(None, help="Per-layer widths, e.g. 154,160; overrides --hidden and "
                                               "--layers."),
    epochs: int = typer.Option(_DEFAULT.epochs, help="Passes over the 55,000 training images (the reference: 20)."),
    batch_size: int = typer.Option(_DEFAULT.batch_size, help="Examples per update step."),
    optimizer: OptimizerName = optimizer_option(_DEFAULT.optimizer),
    lr: float = lr_option(_DEFAULT.lr),
    final_lr: Optional[float] = typer.Option(None, help="Learning rate of the run's last cycle (its last --cycle "
                                             "epochs, which meSimp does not prune with an even number of cycles); "
                                             "default: --lr throughout."),
    clip: float = clip_option(_DEFAULT.clip),
    lazy: bool = typer.Option(_DEFAULT.lazy, help="Update only the weight rows that per-example meProp touched in "
                              "the step (exact for SGD and AdaGrad; Adam's moments then decay only on those rows, "
                              "slightly different from Adam); other parameters get the full update."),
    grad_sum: bool = typer.Option(_DEFAULT.grad_sum, "--grad-sum/--grad-mean",
                                  help="Sum the loss over the minibatch (the reference) or average it."),
    dropout: float = typer.Option(_DEFAULT.dropout, help="Dropout probability after every hidden ReLU (the "
                                  "authors' PyTorch script: 0.1)."),
    init: Init = typer.Option(_DEFAULT.init, help="normal: W ~ N(0, sqrt(6/(fan_in+fan_out))), b = 0 (the C# "
                              "program); uniform: W and b ~ U(-1/sqrt(fan_out), 1/sqrt(fan_out)) (the authors' "
                              "PyTorch script)."),
    bias: BiasGrad = typer.Option(_DEFAULT.bias, help="What the hidden biases learn from under meProp: dense: "
                                  "every gradient entry (the C# program); kept: the kept top-k entries only; frozen: "
                                  "nothing, every bias keeps its initial value (the authors' PyTorch script)."),
    chunks: int = typer.Option(_DEFAULT.chunks, help="Dev evaluations (and meSimp prune steps) per epoch; test is "
                               "scored when dev improves."),
    prune: float = prune_option(_DEFAULT.prune),
    cycle: int = cycle_option(_DEFAULT.cycle),
    reset_moments: MomentReset = reset_moments_option(_DEFAULT.reset_moments),
    hits: HitRule = typer.Option(_DEFAULT.hits, help="meSimp: which kept entries count as hits: kept: every index "
                                 "of the top-k over the live neurons; nonzero: only non-zero gradients; reference: "
                                 "the C#'s heap over the original width, pruned neurons as zeros (it can prune below "
                                 "k)."),
    order: PruneOrder = typer.Option(_DEFAULT.order, help="meSimp: prune before each piece's evaluation "
                                     "(prune-first: every score belongs to a network that exists) or after it "
                                     "(evaluate-first: the C#)."),
    compare_same_size: bool = typer.Option(_DEFAULT.compare_same_size, help="meSimp: afterwards train a dense MLP "
                                           "of the final sizes from scratch with the same budget and report both."),
    seed: int = seed_option(_DEFAULT.seed),
    device: str = device_option(_DEFAULT.device),
    threads: Optional[int] = threads_option(_DEFAULT.threads),
    backend: str = backend_option(_DEFAULT.backend),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files (raw or .gz). Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    out: Optional[Path] = out_option("mnist", "results.json, checkpoint.pt, model.json/model.pt (the model at the best dev score; final/ holds the one at the end) and the plots"),
    limit: Optional[int] = limit_option("images"),
    resume: bool = resume_option(),
    nproc: int = nproc_option(),
    comm: Comm = comm_option(),
    dist_timeout: float = dist_timeout_option(),
    overwrite: bool = overwrite_option(),
    progress: bool = progress_option(_DEFAULT.progress),
) -> None:
    """Train the 784-H-...-H-10 MNIST MLP; prints a summary table (accuracy, kept neurons, parameters, time).

    Default: meSimp (k 160, prune 0.1, two hidden layers of 500), 2 epochs in 1-epoch cycles; minutes on 2 CPU cores.
    Epoch 1 prunes after each of its 8 chunks, epoch 2 trains the fixed sizes.
    --preset paper and --preset reference run 20 epochs in cycles of 5.
    """
    from mesimp_gpu.train.mnist import summary_table, train_mnist

    with user_errors():
        out = prepare_run_folder(out, "mnist", resume, overwrite)
        settings = dict(
            method=method, k=k, hidden=hidden, layers=layers, hidden_sizes=parse_widths(hidden_sizes), epochs=epochs,
            batch_size=batch_size, optimizer=optimizer, lr=lr, final_lr=final_lr, clip=clip or None, lazy=lazy,
            grad_sum=grad_sum, dropout=dropout, init=init, bias=bias, chunks=chunks, prune=prune, cycle=cycle,
            reset_moments=reset_moments, hits=hits, order=order,
            compare_same_size=compare_same_size, seed=seed, device=device, threads=threads, backend=backend,
            data_dir=str(data_dir) if data_dir else None, out=str(out), limit=limit, progress=progress,
        )
        if preset is not None:  # the preset fills every option the user did not give (the folder is chosen here)
            settings = {name: value for name, value in settings.items() if name in given_options(ctx) | {"out"}}
        config = mnist_config(preset, **settings)
        with resumable(ctx, out):
            results = in_processes(nproc, DistributedOptions(comm, dist_timeout), train_mnist, config, resume)
        if results is None:  # one of several processes torchrun started: process 0 reports
            return
    typer.echo(summary_table(results))
    typer.echo(f"{network_line(results['final'])}{limit_note(limit, 'images')} | "
               f"results in {out / 'results.json'}, model (at the best dev score) in {out / 'model.json'}, final network "
               f"in {out / 'final'}")




def _pos_default(name: str) -> Any:
    return field_default(PosConfig, name)


@train_app.command("pos")
def train_pos_command(
    ctx: typer.Context,
    preset: Optional[PosPreset] = typer.Option(None, help="paper: the meProp paper's tagger (one left-to-right LSTM "
                                               "of 500, k 5 per gate, word embedding 50 and 7 shape features of 20, "
                                               "no character model, no dropout, Adam 0.001; batches of 16). "
                                               "competitive: a bidirectional LSTM of 200 per direction over words "
                                               "(100), shape features and a character CNN (64 filters), dropout "
                                               "0.33, batches of 32, Adam 0.002 decayed by 0.9 per epoch, 8 epochs, "
                                               "2 dev evaluations per epoch. --method and --k stay yours; options given "
                                               "explicitly override the preset."),
    method: Method = typer.Option(_pos_default("method"), help="dense: full back propagation; meprop: per-example "
                                  "top-k of the LSTM gate gradient (the paper); unified: one top-k set per step and "
                                  "minibatch; random: k random entries; mesimp: meprop plus pruning of rarely "
                                  "selected units."),
    k: int = typer.Option(_pos_default("k"), help="Gate-gradient entries kept per example and step "
                          "(per gate with --selection per-gate)."),
    selection: GateSelection = typer.Option(_pos_default("selection"), help="Top-k over all 4H gate entries, or k "
                                            "in each gate."),
    counting: HitCounting = typer.Option(_pos_default("counting"), help="meSimp hits: once per token when any gate "
                                         "is kept, or per kept gate."),
    hidden: int = typer.Option(_pos_default("hidden"), help="LSTM hidden size (per direction)."),
    hidden_sizes: Optional[str] = typer.Option(None, help="Per-direction LSTM sizes, e.g. 38,35 with "
                                               "--bidirectional; overrides --hidden."),
    bidirectional: bool = typer.Option(_pos_default("bidirectional"), help="Add a right-to-left LSTM (meProp and "
                                       "meSimp act on both directions)."),
    epochs: int = typer.Option(_pos_default("epochs"), help="Passes over the training sentences."),
    batch_size: int = typer.Option(_pos_default("batch_size"), help="Sentences per update step (the paper: 1)."),
    optimizer: OptimizerName = optimizer_option(_pos_default("optimizer")),
    lr: float = lr_option(_pos_default("lr")),
    lr_decay: float = typer.Option(_pos_default("lr_decay"), help="The learning rate of epoch e is lr * lr_decay^e; "
                                   "1 keeps it constant."),
    clip: float = clip_option(_pos_default("clip")),
    lazy: bool = typer.Option(_pos_default("lazy"), help="Update only the LSTM weight rows that per-example meProp "
                              "touched in the step (exact for SGD and AdaGrad); other parameters get the full update."),
    word_dim: int = typer.Option(_pos_default("word_dim"), help="Word embedding size."),
    feature_dim: int = typer.Option(_pos_default("feature_dim"), help="Embedding size of each of the 7 shape "
                                    "features."),
    char_filters: int = typer.Option(_pos_default("char_filters"), help="Character CNN: size of the character-level "
                                     "word vector (filters of width 3, max-pooled over the word); 0: no character "
                                     "model (the paper). Characters seen fewer than twice in train share one UNK."),
    char_dim: int = typer.Option(_pos_default("char_dim"), help="Character CNN: character embedding size."),
    dropout: float = typer.Option(_pos_default("dropout"), help="Dropout on the LSTM's input and output."),
    word_dropout: float = typer.Option(_pos_default("word_dropout"), help="alpha: a word seen c times becomes UNK "
                                       "with probability alpha / (alpha + c)."),
    tagset: TagSet = typer.Option(_pos_default("tagset"), help="xpos (Penn Treebank tags in EWT) or upos."),
    chunks: int = typer.Option(_pos_default("chunks"), help="Dev evaluations (and meSimp prune steps) per epoch."),
    prune: float = prune_option(_pos_default("prune")),
    cycle: int = cycle_option(_pos_default("cycle")),
    reset_moments: MomentReset = reset_moments_option(_pos_default("reset_moments")),
    nonzero_hits: bool = nonzero_hits_option(_pos_default("nonzero_hits")),
    compare_same_size: bool = typer.Option(_pos_default("compare_same_size"), help="meSimp: afterwards train a "
                                           "dense tagger of the final per-direction sizes from scratch with the same "
                                           "settings (in OUT/same-size) and report both."),
    seed: int = seed_option(_pos_default("seed")),
    device: str = device_option(_pos_default("device")),
    backend: str = backend_option(_pos_default("backend")),
    threads: Optional[int] = threads_option(_pos_default("threads")),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with one *train, *dev and *test .conllu[.gz] file."),
    train_file: Optional[Path] = typer.Option(None, help="Training CoNLL-U file (instead of --data-dir)."),
    dev_file: Optional[Path] = typer.Option(None, help="Dev CoNLL-U file (instead of --data-dir)."),
    test_file: Optional[Path] = typer.Option(None, help="Test CoNLL-U file (instead of --data-dir)."),
    out: Optional[Path] = out_option("pos", "results.json, checkpoint.pt, model.json/model.pt (the model at the best dev score; final/ holds the one at the end) and the plots"),
    limit: Optional[int] = limit_option("sentences"),
    resume: bool = resume_option(),
    nproc: int = nproc_option(),
    comm: Comm = comm_option(),
    dist_timeout: float = dist_timeout_option(),
    overwrite: bool = overwrite_option(),
    progress: bool = progress_option(_pos_default("progress")),
) -> None:
    """Train the POS tagger (meProp LSTM) on a CoNLL-U treebank; prints the test accuracy at the best dev score.

    Default: the paper's left-to-right LSTM of 500 with meProp k 5 per gate, 2 epochs. --preset competitive: a
    bidirectional tagger with a character CNN and dropout, 8 epochs (about 1-2 minutes per epoch on one CPU thread
    on UD English EWT). The best model (at the best dev score) is saved as model.json/model.pt for `mesimp-gpu tag`
    and `mesimp-gpu evaluate`.
    """
    from mesimp_gpu.train.pos import pos_config, train_pos

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    with user_errors():
        out = prepare_run_folder(out, "pos", resume, overwrite)
        settings = dict(
            method=method, k=k, selection=selection, counting=counting, hidden=hidden,
            hidden_sizes=parse_widths(hidden_sizes), bidirectional=bidirectional,
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, lr_decay=lr_decay, clip=clip or None,
            lazy=lazy, word_dim=word_dim, feature_dim=feature_dim, char_filters=char_filters, char_dim=char_dim,
            dropout=dropout, word_dropout=word_dropout, tagset=tagset, chunks=chunks, prune=prune,
            cycle=cycle, reset_moments=reset_moments, nonzero_hits=nonzero_hits, compare_same_size=compare_same_size,
            seed=seed, device=device, backend=backend, threads=threads, data_dir=text(data_dir),
            train_file=text(train_file), dev_file=text(dev_file), test_file=text(test_file), out=str(out),
            limit=limit, progress=progress,
        )
        if preset is not None:  # the preset fills every option the user did not give (the folder is chosen here)
            settings = {name: value for name, value in settings.items() if name in given_options(ctx) | {"out"}}
        config = pos_config(preset, **settings)
        with resumable(ctx, out):
            results = in_processes(nproc, DistributedOptions(comm, dist_timeout), train_pos, config, resume)
        if results is None:  # one of several processes torchrun started: process 0 reports
            return
    final = results["final"]
    times = final["mean_epoch_seconds"]
    typer.echo(
        f"{network_line(final)}{limit_note(limit, 'sentences')} | per epoch: forward {times['forward']:.1f}s, "
        f"backward {times['backward']:.1f}s, update {times['update']:.1f}s | results in {out / 'results.json'}, "
        f"model (at the best dev score) in {out / 'model.json'}"
    )
    if "same_size" in results:
        same = results["same_size"]
        typer.echo(f"dense of the same size from scratch: test accuracy {same['test_acc_at_best_dev']:.2f}% at best "
                   f"dev {same['best_dev_acc']:.2f}% | results in {same['out']}")


def _parse_default(name: str) -> Any:
    return field_default(ParseConfig, name)


@train_app.command("parse")
def train_parse_command(
    ctx: typer.Context,
    preset: Optional[ParsePreset] = typer.Option(None, help="paper: Chen & Manning's training with the papers' "
                                                 "network (500 cube units, k 20, AdaGrad 0.01, batches of 10,000 "
                                                 "transitions, dropout 0.5, L2 1e-8); options given explicitly "
                                                 "override it."),
    method: Method = typer.Option(_parse_default("method"), help="mesimp: meProp top-k on the hidden layer plus prune "
                                  "steps that shrink it; dense: full back propagation; meprop: per-transition top-k "
                                  "(the paper); unified: one top-k set per minibatch; random: k random units."),
    k: int = typer.Option(_parse_default("k"), help="Hidden-layer gradient entries kept per transition (papers: 20)."),
    hidden: int = typer.Option(_parse_default("hidden"), help="Hidden units (the papers: 500)."),
    dim: int = typer.Option(_parse_default("dim"), help="Embedding size of words, tags and labels."),
    activation: Activation = typer.Option(_parse_default("activation"), help="Hidden activation: cube (Chen & "
                                          "Manning) or relu."),
    dropout: float = typer.Option(_parse_default("dropout"), help="Dropout on the hidden layer's output."),
    input_dropout: float = typer.Option(_parse_default("input_dropout"), help="Dropout on the concatenated "
                                        "embeddings."),
    l2: float = typer.Option(_parse_default("l2"), help="L2 weight on the embeddings and the output layer."),
    word_dropout: float = typer.Option(_parse_default("word_dropout"), help="alpha: a word feature seen c times in "
                                       "train becomes UNK with probability alpha / (alpha + c); 0 disables."),
    epochs: int = typer.Option(_parse_default("epochs"), help="Passes over the training transitions."),
    batch_size: int = typer.Option(_parse_default("batch_size"), help="Transitions per update step (the meProp "
                                   "paper: 10,000)."),
    optimizer: OptimizerName = optimizer_option(_parse_default("optimizer")),
    lr: float = lr_option(_parse_default("lr")),
    clip: float = clip_option(0.0),
    lazy: bool = typer.Option(_parse_default("lazy"), help="Update only the hidden weight rows that meProp touched "
                              "in the step; other parameters get the full update."),
    tagset: TagSet = typer.Option(_parse_default("tagset"), help="Input tags: xpos (Penn Treebank in EWT) or upos."),
    tagger: Optional[Path] = typer.Option(None, help="A `train pos` run folder: dev and test are parsed on the tags it "
                                          "predicts (train keeps gold tags); default: gold tags everywhere."),
    chunks: int = typer.Option(_parse_default("chunks"), help="Dev evaluations (and meSimp prune steps) per epoch."),
    prune: float = prune_option(_parse_default("prune")),
    cycle: int = cycle_option(_parse_default("cycle")),
    reset_moments: MomentReset = reset_moments_option(_parse_default("reset_moments")),
    nonzero_hits: bool = nonzero_hits_option(_parse_default("nonzero_hits")),
    compare_same_size: bool = typer.Option(_parse_default("compare_same_size"), help="meSimp: afterwards train a "
                                           "dense parser of the final size from scratch and report both."),
    seed: int = seed_option(_parse_default("seed")),
    device: str = device_option(_parse_default("device")),
    backend: str = backend_option(_parse_default("backend")),
    threads: Optional[int] = threads_option(_parse_default("threads")),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with one *train, *dev and *test .conllu[.gz] file "
                                            "(a UD treebank)."),
    train_file: Optional[Path] = typer.Option(None, help="Training CoNLL-U file (instead of --data-dir)."),
    dev_file: Optional[Path] = typer.Option(None, help="Dev CoNLL-U file (instead of --data-dir)."),
    test_file: Optional[Path] = typer.Option(None, help="Test CoNLL-U file (instead of --data-dir)."),
    out: Optional[Path] = out_option("parse", "results.json, checkpoint.pt, model.json/model.pt (the model at the best dev score; final/ holds the one at the end) and the plots"),
    limit: Optional[int] = limit_option("sentences"),
    resume: bool = resume_option(),
    nproc: int = nproc_option(),
    comm: Comm = comm_option(),
    dist_timeout: float = dist_timeout_option(),
    overwrite: bool = overwrite_option(),
    progress: bool = progress_option(_parse_default("progress")),
) -> None:
    """Train the transition parser (an MLP over 48 features, meProp/meSimp on its hidden layer) on a CoNLL-U
    treebank; prints test UAS/LAS at the best dev score.

    Default: meSimp with 500 cube units, k 20, Adam, 2 epochs (minutes on 2 CPU cores on UD English EWT).
    """
    from mesimp_gpu.train.parse import parse_config, summary_line, train_parse

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    with user_errors():
        out = prepare_run_folder(out, "parse", resume, overwrite)
        settings = dict(
            method=method, k=k, hidden=hidden, dim=dim, activation=activation, dropout=dropout, l2=l2,
            input_dropout=input_dropout, word_dropout=word_dropout,
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, clip=clip or None, lazy=lazy,
            tagset=tagset, tagger=text(tagger), chunks=chunks, prune=prune, cycle=cycle, reset_moments=reset_moments,
            nonzero_hits=nonzero_hits, compare_same_size=compare_same_size, seed=seed, device=device,
            backend=backend, threads=threads, data_dir=text(data_dir), train_file=text(train_file),
            dev_file=text(dev_file), test_file=text(test_file), out=str(out), limit=limit, progress=progress,
        )
        if preset is not None:  # the preset fills every option the user did not give (the folder is chosen here)
            settings = {name: value for name, value in settings.items() if name in given_options(ctx) | {"out"}}
        config = parse_config(preset, **settings)
        with resumable(ctx, out):
            results = in_processes(nproc, DistributedOptions(comm, dist_timeout), train_parse, config, resume)
        if results is None:  # one of several processes torchrun started: process 0 reports
            return
    typer.echo(f"{summary_line(results)} | final network: test UAS {results['final']['test_acc_final_network']:.2f}"
               f"{limit_note(limit, 'sentences')} | results in {out / 'results.json'}, model "
               f"(at the best dev score) in {out / 'model.json'}")
