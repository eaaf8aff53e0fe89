"""Backends found by entry point (group ``kvcompress.backends``) and the
lazy, per-kind loading of the built-in ones (kvcompress/backends.py).

Each check runs in a fresh interpreter whose path holds a throw-away
distribution (a ``*.dist-info`` with ``entry_points.txt``), so what
``importlib.metadata`` finds is exactly what the test wrote.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(tmp_path, code: str, entry_points: str = "", modules: dict | None = None) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    info = site / "kvc_plugin_test-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvc-plugin-test\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    for name, text in (modules or {}).items():
        (site / f"{name}.py").write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n"
                           + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


PLUGIN = """
    import torch
    from kvcompress.backends import register
    import kvcompress.functional as kf

    @register("mean_pool", "plugin", devices=("cpu",), dtypes=(torch.float32,))
    def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
        return kf.mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe,
                            cu_seqlens=cu_seqlens, backend="torch") + 0.0
"""


def test_an_entry_point_registers_a_backend(tmp_path):
    r = _run(tmp_path, """
        import torch
        import kvcompress.backends as kb
        import kvcompress.functional as kf
        names = [b.name for b in kb.backends("mean_pool")]
        assert "plugin" in names and "torch" in names, names
        x = torch.randn(1, 2, 9, 3)
        y = kf.mean_pool(x, block_size=4, stride=2, backend="plugin")
        assert torch.equal(y, kf.mean_pool(x, block_size=4, stride=2, backend="torch"))
        # entry points load once, on the first look-up of any kind: a second kind does not reload them
        assert [b.name for b in kb.backends("linear")] and "plugin" not in [b.name for b in kb.backends("linear")]
    """, "[kvcompress.backends]\nmine = kvc_plugin_mine\n", {"kvc_plugin_mine": PLUGIN})
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_broken_plugin_warns_and_the_builtins_work(tmp_path):
    r = _run(tmp_path, """
        import warnings
        import torch
        import kvcompress.backends as kb
        import kvcompress.functional as kf
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            names = [b.name for b in kb.backends("mean_pool")]
        assert "torch" in names, names
        assert any("broken" in str(m.message) and "ZeroDivisionError" in str(m.message) for m in w), \\
            [str(m.message) for m in w]
        kf.mean_pool(torch.randn(1, 1, 4, 2), block_size=2, stride=2)
    """, "[kvcompress.backends]\nbroken = kvc_plugin_broken\n", {"kvc_plugin_broken": "1 / 0\n"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_builtin_backends_load_per_kind_on_first_use(tmp_path):
    r = _run(tmp_path, """
        import sys
        import kvcompress.backends as kb
        assert not any(m.startswith("kvcompress.ops.") for m in sys.modules), sorted(sys.modules)
        kb.backends("linear")
        kinds = sorted(m for m in sys.modules if m.startswith("kvcompress.ops.") and m.count(".") == 2
                       and not m.startswith("kvcompress.ops._"))
        assert kinds == ["kvcompress.ops.linear"], kinds
    """)
    assert r.returncode == 0, r.stderr[-3000:]
