"""Every Triton kernel compiles ahead of time for real GPUs (sm_80 and sm_90), no GPU needed, and fits.

Each case compiles one kernel specialisation with ``triton.compile`` as a launch would: with the
16-byte divisibility Triton assumes at run time for pointers (torch allocations are 256-byte aligned)
and for integer arguments that are multiples of 16 (every size of the bench's shapes), unless the
case is one of the unaligned ones (odd widths). Triton's own ``ptxas`` is re-run in verbose mode on
the PTX for registers and spill bytes; shared memory and warps come from the compiled metadata. From
those, :func:`resident_blocks` computes how many blocks of the kernel fit on one SM, as the CUDA
occupancy calculator does. The tests assert, for the specialisations the launchers pick at the
bench's shapes (and the top-k variants at n = 4096 and 8192): no spills, and at least
:data:`MIN_BLOCKS` resident blocks per SM. The figures are printed (``pytest -s`` or ``-rA``).

On CPU machines the test session runs with ``TRITON_INTERPRET=1``, which turns every ``@triton.jit``
function (Triton's own ``tl.sum``/``tl.cumsum`` included) into an interpreter object when Triton is
imported, so the compilation runs in a child process started without that variable: this file run
as a script compiles every case and prints one JSON line (``--out PATH`` also writes a results file
with the cases and the commit).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)
#: resident blocks per SM every case must reach: one block waiting on a barrier or on memory leaves
#: the SM another to run
MIN_BLOCKS = 2


class SmLimits(NamedTuple):
    """Per-SM resources of one architecture (CUDA C Programming Guide, compute capabilities table)."""

    registers: int  # 32-bit registers per SM
    register_unit: int  # registers are allocated per warp in units of this many
    max_warps: int
    max_blocks: int
    shared: int  # bytes of shared memory per SM
    shared_reserved: int  # bytes the runtime reserves per block
    shared_unit: int  # shared memory allocation granularity


LIMITS = {
    80: SmLimits(65536, 256, 64, 32, 167936, 1024, 128),  # A100
    90: SmLimits(65536, 256, 64, 32, 233472, 1024, 128),  # H100 / H200
}


def resident_blocks(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Blocks of a kernel (``registers`` per thread, ``shared`` bytes per block, ``num_warps``) resident on one SM."""
    lim = LIMITS[arch]
    per_warp = math.ceil(registers * 32 / lim.register_unit) * lim.register_unit
    by_registers = (lim.registers // per_warp) // num_warps
    block_shared = math.ceil((shared + lim.shared_reserved) / lim.shared_unit) * lim.shared_unit
    by_shared = lim.shared // block_shared
    return min(lim.max_blocks, lim.max_warps // num_warps, by_registers, by_shared)


_TOPK_SIG = {
    "src_ptr": "*fp32",
    "src_idx_ptr": "*i64",
    "vals_ptr": "*fp32",
    "idx_ptr": "*i64",
    "hits_ptr": "*i64",
    "flag_ptr": "*i32",
    "w_ptr": "*fp32",
    "dx_ptr": "*fp32",
    "n_src": "i32",
    "seg": "i32",
    "k": "i32",
    "out_stride": "i32",
    "n_in": "i32",
}
_DW_SIG = {
    "vals_ptr": "*fp32",
    "src_ptr": "*i64",
    "ptr_ptr": "*i64",
    "x_ptr": "*fp32",
    "dw_ptr": "*fp32",
    "n_in": "i32",
}
_ROW_UPDATE_SIGS = {
    "_sgd_rows_kernel": {
        "p_ptr": "*fp32", "grad_ptr": "*fp32", "buf_ptr": "*fp32", "rows_ptr": "*i64", "width": "i32",
        "n_blocks": "i32", "lr": "fp32", "momentum": "fp32", "clip": "fp32",
    },
    "_adam_rows_kernel": {
        "p_ptr": "*fp32", "grad_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "rows_ptr": "*i64", "width": "i32",
        "n_blocks": "i32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32", "step_size": "fp32", "sqrt_c2": "fp32",
        "clip": "fp32",
    },
    "_adagrad_rows_kernel": {
        "p_ptr": "*fp32", "grad_ptr": "*fp32", "sum_ptr": "*fp32", "rows_ptr": "*i64", "width": "i32",
        "n_blocks": "i32", "lr": "fp32", "eps": "fp32", "clip": "fp32",
    },
}


def _floats(signature: dict[str, str], kind: str) -> dict[str, str]:
    """``signature`` with every float32 pointer a ``kind`` one (``*bf16``, ``*fp16``; scalars stay float32)."""
    return {name: kind if t == "*fp32" else t for name, t in signature.items()}


def _topk(block: int, *, hits: bool = True, check: bool = True, fuse: bool = False, resident: bool = True,
          src_idx: bool = False) -> dict[str, Any]:
    """The constexprs :func:`mesimp_gpu.kernels.topk._select` passes for a selection over ``block`` lanes."""
    from mesimp_gpu.kernels import topk

    return {"HAS_SRC_IDX": src_idx, "HAS_HITS": hits, "CHECK": check, "FUSE_DX": fuse, "RESIDENT": resident,
            "BLOCK_N": block, "SCAN_BLOCK": min(block, topk.SCAN_BLOCK), "BLOCK_K": topk.FUSE_BLOCK_K,
            "BLOCK_IN": topk.FUSE_MAX_IN}


def _topk_warps(block: int) -> int:
    from mesimp_gpu.kernels import topk

    return topk.num_warps(block)


class Case(NamedTuple):
    """One specialisation: ``name``, kernel ``module.kernel``, run-time ``signature``, ``constexprs``, ``num_warps``."""

    name: str
    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    aligned: bool = True  # run-time divisibility by 16 of pointers and integer arguments
    maxnreg: int | None = None  # the register cap the launcher passes, if any


def _cases() -> list[Case]:
    """The specialisations the launchers pick at the bench's shapes (n = in = 500, 2048, 4096, 8192;
    k = 5 .. 512; B = 10 .. 1024), the top-k variants at n = 4096 and 8192, and odd-width ones."""
    from mesimp_gpu.kernels import row_updates, rows, topk

    res = topk.MAX_RESIDENT
    cases = [
        Case("meprop_dx", "gather", "_meprop_dx_kernel",
             {"vals_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "dx_ptr": "*fp32", "k": "i32", "n_in": "i32"},
             {"BLOCK_K": 32, "BLOCK_IN": 128}, 4),
        Case("meprop_dx_k8_unaligned", "gather", "_meprop_dx_kernel",
             {"vals_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "dx_ptr": "*fp32", "k": "i32", "n_in": "i32"},
             {"BLOCK_K": 8, "BLOCK_IN": 128}, 4, aligned=False),
        # one-stage selections at the bench's widths; n = 4096 is the widest resident row
        Case("topk_512", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(512), _topk_warps(512)),
        Case("topk_2048", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(2048), _topk_warps(2048)),
        Case("topk_4096", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res), _topk_warps(res)),
        Case("topk_4096_no_hits", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res, hits=False), _topk_warps(res)),
        Case("topk_4096_fused_dx", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res, fuse=True), _topk_warps(res),
             maxnreg=topk.FUSE_MAX_REGISTERS),
        Case("topk_4096_bf16", "topk", "_topk_rows_kernel", _floats(_TOPK_SIG, "*bf16"), _topk(res),
             _topk_warps(res)),
        Case("topk_4096_fp16_fused_dx", "topk", "_topk_rows_kernel", _floats(_TOPK_SIG, "*fp16"),
             _topk(res, fuse=True), _topk_warps(res), maxnreg=topk.FUSE_MAX_REGISTERS),
        Case("topk_512_fused_dx", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(512, fuse=True), _topk_warps(512),
             maxnreg=topk.FUSE_MAX_REGISTERS),
        Case("topk_4096_unaligned", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res), _topk_warps(res),
             aligned=False),
        # n = 8192: stage 1 over chunks of MAX_RESIDENT (no hits), stage 2 over 2k candidates
        Case("topk_8192_stage1", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res, hits=False), _topk_warps(res)),
        *(
            Case(f"topk_8192_stage2_k{k}", "topk", "_topk_rows_kernel", _TOPK_SIG,
                 _topk(triton.next_power_of_2(2 * k), check=False, src_idx=True),
                 _topk_warps(triton.next_power_of_2(2 * k)))
            for k in (5, 128, 512)
        ),
        Case("topk_stage2_widest", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(res, check=False, src_idx=True),
             _topk_warps(res)),
        # rows too wide for two stages to pay: streamed, re-read in STREAM_BLOCK chunks
        Case("topk_streamed", "topk", "_topk_rows_kernel", _TOPK_SIG, _topk(topk.STREAM_BLOCK, resident=False),
             _topk_warps(topk.STREAM_BLOCK)),
        Case("topk_streamed_stage2", "topk", "_topk_rows_kernel", _TOPK_SIG,
             _topk(topk.STREAM_BLOCK, resident=False, check=False, src_idx=True), _topk_warps(topk.STREAM_BLOCK)),
        Case("meprop_dw", "rows", "_meprop_dw_kernel", _DW_SIG,
             {"ACCUMULATE": False, "TILES": rows.TILES, "BLOCK_E": 16, "BLOCK_IN": 128}, 4),
        Case("meprop_dw_accumulate", "rows", "_meprop_dw_kernel", _DW_SIG,
             {"ACCUMULATE": True, "TILES": rows.TILES, "BLOCK_E": 16, "BLOCK_IN": 128}, 4),
        Case("meprop_dw_bf16", "rows", "_meprop_dw_kernel", _floats(_DW_SIG, "*bf16"),
             {"ACCUMULATE": False, "TILES": rows.TILES, "BLOCK_E": 16, "BLOCK_IN": 128}, 4),
        Case("meprop_dw_unaligned", "rows", "_meprop_dw_kernel", _DW_SIG,
             {"ACCUMULATE": False, "TILES": rows.TILES, "BLOCK_E": 16, "BLOCK_IN": 128}, 4, aligned=False),
        Case("column_abs_sum", "unified", "_column_abs_sum_kernel",
             {"g_ptr": "*fp32", "partial_ptr": "*fp32", "batch": "i32", "n": "i32"}, {"BLOCK_B": 32, "BLOCK_N": 64}, 4),
        Case("column_abs_sum_b16", "unified", "_column_abs_sum_kernel",
             {"g_ptr": "*fp32", "partial_ptr": "*fp32", "batch": "i32", "n": "i32"}, {"BLOCK_B": 16, "BLOCK_N": 64}, 4,
             aligned=False),
    ]
    block = row_updates.MAX_BLOCK
    cases += [
        Case("sgd_rows_momentum_clip", "row_updates", "_sgd_rows_kernel", _ROW_UPDATE_SIGS["_sgd_rows_kernel"],
             {"HAS_ROWS": True, "MOMENTUM": True, "CLIP": True, "BLOCK": block}, 4),
        Case("sgd_rows_dense", "row_updates", "_sgd_rows_kernel", _ROW_UPDATE_SIGS["_sgd_rows_kernel"],
             {"HAS_ROWS": False, "MOMENTUM": False, "CLIP": False, "BLOCK": block}, 4),
        Case("adam_rows_clip", "row_updates", "_adam_rows_kernel", _ROW_UPDATE_SIGS["_adam_rows_kernel"],
             {"HAS_ROWS": True, "CLIP": True, "BLOCK": block}, 4),
        Case("adam_rows_bf16", "row_updates", "_adam_rows_kernel",
             _floats(_ROW_UPDATE_SIGS["_adam_rows_kernel"], "*bf16"), {"HAS_ROWS": True, "CLIP": False, "BLOCK": block}, 4),
        Case("adagrad_rows_clip", "row_updates", "_adagrad_rows_kernel", _ROW_UPDATE_SIGS["_adagrad_rows_kernel"],
             {"HAS_ROWS": True, "CLIP": True, "BLOCK": block}, 4),
    ]
    return cases


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v`` on ``ptx``."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    assert target is not None, "PTX without a .target line"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={target.group(1)}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs is not None and spills is not None, f"unexpected ptxas output:\n{log}"
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_case(case: Case, arch: int) -> dict[str, int]:
    """Compile one case for ``sm_{arch}`` -> registers, spills, shared bytes, warps and resident blocks."""
    fn = getattr(importlib.import_module(f"mesimp_gpu.kernels.{case.module}"), case.kernel)
    full_signature = {**case.signature, **{name: "constexpr" for name in case.constexprs}}
    if list(full_signature) != fn.arg_names:
        raise TypeError(f"signature of {case.kernel} is out of date: {fn.arg_names}")
    # what the launcher's specialisation gives aligned tensors and sizes that are multiples of 16
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, kind in enumerate(case.signature.values())
        if case.aligned and (kind.startswith("*") or kind == "i32")
    }
    compiled = triton.compile(
        ASTSource(fn=fn, signature=full_signature, constexprs=case.constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, **({"maxnreg": case.maxnreg} if case.maxnreg else {})},
    )
    if not compiled.asm["cubin"]:
        raise RuntimeError("no cubin produced")
    regs, spill_stores, spill_loads = ptxas_usage(compiled.asm["ptx"], arch)
    shared, warps = int(compiled.metadata.shared), int(compiled.metadata.num_warps)
    return {"regs": regs, "spill_stores": spill_stores, "spill_loads": spill_loads, "shared": shared,
            "num_warps": warps, "blocks": resident_blocks(arch, regs, shared, warps)}


