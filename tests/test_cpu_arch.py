"""The cpu backend's kernels at every instruction-set level, ARM included, without torch.

``cpu_kernels_check.cpp`` runs the per-row kernels (``cpu_core.h``, ``cpu_simd.h``) against scalar
references. It is built here for AVX2+FMA (``x86-64-v3``) and AVX-512 (``x86-64-v4``) and run where
this CPU executes them, and cross-built for ARM NEON (``armv8-a``, ``aarch64-linux-gnu-g++``) and run
under ``qemu-aarch64`` where both are installed (Debian: ``g++-aarch64-linux-gnu qemu-user``). The
generated code of the hot loops is read too: packed FMAs at the level's vector width with no stack
traffic in their blocks (the register tiles fit), vector compaction, vector square roots. And the
extension's translation unit, with the torch headers, compiles for ARM.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mesimp_gpu.backends.cpu import CFLAGS, HERE, runnable_levels

CHECK = Path(__file__).with_name("cpu_kernels_check.cpp")
ON_X86 = platform.machine() in ("x86_64", "AMD64")
ON_ARM = platform.machine() in ("aarch64", "arm64")
ARM_CXX = "c++" if ON_ARM else "aarch64-linux-gnu-g++"
#: the kernels' flags without the OpenMP and visibility ones (the check is one thread, one binary)
FLAGS = ["-std=c++17", *(f for f in CFLAGS if f not in ("-fopenmp", "-fvisibility=hidden")), f"-I{HERE}"]

X86_LEVELS = ["x86-64-v3", "x86-64-v4"]


def compiler_for(level: str) -> str | None:
    """The C++ compiler that builds ``level`` here (None: none installed)."""
    if level in X86_LEVELS:
        return "c++" if ON_X86 and shutil.which("c++") else None
    return ARM_CXX if shutil.which(ARM_CXX) else None


def need_compiler(level: str) -> str:
    compiler = compiler_for(level)
    if compiler is None:
        pytest.skip(f"no compiler for {level} here (ARM: apt-get install g++-aarch64-linux-gnu)")
    return compiler


def runner_for(level: str) -> list[str] | None:
    """How to run a binary built for ``level`` here: directly, under qemu, or not at all (None)."""
    if level in X86_LEVELS:
        return [] if level in runnable_levels() else None
    if ON_ARM:
        return []
    return ["qemu-aarch64"] if shutil.which("qemu-aarch64") else None


@pytest.mark.parametrize("level", [*X86_LEVELS, "armv8-a"])
def test_kernels_match_scalar_references(tmp_path, level):
    compiler = need_compiler(level)
    binary = tmp_path / f"check-{level}"
    static = ["-static"] if level == "armv8-a" and not ON_ARM else []  # qemu-user needs no ARM libraries then
    build = subprocess.run([compiler, *FLAGS, f"-march={level}", *static, str(CHECK), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    runner = runner_for(level)
    if runner is None:
        pytest.skip(f"built for {level}; this machine cannot run it (ARM on x86: apt-get install qemu-user)")
    for seed in ("0", "1"):
        run = subprocess.run([*runner, str(binary), seed], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        isa = {"x86-64-v3": "avx2+fma", "x86-64-v4": "avx512", "armv8-a": "neon"}[level]
        assert run.stdout.startswith(f"ok {isa} "), run.stdout


#: per level: the packed FMA of its vector width, a vector register moved to or from the stack (a spill),
#: and the instructions the
#: compaction, the selection's key and group-maximum loops and the row updates' square roots must use
X86_SPILL = r"%[xyz]mm\d+.*\(%r[sb]p\)|\(%r[sb]p\).*%[xyz]mm"
LEVEL_CODE = {
    "x86-64-v3": dict(fma=r"vfn?madd\w*ps\s.*%ymm", stack=X86_SPILL, compact=r"vpermd|vpermps",
                      group_max=r"vpmaxud\s.*%ymm", sqrt=r"vsqrtps\s.*%ymm", label=r"^\.L\w+:"),
    "x86-64-v4": dict(fma=r"vfn?madd\w*ps\s.*%zmm", stack=X86_SPILL, compact=r"vpcompressd",
                      group_max=r"vpmaxud\s.*%[yz]mm", sqrt=r"vsqrtps\s.*%[yz]mm", label=r"^\.L\w+:"),
    "armv8-a": dict(fma=r"fml[as]\s+v\d+\.4s", stack=r"(ldr|str|ldp|stp)\s+q\d+.*\[sp", compact=r"\btbl\s+v", group_max=r"umax\s+v\d+\.4s",
                    sqrt=r"fsqrt\s+v\d+\.4s", label=r"^\.L\w+:"),
}


def function_code(assembly: str, signature: str) -> str:
    """The assembly of one function (demangled ``signature`` prefix) up to its ``.size`` directive."""
    start = assembly.index(f"\n{signature}")
    end = assembly.index(".size", start)
    return assembly[start:end]


def blocks(code: str, label: str) -> list[str]:
    """The basic blocks of a function's assembly, split at its local labels."""
    return re.split(label, code, flags=re.M)


@pytest.mark.parametrize("level", list(LEVEL_CODE))
def test_hot_loops_are_vectorised_without_spills(tmp_path, level):
    """The generated code of the hot loops at each level (compiling needs no CPU of that level)."""
    compiler = need_compiler(level)
    if shutil.which("c++filt") is None:
        pytest.skip("needs c++filt (binutils) to read the assembly")
    build = subprocess.run([compiler, *FLAGS, f"-march={level}", "-S", str(CHECK), "-o", "-"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assembly = subprocess.run(["c++filt"], input=build.stdout, capture_output=True, text=True, check=True).stdout
    code = LEVEL_CODE[level]
    for variant in ("false, false", "false, true"):  # the first pass of a row sum, and the passes that add
        body = function_code(assembly, f"void mesimp_cpu::row_sum_pass<float, {variant}>")
        fma_blocks = [b for b in blocks(body, code["label"]) if re.search(code["fma"], b)]
        assert fma_blocks, f"{level}: no packed FMA of the level's width in the weighted row sum"
        for block in fma_blocks:  # accumulators, coefficients and loads all in registers
            assert not re.search(code["stack"], block), f"{level}: stack traffic beside the FMAs:\n{block}"
    assert re.search(code["compact"], function_code(assembly, "long mesimp_cpu::compact_at_least<unsigned int>"))
    assert re.search(code["group_max"], function_code(assembly, "bool mesimp_cpu::select_row<float>"))
    for update in ("adam_run<float>", "adagrad_run<float>"):
        assert re.search(code["sqrt"], function_code(assembly, f"void mesimp_cpu::{update}")), update
    assert re.search(code["fma"], function_code(assembly, "void mesimp_cpu::sgd_run<float>")), "sgd_run<float>"


@pytest.mark.slow
def test_extension_compiles_for_arm(tmp_path):
    """The extension's translation unit (kernels and torch glue) compiles for ARM against the torch headers
    (header-only: linking needs an ARM libtorch, which an x86 machine lacks)."""
    compiler = need_compiler("armv8-a")
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    build = subprocess.run([compiler, "-std=c++20", *CFLAGS, "-march=armv8-a", "-fPIC", f"-I{HERE}", *includes,
                            "-c", str(HERE / "cpu_kernels.cpp"), "-o", str(tmp_path / "cpu_kernels.o")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
