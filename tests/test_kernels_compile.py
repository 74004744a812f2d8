"""Every Triton kernel compiles ahead of time for real GPUs (sm_80 and sm_90), no GPU needed.

Each case compiles one kernel specialisation with ``triton.compile`` and re-runs Triton's own
``ptxas`` in verbose mode on the PTX to read registers and spill bytes, which are printed (see them
with ``pytest -s`` or ``-rA``). On CPU machines the test session runs with ``TRITON_INTERPRET=1``, which
turns every ``@triton.jit`` function (Triton's own ``tl.sum``/``tl.cumsum`` included) into an
interpreter object when Triton is imported, so the compilation runs in a child process started
without that variable: this file run as a script compiles every case and prints one JSON line.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)

_TOPK_SIG = {
    "g_ptr": "*fp32",
    "vals_ptr": "*fp32",
    "idx_ptr": "*i64",
    "hits_ptr": "*i64",
    "w_ptr": "*fp32",
    "dx_ptr": "*fp32",
    "n": "i32",
    "k": "i32",
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


def _bf16(signature: dict[str, str]) -> dict[str, str]:
    """``signature`` with every float32 pointer a bfloat16 one (scalars stay float32)."""
    return {name: "*bf16" if kind == "*fp32" else kind for name, kind in signature.items()}


#: (case id, module, kernel, runtime signature, constexprs, num_warps): the specialisations launchers use
CASES: list[tuple[str, str, str, dict[str, str], dict[str, Any], int]] = [
    (
        "meprop_dx",
        "gather",
        "_meprop_dx_kernel",
        {"vals_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "dx_ptr": "*fp32", "k": "i32", "n_in": "i32"},
        {"BLOCK_K": 32, "BLOCK_IN": 128},
        4,
    ),
    (
        "topk_resident_512",
        "topk",
        "_topk_rows_kernel",
        _TOPK_SIG,
        {"HAS_HITS": True, "FUSE_DX": False, "RESIDENT": True, "BLOCK_N": 512, "BLOCK_K": 32, "BLOCK_IN": 128},
        4,
    ),
    (
        "topk_resident_512_fp16_dx",
        "topk",
        "_topk_rows_kernel",
        {**_TOPK_SIG, "g_ptr": "*fp16", "vals_ptr": "*fp16", "w_ptr": "*fp16", "dx_ptr": "*fp16"},
        {"HAS_HITS": False, "FUSE_DX": True, "RESIDENT": True, "BLOCK_N": 512, "BLOCK_K": 32, "BLOCK_IN": 128},
        4,
    ),
    (
        "topk_resident_8192_hits_dx",
        "topk",
        "_topk_rows_kernel",
        _TOPK_SIG,
        {"HAS_HITS": True, "FUSE_DX": True, "RESIDENT": True, "BLOCK_N": 8192, "BLOCK_K": 32, "BLOCK_IN": 128},
        16,
    ),
    (
        "topk_streamed_hits_dx",
        "topk",
        "_topk_rows_kernel",
        _TOPK_SIG,
        {"HAS_HITS": True, "FUSE_DX": True, "RESIDENT": False, "BLOCK_N": 2048, "BLOCK_K": 32, "BLOCK_IN": 128},
        4,
    ),
    ("meprop_dw", "rows", "_meprop_dw_kernel", _DW_SIG, {"BLOCK_E": 16, "BLOCK_IN": 128}, 4),
    ("meprop_dw_bf16", "rows", "_meprop_dw_kernel", _bf16(_DW_SIG), {"BLOCK_E": 16, "BLOCK_IN": 128}, 4),
    (
        "sgd_rows_momentum_clip",
        "row_updates",
        "_sgd_rows_kernel",
        _ROW_UPDATE_SIGS["_sgd_rows_kernel"],
        {"HAS_ROWS": True, "MOMENTUM": True, "CLIP": True, "BLOCK": 1024},
        4,
    ),
    (
        "sgd_rows_dense",
        "row_updates",
        "_sgd_rows_kernel",
        _ROW_UPDATE_SIGS["_sgd_rows_kernel"],
        {"HAS_ROWS": False, "MOMENTUM": False, "CLIP": False, "BLOCK": 1024},
        4,
    ),
    (
        "adam_rows_clip",
        "row_updates",
        "_adam_rows_kernel",
        _ROW_UPDATE_SIGS["_adam_rows_kernel"],
        {"HAS_ROWS": True, "CLIP": True, "BLOCK": 1024},
        4,
    ),
    (
        "adam_rows_bf16",
        "row_updates",
        "_adam_rows_kernel",
        _bf16(_ROW_UPDATE_SIGS["_adam_rows_kernel"]),
        {"HAS_ROWS": True, "CLIP": False, "BLOCK": 1024},
        4,
    ),
    (
        "adagrad_rows_clip",
        "row_updates",
        "_adagrad_rows_kernel",
        _ROW_UPDATE_SIGS["_adagrad_rows_kernel"],
        {"HAS_ROWS": True, "CLIP": True, "BLOCK": 1024},
        4,
    ),
    (
        "column_abs_sum",
        "unified",
        "_column_abs_sum_kernel",
        {"g_ptr": "*fp32", "scores_ptr": "*fp32", "batch": "i32", "n": "i32"},
        {"BLOCK_B": 32, "BLOCK_N": 128},
        4,
    ),
]


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


def compile_case(case: str, arch: int) -> dict[str, int]:
    """Compile one case for ``sm_{arch}`` -> ``{"regs", "spill_stores", "spill_loads"}``."""
    _, module, kernel, signature, constexprs, num_warps = next(c for c in CASES if c[0] == case)
    fn = getattr(importlib.import_module(f"mesimp_gpu.kernels.{module}"), kernel)
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    if list(full_signature) != fn.arg_names:
        raise TypeError(f"signature of {kernel} is out of date: {fn.arg_names}")
    compiled = triton.compile(
        ASTSource(fn=fn, signature=full_signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )
    if not compiled.asm["cubin"]:
        raise RuntimeError("no cubin produced")
    regs, spill_stores, spill_loads = ptxas_usage(compiled.asm["ptx"], arch)
    return {"regs": regs, "spill_stores": spill_stores, "spill_loads": spill_loads}


def compile_all() -> dict[str, dict[str, Any]]:
    """Every case for both targets; a failure is recorded as ``{"error": ...}`` instead of raised."""
    results: dict[str, dict[str, Any]] = {}
    for case, *_ in CASES:
        for arch in ARCHS:
            try:
                results[f"{case}@{arch}"] = compile_case(case, arch)
            except Exception as exc:  # reported by the test of that case
                results[f"{case}@{arch}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    """Run :func:`compile_all` in a child process without the interpreter (see the module docstring)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, f"AOT compile process failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_kernel_compiles(compiled: dict[str, dict[str, Any]], case: str, arch: int) -> None:
    usage = compiled[f"{case}@{arch}"]
    assert "error" not in usage, usage.get("error")
    print(
        f"\n[aot] sm_{arch} {case}: {usage['regs']} registers, "
        f"{usage['spill_stores']} B spill stores, {usage['spill_loads']} B spill loads"
    )
    assert isinstance(usage["regs"], int) and 0 < usage["regs"] <= 255
    assert isinstance(usage["spill_stores"], int) and usage["spill_stores"] >= 0
    assert isinstance(usage["spill_loads"], int) and usage["spill_loads"] >= 0


if __name__ == "__main__":
    print(json.dumps(compile_all()))
