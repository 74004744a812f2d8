"""Data-parallel training on ``torch.distributed``: processes, shards, consistent meSimp, sparse communication.

A run of ``N`` processes (started by ``torchrun`` or by ``--nproc N``) trains one model. Every process
builds the same seeded model and takes its contiguous share of every global minibatch
(:meth:`Processes.shard`); DistributedDataParallel (DDP) sums the gradients, so that every process
applies the same update and the run depends on ``N`` only through floating-point summation order.
The local loss is weighted so that DDP's average over processes is the gradient of the global
batch's loss (sum or mean, as the trainer defines it).

What meProp and meSimp need beyond plain DDP:

- **meSimp records.** Hit counts and ``refer`` are per process. After every piece of training they
  are summed over the processes (:meth:`DataParallel.sum_records`); a prune step then sees the
  global record everywhere and removes exactly the same neurons on every process. Without a prune
  step the other processes zero their copies again, so that process 0 always holds the run's record
  (its checkpoint is the run's).
- **Shape changes.** DDP's reducer holds the parameters it was built over, so after a prune step the
  model is wrapped anew (:meth:`DataParallel.wrap`; DDP's construction checks that every process
  has the same shapes). The optimizer state is sliced by the same masks on every process.
- **Communication** (``--comm``): ``dense`` is DDP's own all-reduce of every gradient (the
  baseline). ``rows`` registers :func:`row_hook`: for the weights of meProp layers only the rows of
  ``dW`` that some process touched are all-reduced (a row-set exchange of one byte per row first,
  then the union's rows); other gradients go dense. Under ``unified`` every process keeps the same
  column set (:meth:`DataParallel.reduce_column_scores` sums the ``n`` column scores before the
  selection), so ``dW`` has the same ``k`` non-zero rows everywhere and the hook sends just those,
  with no row-set exchange.
- **Checkpoints** are written by process 0 only (atomically, by the trainer); a resumed run reads it
  on process 0 and sends it to the others (no shared file system needed), with each process's own
  random generator states.
- **Failures.** A process that raises makes the launcher stop the others; a collective that finds a
  peer gone or silent for longer than the timeout raises :class:`PeerFailure`, a one-line error.
"""

from __future__ import annotations

import enum
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mesimp_gpu import touched_rows
from mesimp_gpu.backends.base import set_column_score_reducer
from mesimp_gpu.lstm import MePropLSTM
from mesimp_gpu.meprop import MePropLinear, MePropMode
from mesimp_gpu.train.settings import seed_everything

T = TypeVar("T")

#: process ``r`` of a run seeds its generators with ``seed + r * PROCESS_SEED_STRIDE``
PROCESS_SEED_STRIDE = 1_000_003

#: environment variables torchrun (and :func:`launch`) set in every process
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Comm(str, enum.Enum):
    """How gradients travel between the processes."""

    DENSE = "dense"  # DDP's all-reduce of every gradient entry
    ROWS = "rows"  # meProp weights: only the rows some process touched (unified: the shared k rows)


@dataclass(frozen=True)
class DistributedOptions:
    """Settings of a data-parallel run that are not the model's (they never change the result)."""

    comm: Comm = Comm.DENSE  # see Comm
    timeout_s: float = 300.0  # a collective waiting longer than this for a peer fails the run

    def __post_init__(self) -> None:
        object.__setattr__(self, "comm", Comm(self.comm))
        if self.timeout_s <= 0:
            raise ValueError(f"--dist-timeout must be positive, got {self.timeout_s}")


#: the options of this process's run (set by the command line before the trainer starts)
_options = DistributedOptions()


def configure(options: DistributedOptions) -> None:
    """Set the options every :class:`DataParallel` of this process uses from now on."""
    global _options
    _options = options


class PeerFailure(ValueError):
    """Another process of the run stopped, or did not answer within the timeout."""


