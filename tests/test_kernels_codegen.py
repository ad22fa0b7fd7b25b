"""The fused kernels compile for Hopper (sm_90) on this CPU-only machine, with vector
loads and stores of the rows and no register spills (bench/kernels_codegen.py --check).
Runs in a child process: the other kernel tests define the kernels under TRITON_INTERPRET=1,
and the interpreter does not compile."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_with_vector_memory_ops():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_codegen.py"), "--check"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if "warps=" in line]
    assert len(lines) == 16 and all("spill=0" in line or "spill=None" in line for line in lines), run.stdout
