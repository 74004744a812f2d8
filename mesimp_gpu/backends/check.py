"""Every backend that loads on a device, checked against the float64 reference on fresh random inputs:
the one thing to run on a new machine (``mesimp-gpu check``) before trusting its numbers.

Each check draws new inputs (the seed is reported, so a failure can be replayed), runs one operation of
the backend contract on a set of awkward cases (one row, odd widths, k = 1, k = n, ties and zeros, rows
with fewer non-zeros than k) and compares with the reference: selections must be identical, products and
optimizer row updates within :func:`~mesimp_gpu.backends.reference.tolerance` of the float64 result.
The error is reported as a fraction of the tolerance (at most 1 passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mesimp_gpu.backends import REGISTRY, BackendUnavailable, load_backend
from mesimp_gpu.backends.base import Backend
from mesimp_gpu.backends.reference import ReferenceBackend, tolerance

GradientKind = Literal["random", "ties", "sparse", "tiny", "halves"]

#: float32 values of the ``tiny`` kind: subnormals, the smallest subnormal (2e-45 rounds to 1.4e-45),
#: signed zeros, +-x pairs (equal magnitudes) and the smallest normals
_TINY = torch.tensor([1e-40, -1e-40, 2e-45, -0.0, 0.0, 1e-38, -1e-38], dtype=torch.float32)


def gradient(
    rows: int,
    cols: int,
    kind: GradientKind = "random",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """An output gradient ``[rows, cols]`` in ``dtype`` on ``device``, drawn on the CPU from torch's RNG
    (the same values on every device for one seed).

    - ``random``: standard normal.
    - ``ties``: integers in [-3, 3]: ties at every threshold, +x/-x pairs and zeros.
    - ``sparse``: normal entries kept with probability 0.1 (rows with fewer non-zeros than k), row 0 all zero.
    - ``tiny``: float32 subnormals, signed zeros and +-x pairs (the float32 bits a kernel must rank right).
    - ``halves``: normal, every other column rounded to a multiple of 0.5 (exact ties, +x/-x among
      continuous values), 20% zeros, and row 1 all zero when there are more than two rows.
    """
    if kind == "random":
        g = torch.randn(rows, cols, dtype=torch.float64)
    elif kind == "ties":
        g = torch.randint(-3, 4, (rows, cols)).double()
    elif kind == "sparse":
        g = torch.randn(rows, cols, dtype=torch.float64) * (torch.rand(rows, cols) < 0.1)
        g[0] = 0.0
    elif kind == "tiny":
        g = _TINY[torch.randint(0, len(_TINY), (rows, cols))]
    elif kind == "halves":
        g = torch.randn(rows, cols, dtype=torch.float64)
        g[:, ::2] = (g[:, ::2] * 2).round() / 2
        g[torch.rand(rows, cols) < 0.2] = 0.0
        if rows > 2:
            g[1] = 0.0
    else:
        raise ValueError(f"unknown gradient kind {kind!r}")
    return g.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Case:
    """One layer shape: ``batch`` rows of ``g`` (``[batch, out]``), input width ``inp``, ``k`` kept."""

    batch: int
    out: int
    inp: int
    k: int
    kind: GradientKind

    def __str__(self) -> str:
        return f"B={self.batch} out={self.out} in={self.inp} k={self.k} {self.kind}"


#: shapes every backend meets: one row, odd widths, k = 1, k = n, ties, zeros, subnormals
CASES = (
    Case(1, 37, 23, 5, "random"),
    Case(7, 257, 129, 20, "halves"),
    Case(9, 64, 33, 1, "ties"),
    Case(5, 31, 17, 31, "random"),
    Case(12, 100, 40, 30, "sparse"),
    Case(6, 96, 24, 12, "tiny"),
    Case(33, 1001, 70, 64, "ties"),
)
#: on a GPU also the widths its kernels take other paths for (wide rows, unaligned widths)
CUDA_CASES = (Case(64, 4999, 96, 31, "halves"), Case(256, 8192, 128, 128, "random"))


@dataclass
class CheckResult:
    """The outcome of one operation of one backend over all cases."""

    backend: str
    operation: str
    dtype: str
    cases: int
    passed: bool
    worst: float  # largest |error| / (atol + rtol |expected|) over the cases; <= 1 passes (inf: a wrong selection)
    seconds: float
    failure: str = ""  # the first failing case and what differed


def error_ratio(actual: Tensor | None, expected: Tensor | None, dtype: torch.dtype, terms: int) -> float:
    """Largest ``|actual - expected| / (atol + rtol |expected|)`` (``inf`` when shapes or None-ness differ)."""
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if actual.shape != expected.shape:
        return float("inf")
    atol, rtol = tolerance(dtype, terms)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.numel() == 0:
        return 0.0
    return float(((a - e).abs() / (atol + rtol * e.abs())).max())


def same_indices(actual: Tensor, expected: Tensor) -> float:
    """0 when two index tensors are identical, ``inf`` otherwise (a selection is exact or wrong)."""
    same = actual.shape == expected.shape and bool((actual.cpu() == expected.cpu()).all())
    return 0.0 if same else float("inf")


def inputs(case: Case, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``g`` ``[B, out]``, ``x`` ``[B, in]`` and ``weight`` ``[out, in]`` for ``case``."""
    g = gradient(case.batch, case.out, case.kind, dtype, device)
    x = torch.randn(case.batch, case.inp, dtype=torch.float64).to(dtype=dtype, device=device)
    weight = torch.randn(case.out, case.inp, dtype=torch.float64).to(dtype=dtype, device=device)
    return g, x, weight


