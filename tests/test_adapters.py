"""The peer adapters (kvcompress/testing/adapters/): their conversions, their
domains, and their error when the peer is missing.

CI has none of the Triton peers' code, so each adapter is first tested
against a stand-in written here: a small torch module following the peer's
calling convention (argument order, layouts, returned offsets, asserted
limits), computing what the peer's documentation says it computes. The
stand-ins are injected in-process with ``monkeypatch.setitem(sys.modules,
...)`` for direct checks, and written out as packages on PYTHONPATH for
one run of the property suite in a subprocess (``--kvcompress-profile ci``,
not dev: deterministic and without an example database, so CI draws what a
developer drew; a ``-k`` selection keeps it to seconds). Where a real peer
is importable it runs through the suite too (the seed is in the test
extra, so always; fla-core and the Triton NSA kernels when installed or on
PYTHONPATH).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import kvcompress.functional as kf
from kvcompress.testing import Domain, domain_of
from kvcompress.testing.adapters import ADAPTERS, fla, nsa_triton, seed

ROOT = Path(__file__).resolve().parent.parent

# -- stand-ins ------------------------------------------------------------------

# native_sparse_attention.ops: packed tokens (T, H, D), int32 offsets, the
# peer's asserted limits; returns (y (W_total, H, D), y_cu_seqlens int32)
NSA_OPS = '''
import torch


def _check(x, cu_seqlens, kernel_size, kernel_stride):
    assert x.dtype in (torch.float16, torch.bfloat16)
    assert cu_seqlens.dtype == torch.int32
    assert kernel_size % kernel_stride == 0
    assert kernel_size in {16, 32, 64, 128}
    assert cu_seqlens.shape[0] > 1          # the peer sizes its grid with a max over sequences


def _windows(x, cu_seqlens, L, S):
    """(W_total, H, L, D) float32 valid windows, and int32 output offsets."""
    cu = cu_seqlens.tolist()
    parts, counts = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        seq = x[a:b].float()                                        # [n, H, D]
        if b - a >= L:
            parts.append(seq.unfold(0, L, S).permute(0, 1, 3, 2))   # [w, H, L, D]
        counts.append(0 if b - a < L else (b - a - L) // S + 1)
    H, D = x.shape[1], x.shape[2]
    win = torch.cat(parts) if parts else x.new_zeros(0, H, L, D, dtype=torch.float32)
    y_cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=x.device)
    y_cu[1:] = torch.cumsum(torch.tensor(counts, device=x.device), 0)
    return win, y_cu


def avgpool_compress(x, w, cu_seqlens, kernel_size, kernel_stride, pe=None):
    assert w is None
    _check(x, cu_seqlens, kernel_size, kernel_stride)
    win, y_cu = _windows(x, cu_seqlens, kernel_size, kernel_stride)
    y = win.mean(2).to(x.dtype)
    if pe is not None:
        y = y + pe.mean(1)
    return y, y_cu


def weightedpool_compress(x, w, cu_seqlens, kernel_size, kernel_stride, pe=None):
    _check(x, cu_seqlens, kernel_size, kernel_stride)
    assert w.shape == (x.shape[1], kernel_size) and w.dtype == x.dtype
    win, y_cu = _windows(x, cu_seqlens, kernel_size, kernel_stride)
    y = torch.einsum("whld,hl->whd", win, w.float()).to(x.dtype)
    if pe is not None:
        y = y + torch.einsum("hld,hl->hd", pe, w)
    return y, y_cu


def linear_compress(x, w, cu_seqlens, kernel_size, kernel_stride, pe=None):
    _check(x, cu_seqlens, kernel_size, kernel_stride)
    H, D = x.shape[1], x.shape[2]
    assert w.shape == (H, kernel_size * D, D) and w.dtype == x.dtype and D % 8 == 0
    win, y_cu = _windows(x, cu_seqlens, kernel_size, kernel_stride)
    y = torch.einsum("whk,hko->who", win.flatten(2), w.float()).to(x.dtype)
    if pe is not None:
        y = y + torch.einsum("hk,hko->ho", pe.flatten(1), w)
    return y, y_cu
'''

# fla.ops.utils.pooling: (B, T, H, D) or packed (1, T, H, D), chunks of
# chunk_size (a power of two), the partial last chunk kept and averaged
FLA_POOLING = '''
import torch


def mean_pooling(x, chunk_size, cu_seqlens=None, **kwargs):
    assert chunk_size & (chunk_size - 1) == 0, "arange's range must be a power of 2"
    x = x.contiguous()
    B, T, H, D = x.shape
    bounds = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    rows = []
    for b in range(B):
        chunks = []
        for s, e in bounds:
            for c in range(s, e, chunk_size):
                chunks.append(x[b, c:min(c + chunk_size, e)].float().mean(0))
        rows.append(torch.stack(chunks) if chunks else x.new_zeros(0, H, D, dtype=torch.float32))
    n_chunks = sum(-(-(e - s) // chunk_size) for s, e in bounds)
    out = torch.stack(rows) if rows else x.new_zeros(0, n_chunks, H, D, dtype=torch.float32)
    return out.to(x.dtype)
'''

# native_sparse_attention_pytorch.compress_networks: window networks on
# (b, h, w, n, d) with the seed's parameter names and shapes
SEED_NETS = '''
import torch
from torch import nn


class ConvLinearCompress(nn.Module):
    def __init__(self, heads, dim_head, compress_window_size):
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv1d(heads * dim_head, heads * dim_head, compress_window_size,
                              stride=compress_window_size, groups=heads)

    def forward(self, kv):
        b, h, w, n, d = kv.shape
        y = self.conv(kv.permute(0, 1, 4, 2, 3).reshape(b, h * d, w * n))   # [b, h*d, w]
        return y.reshape(b, h, d, -1).transpose(2, 3)


class AttentionPool(nn.Module):
    def __init__(self, dim_head, compress_window_size):
        super().__init__()
        self.to_attn_logits = nn.Linear(dim_head, dim_head, bias=False)

    def forward(self, kv):
        return (kv * self.to_attn_logits(kv).softmax(dim=-2)).sum(-2)


class _Grouped(nn.Module):
    def __init__(self, heads, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, i, o))
        self.bias = nn.Parameter(torch.zeros(1, heads, 1, o))

    def forward(self, t):                                  # [b, h, w, i]
        return torch.einsum("bhwi,hio->bhwo", t, self.weight) + self.bias


class GroupedMLP(nn.Module):
    def __init__(self, dim_head, compress_window_size, heads, expand_factor=1.0):
        super().__init__()
        dim = dim_head * compress_window_size
        hidden = int(dim * expand_factor)
        self.net = nn.Sequential(_Grouped(heads, dim, hidden), nn.ReLU(), _Grouped(heads, hidden, dim_head))

    def forward(self, kv):
        return self.net(kv.flatten(-2))


class _Flatten(nn.Module):
    def forward(self, kv):
        return kv.flatten(-2)


class SingleProjection(nn.Module):
    def __init__(self, dim_head, compress_window_size, heads=1):
        super().__init__()
        assert heads == 1
        self.compress = nn.Sequential(_Flatten(), nn.Linear(dim_head * compress_window_size, dim_head, bias=False))

    def forward(self, kv):
        return self.compress(kv)
'''

STAND_INS = {
    "native_sparse_attention/__init__.py": "",
    "native_sparse_attention/ops/__init__.py": NSA_OPS,
    "fla/__init__.py": "",
    "fla/ops/__init__.py": "",
    "fla/ops/utils/__init__.py": "",
    "fla/ops/utils/pooling.py": FLA_POOLING,
    "native_sparse_attention_pytorch/__init__.py": "",
    "native_sparse_attention_pytorch/compress_networks.py": SEED_NETS,
}


def write_stand_ins(root: Path) -> Path:
    for rel, src in STAND_INS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    return root


@pytest.fixture
def stand_ins(monkeypatch):
    """Every peer module replaced by its stand-in in sys.modules."""
    for rel, src in STAND_INS.items():
        name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        mod = types.ModuleType(name)
        if rel.endswith("__init__.py"):
            mod.__path__ = []
        exec(compile(textwrap.dedent(src), f"<stand-in {rel}>", "exec"), mod.__dict__)
        monkeypatch.setitem(sys.modules, name, mod)
    seed._module.cache_clear()
    yield
    seed._module.cache_clear()


def _close(got, want, rtol):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * want.abs().max().item() + 1e-6)


# -- conversions, in-process, against kvcompress.functional --------------------

@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_pe", [False, True])
def test_nsa_triton_conversions(stand_ins, packed, with_pe):
    g = torch.Generator().manual_seed(1)
    H, D, L, S = 3, 8, 16, 8
    if packed:
        cu = torch.tensor([0, 5, 5, 40, 80], dtype=torch.int64)
        x = torch.randn(1, 80, H, D, generator=g).half().transpose(1, 2)   # a (B, T, H, D) tensor seen as (B, H, T, D)
    else:
        cu = None
        x = torch.randn(2, H, 41, D, generator=g).half()
    pe = torch.randn(H, L, D, generator=g).half() if with_pe else None
    kw = dict(block_size=L, stride=S, pe=pe, cu_seqlens=cu)
    w_pool = torch.randn(H, L, generator=g).half()
    w_lin = (torch.randn(H, L, D, D, generator=g) / (L * D) ** 0.5).half()
    x64 = x.double()
    pe64 = None if pe is None else pe.double()
    kw64 = dict(kw, pe=pe64)
    _close(nsa_triton.mean_pool(x, **kw), kf.mean_pool(x64, **kw64), 2e-3)
    _close(nsa_triton.weighted_pool(x, w_pool, **kw), kf.weighted_pool(x64, w_pool.double(), **kw64), 2e-3)
    _close(nsa_triton.linear(x, w_lin, **kw), kf.linear(x64, w_lin.double(), **kw64), 2e-3)


def test_nsa_triton_rejects_what_the_peer_lacks(stand_ins):
    x = torch.randn(1, 2, 32, 8).half()
    with pytest.raises(ValueError, match="padding='valid' only"):
        nsa_triton.mean_pool(x, block_size=16, stride=16, padding="left")
    with pytest.raises(ValueError, match="one weight set per head"):
        nsa_triton.weighted_pool(x, torch.randn(1, 16).half(), block_size=16, stride=16)
    with pytest.raises(ValueError, match="no bias"):
        nsa_triton.linear(x, torch.randn(2, 16, 8, 8).half(), torch.zeros(2, 8).half(), block_size=16, stride=16)


def test_fla_drops_the_partial_chunk(stand_ins):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 11, 5, generator=g)
    _close(fla.mean_pool(x, block_size=4, stride=4), kf.mean_pool(x, block_size=4, stride=4), 1e-6)
    # packed: an empty sequence, one shorter than a chunk, one with a partial chunk
    cu = torch.tensor([0, 0, 3, 14, 22], dtype=torch.int32)
    xp = torch.randn(1, 3, 22, 5, generator=g)
    got = fla.mean_pool(xp, block_size=4, stride=4, cu_seqlens=cu)
    _close(got, kf.mean_pool(xp, block_size=4, stride=4, cu_seqlens=cu), 1e-6)
    assert got.shape[2] == 0 + 0 + 2 + 2
    with pytest.raises(ValueError, match="stride == block_size"):
        fla.mean_pool(x, block_size=4, stride=2)


def test_fla_full_chunk_indices():
    cu = torch.tensor([0, 0, 3, 14, 22, 30])
    # chunks of 4: seq lengths 0, 3, 11, 8, 8 own 0, 1, 3, 2, 2 chunks; full ones 0, 0, 2, 2, 2
    assert fla._full_chunks(cu, 4).tolist() == [1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("packed", [False, True])
def test_seed_conversions(stand_ins, padding, packed):
    g = torch.Generator().manual_seed(3)
    H, D, L, S, F = 2, 3, 4, 2, 5
    dt = torch.float64
    if packed:
        cu = torch.tensor([0, 3, 3, 13, 23])
        x = torch.randn(1, H, 23, D, generator=g, dtype=dt)
    else:
        cu = None
        x = torch.randn(2, H, 11, D, generator=g, dtype=dt)
    kw = dict(block_size=L, stride=S, padding=padding, pe=torch.randn(H, L, D, generator=g, dtype=dt), cu_seqlens=cu)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    w, b = r(H, L, D, D), r(H, D)
    _close(seed.linear(x, w, b, **kw), kf.linear(x, w, b, **kw), 1e-12)
    _close(seed.linear(x, w, None, **kw), kf.linear(x, w, None, **kw), 1e-12)
    w1 = r(1, L, D, D)
    _close(seed.linear_shared(x, w1, None, **kw), kf.linear(x, w1, None, **kw), 1e-12)
    wa = r(1, D, D)
    _close(seed.attention_pool(x, wa, **kw), kf.attention_pool(x, wa, **kw), 1e-12)
    m = (r(H, L * D, F), r(H, F), r(H, F, D), None)
    _close(seed.mlp(x, *m, **kw), kf.mlp(x, *m, **kw), 1e-12)


def test_seed_gradients_reach_our_parameters(stand_ins):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    seed.linear(x, w, None, block_size=4, stride=2).sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    kf.linear(x2, w2, None, block_size=4, stride=2).sum().backward()
    _close(x.grad, x2.grad, 1e-12)
    _close(w.grad, w2.grad, 1e-12)


# -- declared domains ------------------------------------------------------------------

def test_declared_domains():
    d = domain_of(nsa_triton.linear)
    assert (d.paddings, d.groups, d.dtypes, d.block_sizes, d.strides, d.bias, d.d_out_equals_d,
            d.head_dim_multiple, d.empty) == (("valid",), "per_head", ("float16", "bfloat16"), (16, 32, 64, 128),
                                               "divides", False, True, 8, False)
    assert domain_of(nsa_triton.weighted_pool).pe and domain_of(nsa_triton.mean_pool).differentiable
    d = domain_of(fla.mean_pool)
    assert (d.strides, d.pe, d.paddings, "float64" in d.dtypes) == ("equal", False, ("valid",), False)
    assert domain_of(seed.linear).empty is False and domain_of(seed.mlp).activations == ("relu",)
    assert domain_of(seed.attention_pool).groups == "shared"
    for adapters in ADAPTERS.values():
        for _kind, target in adapters:
            mod, attr = target.split(":")
            fn = getattr(sys.modules[mod], attr)
            assert isinstance(domain_of(fn), Domain) and not domain_of(fn).full, target


# -- a missing peer --------------------------------------------------------------------

@pytest.mark.parametrize("module, call, package", [
    ("native_sparse_attention", lambda x: nsa_triton.mean_pool(x, block_size=16, stride=16),
     "native-sparse-attention-triton"),
    ("fla", lambda x: fla.mean_pool(x, block_size=4, stride=4), "fla-core"),
    ("native_sparse_attention_pytorch", lambda x: seed.attention_pool(x, torch.eye(8)[None], block_size=4, stride=4),
     "native-sparse-attention-pytorch"),
])
def test_missing_peer_is_a_clear_import_error(monkeypatch, module, call, package):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)   # import of it and of its submodules now fails
    seed._module.cache_clear()
    with pytest.raises(ImportError, match=package) as e:
        call(torch.randn(1, 2, 32, 8))
    assert "kvcompress adapter" in str(e.value)
    seed._module.cache_clear()


# -- the property suite, in a subprocess ---------------------------------------------------

def _suite(impls, *, dtypes, k, pythonpath=(), extra_env=None):
    env = {**os.environ, **(extra_env or {})}
    env.pop("KVCOMPRESS_REPORT", None)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = [sys.executable, "-m", "pytest", "--pyargs", "kvcompress.testing.properties", "-q", "-p",
            "no:cacheprovider", "--kvcompress-profile", "ci", "--impl-device", "cpu", "--impl-dtypes", dtypes,
            "-k", k, "-W", "ignore"]
    for spec in impls:
        args += ["--impl", spec]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _all_specs(*peers):
    return [f"{kind}={target}" for p in peers for kind, target in ADAPTERS[p]]


SELECTION = "(test_matches_reference or test_gradients_match_exact) and not realistic and not production"


def test_suite_passes_every_adapter_on_its_stand_in(tmp_path):
    r = _suite(_all_specs("nsa_triton", "fla", "seed"), dtypes="float32,float16", k=SELECTION,
               pythonpath=[write_stand_ins(tmp_path)])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # forward and gradients: nsa_triton 3 x float16 (its domain), fla 1 x 2 dtypes, the seed 4 x 2 dtypes
    assert re.search(r"\b26 passed\b", r.stdout) and not re.search(r"\d+ failed", r.stdout), r.stdout[-2000:]


def test_suite_catches_a_wrong_stand_in(tmp_path):
    """The same run fails when the peer is wrong: a stand-in that reads the
    window one token late (the adapter must not hide it)."""
    write_stand_ins(tmp_path)
    ops = tmp_path / "native_sparse_attention/ops/__init__.py"
    ops.write_text(ops.read_text().replace("seq = x[a:b].float()", "seq = x[a:b].float().roll(-1, 0)"))
    r = _suite(["weighted_pool=kvcompress.testing.adapters.nsa_triton:weighted_pool"], dtypes="float16",
               k="test_matches_reference and not realistic and not production", pythonpath=[tmp_path])
    assert r.returncode == 1 and "differs from the reference" in r.stdout, r.stdout[-3000:]


def test_suite_on_the_real_seed():
    pytest.importorskip("native_sparse_attention_pytorch.compress_networks")
    r = _suite(_all_specs("seed"), dtypes="float32", k=SELECTION)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_suite_on_the_real_fla():
    pytest.importorskip("fla.ops.utils.pooling")
    r = _suite(_all_specs("fla"), dtypes="float32", k="test_matches_reference and not realistic and not production")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _block_pointers() -> bool:
    import triton.language as tl

    return "removed" not in (tl.make_block_ptr.__doc__ or "")


def test_suite_on_the_real_nsa_triton():
    pytest.importorskip("native_sparse_attention.ops")
    if not _block_pointers():
        pytest.skip("this Triton removed tl.make_block_ptr, which the Triton NSA kernels use (needs triton < 3.9)")
    # linear: its pools sum in float16 (a finding the suite reports, kvcompress/testing/adapters/nsa_triton.py)
    r = _suite(["linear=kvcompress.testing.adapters.nsa_triton:linear"], dtypes="float16",
               k="test_matches_reference and not realistic and not production")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
