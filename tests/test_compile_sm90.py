"""Every Triton kernel compiles for sm_90 (H100/H200) without a GPU: Triton's
own NVIDIA backend and the ptxas it bundles, on the interpreter's CPU
machine (``scripts/gpu_check.py --compile-only --first-only``: one
configuration per kernel and variant, bfloat16 and float32, fixed-length,
D = 128). A kernel change that fails to compile, or a compile harness that
no longer matches a kernel's signature, fails here instead of in a scarce
GPU session. Spills and the other configurations are the full
``--compile-only`` run's business (docs/triton-perf.md, "Compile check").
The script runs in a process of its own: this session's kernels were made
for the interpreter (TRITON_INTERPRET=1 at import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _ptxas() -> str | None:
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(nvidia / "ptxas") if (nvidia / "ptxas").is_file() else shutil.which("ptxas")


@pytest.mark.skipif(_ptxas() is None, reason="no ptxas: this Triton build has no NVIDIA backend binaries")
def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--compile-only", "--first-only",
                           "--dtypes", "bf16,fp32", "--head-dims", "128", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["compile"]
    kernels = {r["kernel"].split(" [")[0] for r in rows}
    assert len(rows) >= 30 and any("gated_pool_fwd_kernel" in k for k in kernels), sorted(kernels)
    bad = [f"{r['kernel']} {r['config']}: {r['error'][:400]}" for r in rows if "error" in r]
    assert not bad, "\n".join(bad)
