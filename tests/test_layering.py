"""The layering STYLE.md promises, checked: the loop reference imports
neither torch nor kvcompress; the runtime package never imports the
reference, the shipped suite or Hypothesis; the pytest plugin imports no
torch when a session does not use it (tests/test_plugin.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_reference_imports_neither_torch_nor_kvcompress():
    r = _run("""
        import sys
        import kvcompress_reference
        from kvcompress_reference import streaming
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "kvcompress", "triton"))
        assert not bad, bad
    """)
    assert r.returncode == 0, r.stderr[-3000:]


def test_runtime_never_imports_the_reference_or_the_suite():
    r = _run("""
        import sys
        import torch
        import kvcompress
        import kvcompress.functional as kf, kvcompress.modules, kvcompress.streaming
        x = torch.randn(1, 2, 16, 4)
        kf.mean_pool(x, block_size=4, stride=2)
        kf.linear(x, torch.randn(2, 4, 4, 3), block_size=4, stride=2)
        kvcompress.Compressor("mlp", heads=2, dim_head=4, block_size=4, stride=2)(x)
        bad = sorted(m for m in sys.modules
                     if m.startswith(("kvcompress.testing", "kvcompress_reference", "hypothesis", "pytest")))
        assert not bad, bad
    """)
    assert r.returncode == 0, r.stderr[-3000:]