def started_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` (or another launcher) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Process 0 writes the run's files and prints its lines."""
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """This process's contiguous share ``[start, stop)`` of ``n`` items (shares differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def shard(self, batch: T) -> T:
        """This process's contiguous share of a global minibatch (a tensor of indices or a list)."""
        start, stop = self.bounds(len(batch))  # type: ignore[arg-type]
        return batch[start:stop]  # type: ignore[index]


def join_run(device: torch.device, timeout_s: float) -> Processes:
    """Join the process group the environment describes (gloo on the CPU, NCCL on CUDA), once per process.

    Without ``WORLD_SIZE > 1`` in the environment this is a single-process run and nothing is set up.
    """
    if not started_by_torchrun():
        return Processes()
    missing = [name for name in RANK_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start the run with torchrun "
                         "or --nproc N")
    procs = Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(procs.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=procs.rank,
                                world_size=procs.world, timeout=timedelta(seconds=timeout_s))
    return procs


def process_device(device: torch.device, procs: Processes) -> torch.device:
    """The device of this process: on CUDA each process of a machine takes the GPU of its local rank."""
    if device.type != "cuda" or procs.world == 1:
        return device
    if procs.local_rank >= torch.cuda.device_count():
        raise ValueError(f"process {procs.rank} has local rank {procs.local_rank} but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s); start at most one process per GPU")
    return torch.device("cuda", procs.local_rank)


@contextmanager
def peer_failures(procs: Processes, timeout_s: float) -> Iterator[None]:
    """Turn a collective's failure (a peer gone or silent) into a one-line :class:`PeerFailure`."""
    try:
        yield
    except RuntimeError as exc:
        # gloo reports a peer that went away as a plain RuntimeError naming its source file; NCCL and timeouts
        # raise DistError
        if not isinstance(exc, dist.DistError) and "gloo" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerFailure(f"process {procs.rank} of {procs.world}: another process of the run stopped or did not "
                          f"answer within {timeout_s:g} s ({first[:200]}); this process stops too") from None


def check_lazy(lazy: bool, world: int, comm: Comm) -> None:
    """A lazy optimizer updates the rows it was told of: over several processes only the row hook tells it the
    rows every process touched."""
    if lazy and world > 1 and comm is not Comm.ROWS:
        raise ValueError("--lazy over several processes needs --comm rows (which tells the optimizer the rows "
                         "touched on every process); with --comm dense leave out --lazy")


def record_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with a meSimp record: a ``hits`` tensor ``[out]`` and an integer ``refer``."""
    return [m for m in model.modules() if isinstance(getattr(m, "hits", None), Tensor) and hasattr(m, "refer")]


def row_parameters(model: nn.Module) -> dict[nn.Parameter, bool]:
    """Weights whose gradient meProp makes row-sparse -> whether their rows are the unified column set
    (the same on every process once the column scores are summed)."""
    rows: dict[nn.Parameter, bool] = {}
    for m in model.modules():
        if isinstance(m, MePropLinear) and m.config.mode is not MePropMode.DENSE:
            rows[m.weight] = m.config.mode is MePropMode.UNIFIED
        elif isinstance(m, MePropLSTM) and m.config.mode is not MePropMode.DENSE:
            for direction in m.directions:  # unified selects per time step there: rows differ per process
                rows.update({direction.weight_ih: False, direction.weight_hh: False})
    return rows


def dense_bytes(model: nn.Module) -> int:
    """Bytes DDP's dense all-reduce sends per step and process: every gradient entry once."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@dataclass
class CommStats:
    """What the communication of this process put into collectives (payload bytes, machine-independent)."""

    bytes: int = 0  # tensor bytes handed to all-reduces (each process sends about 2 (N-1)/N of it in a ring)
    collectives: int = 0

    def add(self, tensor: Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.collectives += 1


@dataclass
class RowHookState:
    """What :func:`row_hook` needs: the group, the row-sparse weights and the counters."""

    group: dist.ProcessGroup
    rows: dict[nn.Parameter, bool]  # parameter -> rows shared by every process (unified)
    stats: CommStats = field(default_factory=CommStats)


def row_hook(state: RowHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: all-reduce only the rows of meProp weights that some process touched.

    For each row-sparse weight of the bucket the rows the backward pass marked
    (:mod:`mesimp_gpu.touched_rows`) form a one-byte-per-row mask; one MAX all-reduce of the masks
    gives the union (skipped for unified weights, whose rows are the shared column set). Then one SUM
    all-reduce carries the union's rows and every other gradient of the bucket in full; rows outside
    the union are zero on every process and stay so. The result is divided by the world size, as
    DDP's own all-reduce does, and the union is marked again for a lazy optimizer.
    """
    world = state.group.size()
    grads, params = bucket.gradients(), bucket.parameters()
    rows: list[Tensor | None] = [None] * len(params)  # per parameter: rows to send; None: all of it
    exchanged: list[int] = []  # parameters whose row sets are united over the processes
    masks: list[Tensor] = []
    for i, p in enumerate(params):
        if p not in state.rows:
            continue
        local = touched_rows.take(p)  # None: every row may be non-zero here
        if state.rows[p]:
            rows[i] = local
            continue
        mask = torch.ones(p.shape[0], dtype=torch.uint8, device=p.device)
        if local is not None:
            mask.zero_().index_fill_(0, local, 1)
        exchanged.append(i)
        masks.append(mask)
    if masks:
        flat = torch.cat(masks)
        state.stats.add(flat)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=state.group)  # small: n bytes per weight
        for i, mask in zip(exchanged, flat.split([m.numel() for m in masks])):
            union = mask.nonzero().squeeze(1)
            rows[i] = None if union.numel() == params[i].shape[0] else union
    parts = [g.reshape(-1) if r is None else g.view(g.shape[0], -1).index_select(0, r).reshape(-1)
             for g, r in zip(grads, rows)]
    payload = torch.cat(parts).div_(world)
    state.stats.add(payload)

    def unpack(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        reduced = fut.value()[0]
        for g, r, part, p in zip(grads, rows, reduced.split([t.numel() for t in parts]), params):
            if r is None:
                g.copy_(part.view_as(g))
            else:
                g.view(g.shape[0], -1).index_copy_(0, r, part.view(r.numel(), -1))
            if p in state.rows:
                touched_rows.mark(p, r)  # the rows of the reduced gradient, for a lazy optimizer
        return bucket.buffer()

    return dist.all_reduce(payload, group=state.group, async_op=True).get_future().then(unpack)


# DDP checks a hook's annotations as objects; this module's are strings (postponed evaluation)
row_hook.__annotations__.update(bucket=dist.GradBucket, state=RowHookState, **{"return": torch.futures.Future[Tensor]})


class DataParallel:
    """One trainer's view of the run: its processes, the DDP wrapper and the collectives the trainer needs.

    With one process every method is the identity (no group, no wrapper, nothing sent), so a
    single-process run is exactly what it was without this class.
    """

    def __init__(self, procs: Processes, options: DistributedOptions, device: torch.device) -> None:
        self.procs, self.options, self.device = procs, options, device
        self.row_params: dict[nn.Parameter, bool] = {}  # the row hook's weights (Comm.ROWS)
        self.stats = CommStats()  # column scores and the row hook's collectives
        self.loss_weight = 1.0  # the local loss's factor that makes DDP's average the global gradient
        self._scores_group: dist.ProcessGroup | None = None
        if procs.world > 1:
            # the column-score all-reduces run inside the backward pass, beside DDP's bucket all-reduces:
            # a group of their own keeps the two streams of collectives apart
            self._scores_group = dist.new_group()
            set_column_score_reducer(self.reduce_column_scores)

    @classmethod
    def from_environment(cls, device: torch.device) -> tuple[DataParallel, torch.device]:
        """The run this process belongs to (a single process unless torchrun or ``--nproc`` started it),
        and this process's device."""
        options = _options
        procs = join_run(device, options.timeout_s)
        device = process_device(device, procs)
        return cls(procs, options, device), device

    @property
    def world(self) -> int:
        return self.procs.world

    @property
    def main(self) -> bool:
        return self.procs.main

    def failures(self) -> Any:
        """Context in which a collective's failure becomes a one-line :class:`PeerFailure`."""
        return peer_failures(self.procs, self.options.timeout_s)

    def check_lazy(self, lazy: bool) -> None:
        """Refuse a lazy optimizer the row hook does not serve (see :func:`check_lazy`)."""
        check_lazy(lazy, self.world, self.options.comm)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, with the local loss weighted for DDP's average (see :meth:`shard`)."""
        if self.world == 1:
            loss.backward()
            return
        for p in self.row_params:
            touched_rows.arm(p)  # drop the rows the hook marked last step for an optimizer that did not take them
        (loss * self.loss_weight).backward()

    def shard(self, batch: T, mean_loss: bool) -> T:
        """This process's share of a global minibatch; sets :attr:`loss_weight` for it.

        DDP averages the processes' gradients, so the local loss is weighted by ``N`` for a summed
        loss and by ``N * local / global`` for a mean one.
        """
        if self.world == 1:
            return batch
        local = self.procs.shard(batch)
        if len(local) == 0:  # type: ignore[arg-type]
            raise ValueError(f"a minibatch of {len(batch)} leaves process {self.procs.rank} of {self.world} "  # type: ignore[arg-type]
                             f"nothing to train on; use a --batch-size of at least {self.world} (and a --limit "
                             "whose last minibatch has that many)")
        self.loss_weight = float(self.world) * (len(local) / max(len(batch), 1) if mean_loss else 1.0)  # type: ignore[arg-type]
        return local

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward passes through: ``model`` itself, or a DDP wrapper built over its
        current parameters (call again after every shape change)."""
        if self.world == 1:
            return model
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        # meSimp records are per process: they must not be broadcast at each forward pass
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        # construction copied process 0's buffers (its record) everywhere: only process 0 keeps the record
        self.keep_records_on_main(model)
        if self.options.comm is Comm.ROWS:
            self.row_params = row_parameters(model)
            ddp.register_comm_hook(RowHookState(dist.group.WORLD, self.row_params, self.stats), row_hook)
        return ddp

    def seed_process(self, seed: int) -> None:
        """Give every process but 0 random generators of its own, once the model is built (DDP makes the
        parameters process 0's): dropout, word dropout and random columns then draw independently for each
        process's examples instead of repeating process 0's draws. Shuffling has generators of its own."""
        if self.procs.rank > 0:
            seed_everything(seed + PROCESS_SEED_STRIDE * self.procs.rank)

    def reduce_column_scores(self, scores: Tensor) -> Tensor:
        """Unified meProp's column scores ``[out]`` summed over the processes (every one then keeps the same columns)."""
        self.stats.add(scores)
        dist.all_reduce(scores, group=self._scores_group)
        return scores

    def sum_records(self, model: nn.Module) -> None:
        """Sum every meSimp record (``hits`` and ``refer``) over the processes, onto all of them."""
        modules = record_modules(model)
        if self.world == 1 or not modules:
            return
        device = modules[0].hits.device
        refer = torch.tensor([m.refer for m in modules], dtype=torch.long, device=device)
        flat = torch.cat([m.hits for m in modules] + [refer])
        dist.all_reduce(flat)
        hits, refer = flat[: -len(modules)], flat[-len(modules):]
        for m, h, r in zip(modules, hits.split([m.hits.numel() for m in modules]), refer.tolist()):
            m.hits.copy_(h)
            m.refer = int(r)

    def keep_records_on_main(self, model: nn.Module) -> None:
        """Zero the meSimp records of every process but 0, which then alone holds the run's record."""
        if self.main:
            return
        for m in record_modules(model):
            m.hits.zero_()
            m.refer = 0

    def sum_float(self, value: float) -> float:
        """``value`` summed over the processes (a piece's training loss: each process's share of the mean)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0])

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (e.g. its random generator states), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, load: Callable[[], T]) -> T:
        """``load()`` run on process 0 and its result sent to every process; an error there is raised everywhere."""
        if self.world == 1:
            return load()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = load()
            except Exception as exc:  # noqa: BLE001 - sent on, then raised on every process
                box[0] = exc
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def check_world(self, saved: int) -> None:
        """Refuse to resume a checkpoint that ``saved`` processes wrote with another number of processes."""
        if saved != self.world:
            raise ValueError(f"the checkpoint was written by a run of {saved} process(es), this run has "
                             f"{self.world}; resume with --nproc {saved} (or torchrun --nproc-per-node, "
                             f"--nnodes giving {saved} in all)")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


def free_port() -> int:
    """A TCP port that is free on this machine now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, errors: str, threads: int | None,
            fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Entry of a process :func:`launch` started: the torchrun environment, then ``fn(*args)``."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        fn(*args)
    except BaseException as exc:
        # one line for the launcher's message; the full traceback goes to this process's stderr
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        Path(errors, f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {line}" if line else type(exc).__name__)
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, fn: Callable[..., None], *args: Any, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes on this machine, as ``torchrun --nproc-per-node`` would.

    ``fn`` must be importable (a module-level function). ``threads``: torch threads per process
    (default: the cores of this process divided among the processes). When one process fails the
    others are stopped and a ValueError names the failed process and its error.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if started_by_torchrun():
        raise ValueError("this process was started by torchrun already; leave out --nproc (torchrun's "
                         "--nproc-per-node sets the number of processes)")
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    import torch.multiprocessing as mp  # only a launching process needs it

    with tempfile.TemporaryDirectory(prefix="mesimp-ranks-") as errors:
        try:
            mp.start_processes(_worker, args=(nproc, free_port(), errors, threads, fn, args), nprocs=nproc,
                               join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            # name the process that failed first: the others' errors only say that a peer went away
            notes = {int(p.stem[4:]): p.read_text() for p in Path(errors).glob("rank*.txt")}
            causes = [r for r, text in sorted(notes.items()) if not text.startswith(PeerFailure.__name__)]
            rank = causes[0] if causes else exc.error_index
            reason = notes.get(rank, f"exit code {getattr(exc, 'exit_code', '?')}")
            raise ValueError(f"process {rank} of {nproc} failed: {reason}; the other processes were stopped") from None


def _keep_result(options: DistributedOptions, folder: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """One process of :func:`in_processes`: the run's options, ``fn(*args)``, and process 0's result kept."""
    configure(options)
    result = fn(*args)
    if os.environ["RANK"] == "0":
        torch.save(result, Path(folder, "result.pt"))


def in_processes(nproc: int, options: DistributedOptions, fn: Callable[..., T], *args: Any,
                 threads: int | None = None) -> T | None:
    """``fn(*args)`` as one process of a run: this one (``nproc`` 1, or one process of those torchrun started)
    or ``nproc`` new ones on this machine (:func:`launch`). Returns process 0's result, None on the others."""
    if nproc == 1:
        configure(options)
        result = fn(*args)
        return result if int(os.environ.get("RANK", "0")) == 0 else None
    with tempfile.TemporaryDirectory(prefix="mesimp-result-") as folder:
        launch(nproc, _keep_result, options, folder, fn, args, threads=threads)
        return torch.load(Path(folder, "result.pt"), weights_only=False)