def compile_all() -> dict[str, dict[str, Any]]:
    """Every case for both targets; a failure is recorded as ``{"error": ...}`` instead of raised."""
    results: dict[str, dict[str, Any]] = {}
    for case in _cases():
        for arch in ARCHS:
            try:
                results[f"{case.name}@{arch}"] = compile_case(case, arch)
            except Exception as exc:  # reported by the test of that case
                results[f"{case.name}@{arch}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    """Run :func:`compile_all` in a child process without the interpreter (see the module docstring)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, f"AOT compile process failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_resident_blocks_follows_the_occupancy_rules() -> None:
    """Hand-checked against the CUDA occupancy calculator's rules."""
    assert resident_blocks(90, 32, 0, 4) == 16  # 64 warps per SM / 4
    assert resident_blocks(90, 64, 0, 8) == 4  # 2048 registers per warp: 32 warps
    assert resident_blocks(90, 65, 0, 8) == 3  # 72 per thread after rounding to the 256-register unit
    assert resident_blocks(80, 128, 0, 16) == 1
    assert resident_blocks(80, 32, 80 * 1024, 4) == 2  # 164 KB of shared memory: two 81 KB blocks
    assert resident_blocks(90, 16, 0, 1) == 32  # the block limit


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", [c.name for c in _cases()])
def test_kernel_compiles_without_spills_at_two_blocks_per_sm(
    compiled: dict[str, dict[str, Any]], case: str, arch: int
) -> None:
    usage = compiled[f"{case}@{arch}"]
    assert "error" not in usage, usage.get("error")
    print(
        f"\n[aot] sm_{arch} {case}: {usage['regs']} registers, {usage['shared']} B shared, {usage['num_warps']} warps, "
        f"{usage['blocks']} blocks/SM, {usage['spill_stores']} B spill stores, {usage['spill_loads']} B spill loads"
    )
    assert 0 < usage["regs"] <= 255
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{case} spills on sm_{arch}"
    assert usage["blocks"] >= MIN_BLOCKS, f"{case}: {usage['blocks']} resident block(s) per SM on sm_{arch}"


if __name__ == "__main__":
    results = compile_all()
    if len(sys.argv) == 3 and sys.argv[1] == "--out":  # a results file for bench/results/
        from mesimp_gpu.io import write_json

        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        write_json(sys.argv[2], {"command": f"python tests/test_kernels_compile.py --out {sys.argv[2]}",
                                 "triton": triton.__version__, "git_commit": sha, "min_blocks": MIN_BLOCKS,
                                 "cases": {c.name: c._asdict() for c in _cases()}, "results": results})
    print(json.dumps(results))
