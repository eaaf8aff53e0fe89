"""gated_pool's torch and Triton backends (SPEC section 3b) against a float64
torch oracle written here: windows gathered with explicit index tensors,
pads masked, one softmax; its autograd gives the exact gradients.

Checked: the forward and the gradients of x, z and bias on a grid (both
paddings, split on/off, bias None / G = 1 / G = H, S < L and S = L, packed
sequences with one shorter than a window, x and z as transposed (B, T, H, D)
views); float32 and float64 (the Triton kernels compute float64 input in
float64, though the registry offers them float16/bfloat16/float32 only),
float16 and bfloat16 rounded once; multi-tile paths (``small_tiles``);
every forward configuration the autotuner may pick, one position a step or
in position blocks (``launch.only_config``); -inf and +inf scores; NaN
containment; the empty output; bitwise determinism of the backward; the
custom op (``torch.library.opcheck``), its statistics recomputed when the
forward stored none. Kernels run in Triton's interpreter without a GPU, their
outputs NaN-poisoned (conftest: KVCOMPRESS_POISON=1), so an element never
written fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.ops.gated_pool import torch_impl

triton = pytest.importorskip("triton")

from kvcompress.ops._triton.env import INTERPRET  # noqa: E402
from kvcompress.ops._triton.launch import only_config, small_tiles  # noqa: E402
from kvcompress.ops.gated_pool import triton_impl  # noqa: E402

BACKENDS = {"torch": torch_impl.gated_pool, "triton": triton_impl.gated_pool}
# where a test's tensors live for the Triton backend: the interpreter's CPU, else the GPU
DEV = "cpu" if INTERPRET else "cuda"


def leaves_on(dev, *ts):
    """Each tensor (or None) as a leaf on ``dev``, requiring grad as it did."""
    return tuple(None if t is None else t.detach().to(dev).requires_grad_(t.requires_grad) for t in ts)


# --------------------------------------------------------------------------- the oracle


def window_index(T, *, L, S, padding, seqlens=None):
    """(idx, real), each (W, L): the token of every window position (0 at a
    pad) and whether it is a real token, by explicit loops over sequences
    and windows (SPEC section 2)."""
    pre = L - S if padding == "left" else 0
    idx, real = [], []
    off = 0
    for n in ([T] if seqlens is None else seqlens):
        W = ((n - L) // S + 1 if n >= L else 0) if padding == "valid" else n // S
        for i in range(W):
            pos = [i * S - pre + j for j in range(L)]
            idx.append([off + max(p, 0) for p in pos])
            real.append([p >= 0 for p in pos])
        off += n
    return (torch.tensor(idx, dtype=torch.int64).reshape(-1, L),
            torch.tensor(real, dtype=torch.bool).reshape(-1, L))


def gather(x, z, bias, *, split, L, S, padding, seqlens=None):
    """(v, s, real): values and scores (B, H, W, L, D_out) float64 of every
    window position, pads masked (v = 0, s = -inf); real (1, 1, W, L, 1)."""
    x, z = x.double(), z.double()
    B, H, T, Dx = x.shape
    C = L // S if split else 1
    Do = Dx // C
    idx, real = window_index(T, L=L, S=S, padding=padding, seqlens=seqlens)          # [W, L]
    chunk = torch.tensor([j // S if split else 0 for j in range(L)])
    feat = chunk[:, None] * Do + torch.arange(Do)                                     # [L, Do] feature read
    v = x[:, :, idx[:, :, None], feat[None]]                                          # [B, H, W, L, Do]
    s = z[:, :, idx[:, :, None], feat[None]]
    if bias is not None:
        s = s + bias.double().repeat_interleave(H // bias.shape[0], 0)[None, :, None]
    real = real[None, None, :, :, None]
    return v.masked_fill(~real, 0.0), s.masked_fill(~real, -math.inf), real


def oracle(x, z, bias, *, split, L, S, padding, seqlens=None):
    """gated_pool in float64 from gathered windows: (B, H, W, D_out)."""
    v, s, _ = gather(x, z, bias, split=split, L=L, S=S, padding=padding, seqlens=seqlens)
    return (torch.softmax(s, dim=3) * v).sum(3)


# --------------------------------------------------------------------------- tolerance

UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def bounds(x, z, bias, dy, *, split, L, S, padding, seqlens, dtype):
    """Worst-case errors, elementwise, of a kernel that accumulates in
    float32 (float64 for float64 input), against the oracle; inputs exact in
    ``dtype``; the one rounding of each result to ``dtype`` is added by ``check``.

    u = the accumulation's unit roundoff + float64's (the oracle's own).
    s = z + bias is one rounding: with |s| <= M_s every score moves by at most
    u M_s, every weight P by a factor within exp(+-2 u M_s); exp, running max
    and sum, the division and the sums over <= C = ceil(L/S) windows give at
    most 2L + 16 more roundings: each P-weighted term carries a relative
    error e = expm1(2 u M_s) + (2L + 16) u (Higham's gamma_n, eq. 3.5). The
    bounds scale e by the same sums taken over absolute values:
    y: e sum_j P|v|;  dx[t]: e sum P|dy| over the positions holding t;
    dz[t]: e sum P|v - y||dy| plus sum P |dy| err_y (y's own error enters
    v - y); dbias: the same two terms summed over batch, the heads of the
    group and the windows, plus n u times the absolute sum for the n-term
    float32 sum (n = B * H/G * W).
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = UNIT[acc] + UNIT[torch.float64]
    xs = x.detach().double().requires_grad_()
    zs = z.detach().double().requires_grad_()
    kw = dict(split=split, L=L, S=S, padding=padding, seqlens=seqlens)
    v, s, real = gather(xs, zs, None if bias is None else bias.detach(), **kw)
    with torch.no_grad():
        p = torch.softmax(s, dim=3)
        y = (p * v).sum(3, keepdim=True)
        g = dy.double().abs()[:, :, :, None]                                          # [B, H, W, 1, Do]
        e = math.expm1(2 * u * s[real.expand_as(s)].abs().max().item()) + (2 * L + 16) * u
        err_y = e * (p * v.abs()).sum(3, keepdim=True)
        t_dx = p * g
        t_ds = p * (v - y).abs() * g
        t_dsy = p * g * err_y

    def scatter(t):   # the adjoint of the gather: each position's term summed into its token
        return torch.autograd.grad((v * t).sum(), xs, retain_graph=True)[0]

    out = {"y": err_y[:, :, :, 0], "x": e * scatter(t_dx), "z": e * scatter(t_ds) + scatter(t_dsy)}
    if bias is not None:
        G = bias.shape[0]
        B, H, W = v.shape[:3]

        def per_group(t):   # [B, H, W, L, Do] -> [G, L, Do]
            return t.unflatten(1, (G, H // G)).sum(dim=(0, 2, 3))
        out["bias"] = (e + B * (H // G) * W * u) * per_group(t_ds) + per_group(t_dsy)
    return out


def check(name, got, ref, bound, dtype, roundings=1.0):
    """|got - ref| <= bound + roundings * (u_o |ref| + sub / 2) elementwise:
    rounding to ``dtype`` once (u_o its unit roundoff; sub its smallest
    subnormal, the absolute error of a result rounded into the subnormal
    range: float16 gradients of 1e-5 are there; flash-attention #1136).
    Nothing for float64, whose result is the accumulation itself."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = (got.double() - ref).abs()
    fi = torch.finfo(dtype)
    allowed = bound + (roundings * (UNIT[dtype] * ref.abs() + fi.smallest_normal * fi.eps / 2)
                       if dtype != torch.float64 else 0.0)
    bad = ~(err <= allowed)
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements beyond the bound, max error {err.max().item():.3g}, "
                           f"first at {bad.nonzero()[0].tolist()}, max error / allowed "
                           f"{(err / allowed).max().item():.3g}")


# --------------------------------------------------------------------------- inputs


def make(*, B, H, T, Dx, L, Do, groups, transposed, dtype, seed=0):
    """x, z (B, H, T, Dx) (transposed: (B, T, H, Dx) storage seen as (B, H, T, Dx)),
    bias (groups, L, Do) or None, all exact in ``dtype``, requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if transposed:
        x = rnd(B, T, H, Dx).transpose(1, 2)
        z = rnd(B, T, H, Dx, scale=2.0).transpose(1, 2)
    else:
        x, z = rnd(B, H, T, Dx), rnd(B, H, T, Dx, scale=2.0)
    bias = rnd(groups, L, Do) if groups else None
    for t in (x, z, bias):
        if t is not None:
            t.requires_grad_()
    return x, z, bias


def run_case(backend, *, padding, split, L, S, groups, transposed, packed, dtype, Dx=8, H=4, seed=0, lengths=None):
    """Forward and the three gradients of ``backend`` against the oracle.
    lengths: the packed sequences' lengths (default 3, 8, 9), or with packed
    False the one sequence length (default 16, B = 2)."""
    if packed:
        seqlens = lengths or [3, 8, 9]               # 3: shorter than a window of 4 (padding "valid")
        B, T = 1, sum(seqlens)
    else:
        seqlens, B, T = None, 2, lengths or 16
    Do = Dx // (L // S) if split else Dx
    x, z, bias = make(B=B, H=H, T=T, Dx=Dx, L=L, Do=Do, groups=groups, transposed=transposed, dtype=dtype,
                      seed=seed)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32) if packed else None
    # the Triton backend on a GPU: the same CPU leaves, moved there and back (differentiably), so the oracle,
    # the bounds and the gradients below stay on the CPU; under the interpreter everything is on the CPU
    dev = DEV if backend == "triton" else "cpu"
    kw = dict(split=split, block_size=L, stride=S, padding=padding, cu_seqlens=None if cu is None else cu.to(dev))
    y = BACKENDS[backend](*(None if t is None else t.to(dev) for t in (x, z, bias)), **kw).cpu()
    ref = oracle(x.detach(), z.detach(), None if bias is None else bias.detach(), split=split, L=L, S=S,
                 padding=padding, seqlens=seqlens)
    W = ref.shape[2]
    assert W > 0
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    bd = bounds(x, z, bias, dy, split=split, L=L, S=S, padding=padding, seqlens=seqlens, dtype=dtype)
    # the interpreter truncates float32 -> bfloat16 (tests/test_interpreter_defects.py): one ulp = 2 u_o
    rnd = 2.0 if backend == "triton" and INTERPRET and dtype == torch.bfloat16 else 1.0
    check("y", y, ref, bd["y"], dtype, rnd)
    inputs = [t for t in (x, z, bias) if t is not None]
    got = torch.autograd.grad(y, inputs, dy)
    x64, z64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (x, z, bias))
    ref_y = oracle(x64, z64, b64, split=split, L=L, S=S, padding=padding, seqlens=seqlens)
    exact = torch.autograd.grad(ref_y, [t for t in (x64, z64, b64) if t is not None], dy.double())
    for name, g, e in zip(("x", "z", "bias"), got, exact):
        check(f"d{name}", g, e, bd[name], dtype, rnd)
    if transposed and backend == "triton":   # its gradients keep the (B, T, H, D) layout of their inputs
        assert got[0].stride() == x.stride() and got[1].stride() == z.stride()
    return y, got


# both paddings x split x (S < L, S = L) x fixed/packed; bias and layout vary with the index
GRID = [dict(padding=p, split=sp, L=L, S=S, packed=pk, groups=(None, 1, 4)[i % 3], transposed=i % 2 == 0)
        for i, (p, sp, (L, S), pk) in enumerate(
            (p, sp, ls, pk) for p in ("valid", "left") for sp in (False, True) for ls in ((4, 2), (4, 4))
            for pk in (False, True))]
# three chunks (L = 3S, D_out = 4 of Dx = 12), and S = 1 (every position its own chunk), both paddings
GRID += [dict(padding="left", split=True, L=6, S=2, packed=True, groups=4, transposed=True, Dx=12),
         dict(padding="valid", split=True, L=6, S=2, packed=False, groups=1, transposed=False, Dx=12),
         dict(padding="left", split=False, L=3, S=1, packed=False, groups=4, transposed=True),
         dict(padding="valid", split=True, L=2, S=1, packed=True, groups=None, transposed=False)]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_torch_backend(case):
    run_case("torch", dtype=torch.float64, **case)
    run_case("torch", dtype=torch.float32, **case)


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_triton_backend_float32(case):
    run_case("triton", dtype=torch.float32, **case)


@pytest.mark.parametrize("case", GRID[::3], ids=_id)
def test_triton_backend_float64(case):
    run_case("triton", dtype=torch.float64, **case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_rounded_once(backend, dtype):
    """Half input: one rounding of each result (``strict``). A backward that
    read the rounded y would add u_o |y| |dy| to dz's terms and fail here."""
    run_case(backend, dtype=dtype, padding="left", split=True, L=4, S=2, packed=True, groups=1, transposed=True)


def test_triton_small_tiles():
    """Several window tiles, feature blocks and backward tiles (so dbias sums
    partials over tiles and over the heads of a group)."""
    with small_tiles():
        run_case("triton", dtype=torch.float32, padding="left", split=True, L=4, S=2, packed=False, groups=1,
                 transposed=True, Dx=20)
        run_case("triton", dtype=torch.float32, padding="valid", split=False, L=5, S=3, packed=True, groups=2,
                 transposed=False, Dx=12)


def fwd_config(bw, bj, bf, nw):
    return triton.Config({"BLOCK_W": bw, "BLOCK_J": bj, "BLOCK_F": bf}, num_warps=nw)


def forced(cfg, as_run=None):
    """only_config's pick: ``cfg`` (an entry of FWD_CONFIGS) where the prune
    keeps it; or ``as_run`` on every call (the interpreter's stand-in for a
    position block longer than its windows)."""
    if as_run is not None:
        return lambda kept: as_run

    def pick(kept):
        return next((c for c in kept if (c.kwargs["BLOCK_W"], c.kwargs["BLOCK_J"], c.kwargs["BLOCK_F"],
                                         c.num_warps) == cfg), None)
    return pick


@pytest.mark.parametrize("cfg", triton_impl.FWD_CONFIGS, ids=lambda c: "w{}-j{}-f{}-nw{}".format(*c))
def test_triton_forward_configs(cfg):
    """Every forward configuration the autotuner may pick (it times them and
    checks none), forward and gradients, at D_out = 128 (so the prune keeps
    every feature block): one position a step (BLOCK_J = 1) or position
    blocks, here two full blocks and a partial third (L = 2 BLOCK_J + 3),
    left pads, packed sequences, split chunks. On a GPU each configuration
    as compiled; in the interpreter position blocks of at most 8 (the
    tiles' semantics do not depend on their size; the backward's cost there
    grows with L)."""
    bw, bj, bf, nw = cfg
    L = 2 * bj + 3
    as_run = None
    if INTERPRET and bj > 8:
        as_run, L = fwd_config(bw, 8, bf, nw), 2 * 8 + 3
    with only_config(triton_impl._FWD, forced(cfg, as_run)) as runs:
        run_case("triton", dtype=torch.float32, padding="left", split=False, L=L, S=3, packed=True, groups=1,
                 transposed=True, Dx=128, H=2, lengths=[3, L + 4, 2 * L])
        run_case("triton", dtype=torch.float32, padding="valid", split=False, L=L, S=L, packed=False, groups=2,
                 transposed=False, Dx=128, H=2, lengths=2 * L + 5)
        run_case("triton", dtype=torch.float32, padding="left", split=True, L=L - 1, S=(L - 1) // 2, packed=True,
                 groups=1, transposed=True, Dx=256, H=2, lengths=[3, L + 4, 2 * L])
    assert len(runs) >= 3, f"{cfg} ran {len(runs)} times: the prune dropped it"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's 0/0 below
@pytest.mark.parametrize("cfg", [(4, 1, 16, 4), (4, 4, 16, 4)], ids=["one-position", "blocks-of-4"])
def test_triton_infinite_scores(cfg):
    """Scores of -inf weigh nothing, one position a step or in blocks (the
    block's maximum skips them; a block of nothing but -inf leaves the state
    as it is); a window whose scores are all -inf for a feature gives NaN
    there (0/0), and so does a +inf score (inf - inf), as the reference and
    torch's softmax do, whichever configuration the autotuner picks;
    everything else matches the torch backend."""
    L, S = 8, 8
    x, z, _ = make(B=1, H=1, T=24, Dx=4, L=L, Do=4, groups=None, transposed=False, dtype=torch.float32)
    x, z = x.detach(), z.detach()
    z[0, 0, 0:5, 0] = -math.inf          # window 0, feature 0: the first block (and more) weigh nothing
    z[0, 0, 12:16, 1] = -math.inf        # window 1, feature 1: the second block of 4 weighs nothing
    z[0, 0, 16:24, 2] = -math.inf        # window 2, feature 2: every score -inf
    z[0, 0, 10, 3] = math.inf            # window 1, feature 3: a +inf score
    kw = dict(block_size=L, stride=S, padding="valid")
    dev = DEV
    with only_config(triton_impl._FWD, lambda kept: fwd_config(*cfg)) as runs:
        y = triton_impl.gated_pool(x.to(dev), z.to(dev), **kw).cpu()
    assert len(runs) == 1
    ref = torch_impl.gated_pool(x, z, **kw)
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[0, 0, 2, 2] = finite[0, 0, 1, 3] = False
    assert y[~finite].isnan().all() and ref[~finite].isnan().all()
    assert y[finite].isfinite().all()
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_stays_in_its_sequence(backend):
    """A NaN in the first token of a packed batch reaches neither the output
    nor the x / z gradients of the next sequence, whose left pads must read
    nothing (the torch path gathers a pad from token 0, then masks it)."""
    L, S = 6, 2
    x, z, bias = make(B=1, H=2, T=12, Dx=4, L=L, Do=4, groups=1, transposed=False, dtype=torch.float32)
    with torch.no_grad():
        x[0, 0, 0, 1] = float("nan")
        z[0, 1, 0, 2] = float("nan")
    dev = DEV if backend == "triton" else "cpu"
    x, z, bias = leaves_on(dev, x, z, bias)
    cu = torch.tensor([0, 5, 12], device=dev)
    y = BACKENDS[backend](x, z, bias, block_size=L, stride=S, padding="left", cu_seqlens=cu)
    assert y.shape[2] == 5                                 # 2 windows of sequence 0, then 3 of sequence 1
    assert y[:, :, :2].isnan().any() and not y[:, :, 2:].isnan().any()
    dy = torch.zeros_like(y)
    dy[:, :, 2:] = 1.0
    dx, dz = torch.autograd.grad(y, (x, z), dy)
    assert dx[:, :, 5:].isfinite().all() and dz[:, :, 5:].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_empty_output(backend, packed):
    """No window (every sequence shorter than a window): (B, H, 0, D_out), zero gradients."""
    L, S = 8, 4
    T = 7 if not packed else 9
    x, z, bias = make(B=1, H=2, T=T, Dx=4, L=L, Do=2, groups=2, transposed=True, dtype=torch.float32)
    cu = torch.tensor([0, 5, 5, 9]) if packed else None
    y = BACKENDS[backend](x, z, bias, split=True, block_size=L, stride=S, padding="valid", cu_seqlens=cu)
    assert y.shape == (1, 2, 0, 2) and y.dtype == torch.float32
    g = torch.autograd.grad(y.sum(), (x, z, bias))
    for t, ref in zip(g, (x, z, bias)):
        assert t.shape == ref.shape and (t == 0).all()


def test_triton_backward_deterministic():
    """Same inputs, same bits (gathered dx/dz, fixed-order dbias sums: no atomics)."""
    kw = dict(padding="left", split=False, L=4, S=2, packed=True, groups=1, transposed=True, dtype=torch.float32)
    y1, g1 = run_case("triton", **kw)
    y2, g2 = run_case("triton", **kw)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def _op_args(*, need_stats, dtype=torch.float32):
    x, z, bias = leaves_on(DEV, *make(B=1, H=2, T=11, Dx=4, L=4, Do=2, groups=1, transposed=True, dtype=dtype))
    cu = torch.tensor([0, 3, 11], dtype=torch.int64, device=DEV)
    return (x, z, bias, cu, 4, 2, "left", True, -1, need_stats)


def test_custom_op_matches_eager():
    """The torch.library op (what torch.compile and export see), with its
    registered autograd, gives the eager autograd.Function's bits; a backward
    without stored statistics (lse empty) recomputes them, same bits."""
    args = _op_args(need_stats=True)
    x, z, bias, cu = args[:4]
    y, lse, ya = torch.ops.kvcompress.gated_pool_triton(*args)
    assert lse.shape == y.shape and lse.dtype == torch.float32 and ya.numel() == 0
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, z, bias), dy)
    fn = triton_impl._gated_pool.function
    assert fn.__name__ == "_GatedPoolFn"
    y_e = fn.apply(*args)[0]
    assert torch.equal(y, y_e)
    want = torch.autograd.grad(y_e, (x, z, bias), dy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    empty = x.new_empty(0)
    again = torch.ops.kvcompress.gated_pool_triton_bwd(dy, y, empty, empty, x, z, bias, cu, 4, 2, "left", True,
                                                       True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(again, want))


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT
    dispatch of the custom ops (torch.library.opcheck)."""
    torch.library.opcheck(torch.ops.kvcompress.gated_pool_triton.default, _op_args(need_stats=True))
    torch.library.opcheck(torch.ops.kvcompress.gated_pool_triton.default, _op_args(need_stats=False),
                          test_utils=("test_schema", "test_faketensor"))
    x, z, bias, cu = _op_args(need_stats=True)[:4]
    y, lse, ya = torch.ops.kvcompress.gated_pool_triton(*_op_args(need_stats=True))
    torch.library.opcheck(torch.ops.kvcompress.gated_pool_triton_bwd.default,
                          (torch.randn_like(y), y.detach(), lse, ya, x.detach(), z.detach(), bias.detach(), cu,
                           4, 2, "left", True, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