#: an operation: (backend, reference, case, dtype, device) -> the worst error ratio of its outputs
Operation = Callable[[Backend, Backend, Case, torch.dtype, torch.device], float]


def check_selection(fast: Backend, ref: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> float:
    g, _, _ = inputs(case, dtype, device)
    return same_indices(fast.topk_indices(g, case.k), ref.topk_indices(g, case.k))


def check_topk(fast: Backend, ref: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> float:
    """Per-example products and hit counts, with and without ``dx``."""
    g, x, weight = inputs(case, dtype, device)
    worst = 0.0
    for need_dx in (True, False):
        hits, ref_hits = (torch.zeros(case.out, dtype=torch.int64, device=device) for _ in range(2))
        dx, dw, idx = fast.topk_backward(g, x, weight, case.k, hits, need_dx)
        rdx, rdw, ridx = ref.topk_backward(g, x, weight, case.k, ref_hits, need_dx)
        worst = max(worst, same_indices(idx, ridx), same_indices(hits, ref_hits),
                    error_ratio(dx, rdx, dtype, case.k), error_ratio(dw, rdw, dtype, case.batch))
    return worst


def check_unified(fast: Backend, ref: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> float:
    """Unified products on the backend's column set, and that set checked against float64 column scores:
    identical, or differing only among columns whose scores are within the tolerance of the k-th (sums in
    another order may swap near-equal scores); with integer gradients (exact sums) identical."""
    g, x, weight = inputs(case, dtype, device)
    dx, dw, cols = fast.unified_backward(g, x, weight, case.k)
    g64, x64, w64 = g.double(), x.double(), weight.double()
    scores = g64.abs().sum(dim=0)  # (out,)
    rcols = ref.topk_indices(scores.unsqueeze(0), case.k)[0]
    if cols.shape != rcols.shape:
        return float("inf")
    differing = torch.tensor(sorted(set(cols.tolist()) ^ set(rcols.tolist())), dtype=torch.int64)
    if differing.numel():
        if case.kind == "ties":  # integer sums are exact in every order: the rule (lower index) decides alone
            return float("inf")
        atol, rtol = tolerance(dtype, case.batch)
        kth = scores[rcols].min().cpu()
        if bool(((scores.cpu()[differing] - kth).abs() > atol + rtol * kth).any()):
            return float("inf")
    cols = cols.to(device)
    rdx = g64[:, cols] @ w64[cols]  # (B, k) @ (k, in)
    rdw = torch.zeros_like(w64).index_copy_(0, cols, g64[:, cols].t() @ x64)
    return max(error_ratio(dx, rdx, dtype, case.k), error_ratio(dw, rdw, dtype, case.batch))


def row_update_inputs(ref: Backend, case: Case, dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A parameter ``[out, in]``, its gradient ``[out, in]`` and the touched rows (the columns one example kept)."""
    g, x, weight = inputs(case, dtype, device)
    rows = ref.topk_indices(g[:1], case.k)[0]
    return weight, g.t().mm(x), rows


def check_rows(fast: Backend, ref: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> float:
    """SGD with momentum, Adam and AdaGrad on the touched rows, with clipping, two steps each."""
    p, grad, rows = row_update_inputs(ref, case, dtype, device)
    worst = 0.0
    for rule in ("sgd", "adam", "adagrad"):
        mine = [p.clone(), torch.zeros_like(p), torch.rand_like(p)]  # parameter, state, second state
        theirs = [t.double() for t in mine]
        for step in (1, 2):
            for backend, (q, s1, s2) in ((fast, mine), (ref, theirs)):
                gq = grad.to(q.dtype)
                if rule == "sgd":
                    backend.sgd_rows_(q, gq, rows, lr=0.1, clip=1.0, momentum=0.9, momentum_buffer=s1)
                elif rule == "adam":
                    backend.adam_rows_(q, gq, rows, s1, s2, float(step), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                       clip=1.0)
                else:
                    backend.adagrad_rows_(q, gq, rows, s2, lr=0.1, eps=1e-6, clip=1.0)
        worst = max(worst, *(error_ratio(a, b, dtype, 1) for a, b in zip(mine, theirs)))
    return worst


OPERATIONS: dict[str, Operation] = {
    "selection": check_selection,
    "topk": check_topk,
    "unified": check_unified,
    "rows": check_rows,
}


def backends_on(device: torch.device) -> tuple[list[Backend], dict[str, str]]:
    """The fast backends that load and run on ``device``, and why each other one does not."""
    loaded, skipped = [], {}
    for name in REGISTRY:
        if name == "reference":
            continue
        try:
            backend = load_backend(name)
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
            continue
        if not backend_runs_on(backend, device):
            skipped[name] = f"does not run on {device.type}"
            continue
        loaded.append(backend)
    return loaded, skipped


def backend_runs_on(backend: Backend, device: torch.device) -> bool:
    """Whether ``backend`` takes tensors on ``device`` (tried on one tiny selection)."""
    try:
        backend.topk_indices(torch.ones(1, 2, device=device), 1)
    except (RuntimeError, ValueError, TypeError, BackendUnavailable):
        return False
    return True


#: the dtypes checked per device type: the GPU kernels also take half precision
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def run_checks(device: torch.device, seed: int, backends: list[Backend] | None = None,
               log: Callable[[str], None] = lambda line: None) -> tuple[list[CheckResult], dict[str, str]]:
    """Every operation of every backend on ``device`` (or of ``backends``) over :data:`CASES` (and
    :data:`CUDA_CASES` on a GPU) in :data:`DTYPES`, inputs drawn from ``seed``; returns the results and the
    backends skipped (name -> why)."""
    ref = ReferenceBackend()
    cases = CASES + (CUDA_CASES if device.type == "cuda" else ())
    dtypes = DTYPES[device.type]
    skipped: dict[str, str] = {}
    if backends is None:
        backends, skipped = backends_on(device)
    results = []
    for backend in backends:
        for dtype in dtypes:
            for operation, check in OPERATIONS.items():
                torch.manual_seed(seed)
                worst, failure, start = 0.0, "", time.perf_counter()
                for case in cases:
                    try:
                        ratio = check(backend, ref, case, dtype, device)
                    except Exception as exc:  # noqa: BLE001 - any crash of a fast path is a failed check
                        ratio, failure = float("inf"), failure or f"{case}: {type(exc).__name__}: {exc}"
                    if ratio > 1.0 and not failure:
                        failure = f"{case}: error {ratio:.3g} x the tolerance"
                    worst = max(worst, ratio)
                result = CheckResult(backend.name, operation, str(dtype).removeprefix("torch."), len(cases),
                                     worst <= 1.0, worst, time.perf_counter() - start, failure)
                log(f"{result.backend} {result.operation} {result.dtype}: {'ok' if result.passed else 'FAIL'}")
                results.append(result)
    return results, skipped


def render_table(results: list[CheckResult], skipped: dict[str, str]) -> str:
    """A markdown table of the results, then the skipped backends and the first failure of each failed check."""
    lines = ["| backend | operation | dtype | cases | result | worst error / tolerance | time ms |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in results:
        worst = "wrong" if r.worst == float("inf") else f"{r.worst:.3f}"
        lines.append(f"| {r.backend} | {r.operation} | {r.dtype} | {r.cases} | {'pass' if r.passed else 'FAIL'} | "
                     f"{worst} | {r.seconds * 1e3:.1f} |")
    lines += [f"\nnot checked: {name}: {why}" for name, why in skipped.items()]
    lines += [f"\nFAIL {r.backend} {r.operation} {r.dtype}: {r.failure}" for r in results if not r.passed]
    return "\n".join(lines)
