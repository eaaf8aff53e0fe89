"""The "gemm" backend of mlp (kvcompress/ops/mlp/gemm_impl.py): fixed
configurations against the float64 torch backend, its gradients, NaN
locality, its domain (the registry's supports predicate) and what it keeps
for backward.

``suite_mlp`` is the backend as the property suite sees it through
``--impl``, with the backend's declared domain::

    python -m pytest kvcompress/testing/properties --impl mlp=tests.test_mlp_gemm:suite_mlp -n 2
"""

from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch

import kvcompress.functional as kf
from kvcompress import backends as kb
from kvcompress.ops.mlp import gemm_impl
from kvcompress.testing.domain import declare_domain
from tests.test_torch_backend import _saved_bytes

suite_mlp = declare_domain(**gemm_impl.DOMAIN)(functools.partial(kf.mlp, backend="gemm"))

NAMES = ("x", "w1", "b1", "w2", "b2", "pe")


def _inputs(B, H, G, T, D, L, F, DO, *, pe=True, bias=True, layout="contiguous", seed=0):
    """x (B, H, T, D) in the given layout and the parameters, float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).transpose(1, 2) if layout == "bthd" \
        else torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    t = {"x": x,
         "w1": torch.randn(G, L * D, F, generator=g, dtype=torch.float64) / (L * D) ** 0.5,
         "b1": torch.randn(G, F, generator=g, dtype=torch.float64) if bias else None,
         "w2": torch.randn(G, F, DO, generator=g, dtype=torch.float64) / F ** 0.5,
         "b2": torch.randn(G, DO, generator=g, dtype=torch.float64) if bias else None,
         "pe": torch.randn(H, L, D, generator=g, dtype=torch.float64) if pe else None}
    return t


def _call(t, backend, **kw):
    return kf.mlp(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], pe=t["pe"], backend=backend, **kw)


def _compare(t64, dtype, tol, *, grads=True, **kw):
    """The gemm backend in ``dtype`` against the torch backend in float64:
    output and every gradient, max |error| / max |exact| <= tol."""
    leaves = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in t64.items()}
    exact = {k: None if v is None else v.to(dtype).double().requires_grad_() for k, v in t64.items()}
    y = _call(leaves, "gemm", **kw)
    y64 = _call(exact, "torch", **kw)
    assert y.dtype == dtype and y.shape == y64.shape and y.is_contiguous()
    assert _rel(y, y64) <= tol, f"output: {_rel(y, y64)}"
    if not grads:
        return
    gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device, dtype)
    names = [k for k in NAMES if leaves[k] is not None]
    got = torch.autograd.grad(y, [leaves[k] for k in names], gy)
    want = torch.autograd.grad(y64, [exact[k] for k in names], gy.double())
    for k, a, b in zip(names, got, want):
        assert a.dtype == dtype and a.shape == leaves[k].shape, k
        assert _rel(a, b) <= tol, f"d/d{k}: {_rel(a, b)}"


def _rel(a, b):
    a, b = a.detach().double(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# B, H, G, T, D, L, S, F, D_out: per-head, shared and grouped (1 < G < H) weights, B > 1, T not a
# multiple of S, C = L / S of 1, 2 and 3
SHAPES = [(1, 4, 4, 64, 8, 4, 2, 16, 8), (2, 4, 2, 37, 5, 6, 3, 7, 3), (3, 3, 1, 21, 3, 4, 4, 5, 2),
          (2, 6, 3, 11, 4, 6, 2, 11, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}G{}T{}D{}L{}S{}F{}O{}".format(*s))
@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_values_and_gradients_match_float64(shape, padding, activation, dtype):
    B, H, G, T, D, L, S, F, DO = shape
    kw = dict(block_size=L, stride=S, padding=padding, activation=activation)
    # float32: float32 sums only; bfloat16: the inputs rounded, then the hidden layer and dpre rounded once
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for pe, bias, layout in [(True, True, "contiguous"), (False, False, "bthd"), (True, False, "bthd")]:
        _compare(_inputs(B, H, G, T, D, L, F, DO, pe=pe, bias=bias, layout=layout), dtype, tol, **kw)


@pytest.mark.parametrize("pe,bias,layout", [(True, True, "bthd"), (True, False, "contiguous"),
                                            (False, True, "contiguous")])
def test_half_operands_as_on_cuda(monkeypatch, pe, bias, layout):
    """CUDA's path on the CPU: bfloat16 GEMM operands and outputs
    (``_compute_dtype`` returns x's dtype, as on CUDA; this CPU's bfloat16
    GEMMs accumulate in float32), NSA-like proportions (L*D = 2048, S | L,
    per-head weights). Every gradient's RMS error relative to float64 stays
    at bfloat16's level (~3e-3): rounding x + pe before the first layer
    flips relu's derivative wherever the pre-activation is near 0 and made
    it ~3e-2 (found on an H200, run 52), which the max-relative check alone
    passes at small sizes."""
    monkeypatch.setattr(gemm_impl, "_compute_dtype", lambda x: x.dtype)
    B, H, G, T, D, L, S, F, DO = 1, 4, 4, 1024, 64, 32, 16, 256, 64
    t = _inputs(B, H, G, T, D, L, F, DO, pe=pe, bias=bias, layout=layout)
    kw = dict(block_size=L, stride=S, padding="left")
    _compare(t, torch.bfloat16, 3e-2, **kw)
    leaves = {k: None if v is None else v.to(torch.bfloat16).requires_grad_() for k, v in t.items()}
    exact = {k: None if v is None else v.to(torch.bfloat16).double().requires_grad_() for k, v in t.items()}
    y, y64 = _call(leaves, "gemm", **kw), _call(exact, "torch", **kw)
    gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(torch.bfloat16)
    names = [k for k in NAMES if leaves[k] is not None]
    for k, a, b in zip(names, torch.autograd.grad(y, [leaves[k] for k in names], gy),
                       torch.autograd.grad(y64, [exact[k] for k in names], gy.double())):
        rms = float((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
        assert rms <= 8e-3, f"d/d{k}: RMS relative error {rms:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the window kernel needs CUDA or Triton's interpreter")
@pytest.mark.parametrize("layout", ["contiguous", "bthd"])
@pytest.mark.parametrize("padding", ["valid", "left"])
def test_window_kernel_equals_the_torch_copies(monkeypatch, layout, padding):
    """The Triton window copy (CUDA's default; here in the interpreter, or
    natively on a GPU) gives the bit-identical output of the torch copies,
    per-head, grouped and shared weights, with and without pe, and is the
    path taken (one launch per group; the backward's chunk rows of a
    (B, T, H, D) x too), gradients included."""
    from kvcompress.ops.mlp import _window_copy
    monkeypatch.setattr(gemm_impl, "_compute_dtype", lambda x: x.dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    launches = []
    real = _window_copy.copy_windows
    monkeypatch.setattr(_window_copy, "copy_windows", lambda *a, **k: launches.append(1) or real(*a, **k))
    for (B, H, G, T, D, L, S, F, DO), pe in itertools.product(SHAPES, (True, False)):
        t = {k: None if v is None else v.to(dev, torch.bfloat16)
             for k, v in _inputs(B, H, G, T, D, L, F, DO, layout=layout, pe=pe).items()}
        kw = dict(block_size=L, stride=S, padding=padding)
        names = [k for k in NAMES if t[k] is not None]

        def run():
            leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in t.items()}
            y = _call(leaves, "gemm", **kw)
            return [y, *torch.autograd.grad(y, [leaves[k] for k in names], torch.ones_like(y))] \
                if y.numel() else [y]

        monkeypatch.setattr(gemm_impl, "WINDOW_KERNEL", "off")
        want = run()
        monkeypatch.setattr(gemm_impl, "WINDOW_KERNEL", "on")
        n = len(launches)
        got = run()
        for name, a, b in zip(["y", *names], got, want):
            if name == "w1" and pe and dev == "cuda":
                # finish_dw1's pe * cs + part may compile to one fused multiply-add, torch's to two roundings:
                # the same float32 sums to within their last bit, then rounded to bfloat16
                assert torch.allclose(a.float(), b.float(), rtol=2 ** -8, atol=0), (B, H, G, T, pe)
            else:
                assert torch.equal(a, b), (name, B, H, G, T, pe)
        # one launch per group in the forward; the backward copies a (B, T, H, D) x's chunk rows per group
        assert len(launches) - n == (0 if want[0].shape[2] == 0 else G * (2 if layout == "bthd" else 1))


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel needs CUDA or Triton's interpreter")
def test_rows_to_tokens_rounds_as_torch():
    """The backward's store of float32 sums into a (B, T, H, D) gradient
    rounds to nearest even as torch does, bit for bit (ties both ways, the
    largest floats to inf, inf, subnormals, -0.0), and NaN stays NaN (its
    payload may differ)."""
    from kvcompress.ops.mlp._window_copy import rows_to_tokens
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    special = [float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-40, -1e-41, -0.0, 1.00390625, 1.01171875,
               1.0078125, 1.00390626, -1.00390625]
    src = torch.cat([torch.tensor(special), torch.randn(60, generator=torch.Generator().manual_seed(0))])
    src = src.view(2 * 3, 12).to(dev)                                        # B * Hg * N rows of S * D = 3 * 4
    dst = torch.zeros(1, 10, 2, 4, dtype=torch.bfloat16, device=dev).transpose(1, 2)   # (B, Hg, T, D), bthd
    rows_to_tokens(src, dst, N=3, S=3)
    want = src.view(1, 2, 9, 4).to(torch.bfloat16)
    assert torch.equal(dst[:, :, :9].view(torch.int16), want.view(torch.int16))
    assert (dst[:, :, 9:] == 0).all()                                        # tokens past N * S untouched
    src[0, 0] = float("nan")
    rows_to_tokens(src, dst, N=3, S=3)
    assert torch.isnan(dst[0, 0, 0, 0])


def test_gradients_only_for_inputs_that_require_them():
    t = _inputs(2, 4, 2, 20, 3, 4, 6, 5)
    kw = dict(block_size=4, stride=2, padding="left", activation="gelu")
    for names in [("x",), ("w2",), ("b2",), ("pe",), ("w1", "b1")]:
        leaves = {k: None if v is None else v.float().requires_grad_(k in names) for k, v in t.items()}
        y = _call(leaves, "gemm", **kw)
        y.sum().backward()
        for k, v in leaves.items():
            assert (v.grad is not None) == (k in names), (names, k)
        ref = {k: None if v is None else v.clone().requires_grad_(k in names) for k, v in t.items()}
        _call(ref, "torch", **kw).sum().backward()
        for k in names:
            assert _rel(leaves[k].grad, ref[k].grad) <= 1e-5, k


def test_windows_read_only_their_tokens_and_short_inputs():
    """T shorter than a window: the empty output, attached to autograd; the
    trailing T mod S tokens no window reads get a zero gradient."""
    t = {k: None if v is None else v.float() for k, v in _inputs(2, 2, 1, 3, 4, 4, 5, 3).items()}
    y = _call(t, "gemm", block_size=4, stride=2)
    assert y.shape == (2, 2, 0, 3)
    t = {k: None if v is None else v.float().requires_grad_() for k, v in _inputs(1, 2, 2, 11, 3, 4, 5, 3).items()}
    y = _call(t, "gemm", block_size=4, stride=2, padding="left")            # W = 5: tokens 10 is read by none
    y.sum().backward()
    assert y.shape == (1, 2, 5, 3)
    assert (t["x"].grad[:, :, 10:] == 0).all() and (t["x"].grad[:, :, :10] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fewer_windows_than_left_pad_chunks(dtype):
    """padding "left" with W < C - 1 (L = 6, S = 1, T = 3: 5 pad chunks, 3
    windows): the chunks whose every source is a pad take no part at all.
    Found by the property suite."""
    for T in (1, 2, 3, 5):
        _compare(_inputs(2, 2, 1, T, 3, 6, 4, 2), dtype, 1e-5 if dtype == torch.float32 else 3e-2, block_size=6,
                 stride=1, padding="left", activation="silu")


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_stays_in_its_windows(activation, dtype):
    """A NaN token makes its windows' outputs NaN (relu included: NaN
    pre-activations stay NaN) and no other output."""
    t = {k: None if v is None else v.to(dtype) for k, v in _inputs(1, 2, 1, 24, 4, 4, 6, 3).items()}
    t["x"][0, 1, 9] = float("nan")
    y = _call(t, "gemm", block_size=4, stride=2, padding="valid", activation=activation)   # windows 3, 4 hold token 9
    nan = torch.isnan(y).any(-1)
    assert nan[0, 1, 3:5].all() and nan.sum() == 2


def test_nan_preactivation_of_a_weight_stays_nan():
    """A NaN in w1 reaches every window's pre-activation of its hidden unit:
    relu(NaN) must be NaN, not 0."""
    t = {k: None if v is None else v.float() for k, v in _inputs(1, 1, 1, 12, 2, 4, 3, 2, pe=False).items()}
    t["w1"][0, 0, 1] = float("nan")
    y = _call(t, "gemm", block_size=4, stride=4)
    assert torch.isnan(y).all()


def test_gradients_in_float32_against_float64_finite_differences_free_reference():
    """Larger shapes where the chunk GEMMs span several (b, head) pairs and
    both paddings: float32 gradients within float32 accumulation of the
    float64 ones (the gradcheck stand-in: float64 is not a dtype of this
    backend)."""
    for pad, act in itertools.product(("valid", "left"), ("relu", "gelu", "silu")):
        _compare(_inputs(2, 4, 2, 96, 16, 8, 24, 16, seed=3), torch.float32, 1e-5, block_size=8, stride=4,
                 padding=pad, activation=act)


# --------------------------------------------------------------------------- domain


def test_registration():
    b = kb.get("mlp", "gemm")
    assert b.devices == ("cpu", "cuda") and b.auto_devices == ("cuda",)
    assert set(b.dtypes) == {torch.bfloat16, torch.float32}
    assert b.precision == "io-intermediates" and not b.batch_invariant
    assert b.priority > kb.get("mlp", "torch").priority
    assert [x.name for x in kb.backends("mlp")].index("gemm") == 0
    x = torch.zeros(1, 2, 8, 4)
    w1, w2 = torch.zeros(2, 16, 3), torch.zeros(2, 3, 4)
    assert b.accepts(x, w1, None, w2, None, block_size=4, stride=2, padding="valid")
    assert not b.accepts_auto(x, w1, None, w2, None, block_size=4, stride=2, padding="valid")   # never auto on CPU


def _small(dtype=torch.float32):
    t = _inputs(1, 2, 2, 10, 3, 4, 5, 3)
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


@pytest.mark.parametrize("what", ["stride", "packed", "memory", "float16", "float64", "tf32"])
def test_unsupported_calls_are_declined(what, monkeypatch):
    """supports_call declines a stride not dividing block_size, packed
    input, a workspace that does not fit the device (``_fits``), float32 with
    reduced-precision float32 matmuls; the registry declines float16 and
    float64. backend="gemm" then raises ValueError before any work;
    backend="auto" takes another backend."""
    t = _small(torch.float16 if what == "float16" else torch.float64 if what == "float64" else torch.float32)
    kw = dict(block_size=4, stride=2)
    if what == "stride":
        kw["stride"] = 3
    elif what == "packed":
        kw["cu_seqlens"] = torch.tensor([0, 4, 10])
        t["x"] = t["x"][:1]
    elif what == "memory":
        asked = []
        monkeypatch.setattr(gemm_impl, "_fits", lambda device, need: asked.append(need()) and False)
    elif what == "tf32":
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    b = kb.get("mlp", "gemm")
    assert not b.accepts(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], pe=t["pe"], padding="valid", **kw)
    with pytest.raises(ValueError, match="backend 'gemm' does not support this call"):
        _call(t, "gemm", **kw)
    y = _call(t, "auto", **kw)          # another backend serves it
    assert y.shape[2] == kf.num_windows(10 if what != "packed" else 4, 4, kw["stride"]) or what == "packed"


def test_workspace_at_the_nsa_shape():
    """The workspace estimate at the NSA shape (bfloat16, B = 1, H = G = 4,
    T = 131072, D = 128, L = 32, S = 16, F = 4096; u = 2**27 hidden units):
    relu keeps the hidden layer (2u bytes = 256 MiB) plus the backward's
    per-group buffers, which outweigh one group's windows (64 MiB): the
    hidden layer's gradient (64 MiB), the float32 dx accumulator (4 * n, n
    = 8192 chunks of S * D = 2048 elements), a float32 (S*D, F) buffer (32
    MiB) and a copy of the group's tokens (2n); gelu's float32 path 12u."""
    x = torch.empty(1, 4, 131072, 128, dtype=torch.bfloat16, device="meta")
    w1 = torch.empty(4, 32 * 128, 4096, dtype=torch.bfloat16, device="meta")
    kw = dict(block_size=32, stride=16, padding="left")
    u, n = 4 * 8192 * 4096, 8192 * 2048
    assert gemm_impl.workspace_bytes(x, w1, **kw) == 2 * u + 2 * u // 4 + 4 * n + 4 * 2048 * 4096 + 2 * n
    assert gemm_impl.workspace_bytes(x, w1, **kw) == 448 << 20
    assert gemm_impl.workspace_bytes(x, w1, activation="gelu", **kw) == 12 * u
    assert gemm_impl.preactivation_bytes(x, w1, **kw) == 4 * u


def test_auto_prefers_gemm_from_the_flops_threshold():
    """prefer_call (backend="auto" only): one head group's first-layer
    FLOPs, 2 * B * (H / G) * W * L*D * F, against AUTO_MIN_GROUP_FLOPS
    (7e10): the record's T = 8192 calls (1.7e10 a group at D = 128, 3.9e10
    at D = 192) go to the fused kernel, D = 128, T = 65536 (1.4e11) and
    more to gemm; fewer groups for the same heads mean more FLOPs a group."""
    def call(B, H, G, T, D, L=32, S=16):
        x = torch.empty(B, H, T, D, dtype=torch.bfloat16, device="meta")
        w1 = torch.empty(G, L * D, L * D, dtype=torch.bfloat16, device="meta")
        w2 = torch.empty(G, L * D, D, dtype=torch.bfloat16, device="meta")
        kw = dict(block_size=L, stride=S, padding="left")
        return gemm_impl.group_flops(x, w1, **kw), gemm_impl.prefer_call(x, w1, None, w2, None, **kw)
    assert gemm_impl.AUTO_MIN_GROUP_FLOPS == 7e10
    assert call(1, 4, 4, 8192, 128) == (2 * 512 * 4096 * 4096, False)
    assert call(1, 4, 4, 8192, 192) == (2 * 512 * 6144 * 6144, False)
    assert call(1, 4, 4, 65536, 128) == (2 * 4096 * 4096 * 4096, True)
    assert call(1, 4, 4, 65536, 192)[1] is True
    assert call(2, 4, 4, 8192, 192)[1] is True and call(1, 4, 2, 8192, 192)[1] is True
    b = kb.get("mlp", "gemm")
    assert b.prefer is gemm_impl.prefer_call


def test_fit_rule(monkeypatch):
    """On CUDA a call is served when its workspace fits the allocator's free
    memory, declined when one byte more is needed; not asked during graph
    capture, nor on the CPU."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gemm_impl, "_free_bytes", lambda device: 1000)
    assert gemm_impl._fits(cuda, lambda: 1000)
    assert not gemm_impl._fits(cuda, lambda: 1001)
    assert gemm_impl._fits(torch.device("cpu"), lambda: 1 << 60)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gemm_impl._fits(cuda, lambda: 1 << 60)


def test_free_bytes_reads_the_allocators_counter(monkeypatch):
    """_free_bytes = the device's total memory - the allocator's current
    allocated bytes - CONTEXT_RESERVE, read from the nested statistics
    (nothing allocated: an empty dict before CUDA is initialised)."""
    cuda = torch.device("cuda")
    props = type("Props", (), {"total_memory": 10 << 30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict",
                        lambda device: {"allocated_bytes": {"all": {"current": 123, "peak": 999}, "large_pool": {}}})
    assert gemm_impl._free_bytes(cuda) == (10 << 30) - 123 - gemm_impl.CONTEXT_RESERVE
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device: {})
    assert gemm_impl._free_bytes(cuda) == (10 << 30) - gemm_impl.CONTEXT_RESERVE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_free_bytes_agrees_with_memory_allocated():
    """On a CUDA device the nested counter is torch.cuda.memory_allocated's."""
    keep = torch.empty(3 << 20, device="cuda")
    dev = keep.device
    total = torch.cuda.get_device_properties(dev).total_memory
    assert gemm_impl._free_bytes(dev) == total - torch.cuda.memory_allocated(dev) - gemm_impl.CONTEXT_RESERVE


def test_declined_while_torch_compile_traces():
    """Under torch.compile the predicate declines every call, so backend="auto"
    keeps the Triton backend's custom op there: gemm's in-place float32
    GEMMs (out_dtype with out=) fail in fake-tensor tracing (H200 run 46,
    ``decode_step`` compiled with fullgraph=True on mlp)."""
    t = _small()
    kw = dict(block_size=4, stride=2, padding="valid")
    args = (t["w1"], t["b1"], t["w2"], t["b2"])
    assert gemm_impl.supports_call(t["x"], *args, **kw)

    def f(x):
        return x + 1 if gemm_impl.supports_call(x, *args, **kw) else x - 1

    got = torch.compile(f, backend="eager", fullgraph=True)(t["x"])
    assert torch.equal(got, t["x"] - 1)


def test_direct_calls_outside_the_domain_raise():
    t = _small()
    with pytest.raises(ValueError, match="stride must divide block_size"):
        gemm_impl.mlp(t["x"], t["w1"], None, t["w2"], None, block_size=4, stride=3)
    with pytest.raises(ValueError, match="cu_seqlens must be None"):
        gemm_impl.mlp(t["x"][:1], t["w1"], None, t["w2"], None, block_size=4, stride=2,
                      cu_seqlens=torch.tensor([0, 10]))


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("layout", ["contiguous", "bthd"])
def test_saves_x_weights_and_the_preactivation_only(layout):
    """For backward: x (no unfolded copy; a (B, T, H, D) layout copied once),
    the parameters and the float32 pre-activation (G, B, Hg, W, F)."""
    B, H, G, T, D, L, S, F, DO = 2, 4, 2, 256, 8, 16, 1, 24, 8       # L / S = 16: an unfold would be 16 x
    t = {k: None if v is None else v.float().requires_grad_()
         for k, v in _inputs(B, H, G, T, D, L, F, DO, layout=layout).items()}
    saved = _saved_bytes(lambda: _call(t, "gemm", block_size=L, stride=S, padding="left"))
    W = T // S
    params = sum(v.numel() * 4 for k, v in t.items() if k != "x")
    x_bytes = t["x"].numel() * 4 * (2 if layout == "bthd" else 1)
    assert saved <= x_bytes + params + B * H * W * F * 4


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_cuda_values_gradients_nan_and_flag(activation):
    """On CUDA (cuBLAS's bias epilogue, half outputs): bfloat16 output and
    every gradient within the bfloat16 class of the float64 torch backend,
    per-head, grouped and shared weights, both layouts; a NaN token stays in
    its windows (cuBLAS's epilogue does not turn relu(NaN) into 0); torch's
    allow_bf16_reduced_precision_reduction is as the caller left it."""
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    for shape, layout in [((1, 4, 4, 512, 64, 32, 16, 256, 64), "bthd"), ((2, 4, 2, 300, 32, 8, 4, 96, 32),
                                                                        "contiguous"),
                          ((2, 2, 1, 64, 16, 4, 4, 24, 16), "bthd")]:
        B, H, G, T, D, L, S, F, DO = shape
        t = {k: None if v is None else v.cuda() for k, v in _inputs(B, H, G, T, D, L, F, DO, layout=layout).items()}
        _compare(t, torch.bfloat16, 3e-2, block_size=L, stride=S, padding="left", activation=activation)
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction == flag
    t = {k: None if v is None else v.to("cuda", torch.bfloat16) for k, v in _inputs(1, 2, 1, 24, 4, 4, 6, 3).items()}
    t["x"][0, 1, 9] = float("nan")
    y = _call(t, "gemm", block_size=4, stride=2, padding="valid", activation=activation)
    nan = torch.isnan(y).any(-1)
    assert nan[0, 1, 3:5].all() and nan.sum() == 2
    t["x"][0, 1, 9] = 0
    t["w1"][0, 0, 1] = float("nan")
    assert torch.isnan(_call(t, "gemm", block_size=4, stride=2, padding="valid", activation=activation)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_within_the_workspace_estimate():
    """relu, bfloat16, a (B, T, H, D) x: the forward + backward's peak memory
    beyond inputs, output, gradients and dy stays within workspace_bytes
    (plus 64 MiB for cuBLAS's workspace and the allocator's rounding)."""
    B, H, T, D, L, S = 1, 4, 16384, 128, 32, 16
    F = L * D
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    w1 = (torch.randn(H, L * D, F, device="cuda", generator=g) / (L * D) ** 0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(H, F, D, device="cuda", generator=g) / F ** 0.5).to(torch.bfloat16).requires_grad_()
    b1 = torch.zeros(H, F, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b2 = torch.zeros(H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pe = torch.randn(H, L, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    kw = dict(block_size=L, stride=S, padding="left", pe=pe)
    W = kf.num_windows(T, L, S, "left")
    gy = torch.randn(B, H, W, D, device="cuda", generator=g).to(torch.bfloat16)
    kf.mlp(x, w1, b1, w2, b2, backend="gemm", **kw).backward(gy)              # warm-up: cuBLAS handles, workspaces
    for p in (x, w1, b1, w2, b2, pe):
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kf.mlp(x, w1, b1, w2, b2, backend="gemm", **kw).backward(gy)
    grads = sum(p.numel() * p.element_size() for p in (x, w1, b1, w2, b2, pe))
    extra = torch.cuda.max_memory_allocated() - base - grads - gy.numel() * 2
    assert extra <= gemm_impl.workspace_bytes(x, w1, block_size=L, stride=S, padding="left") + (64 << 20), extra


# --------------------------------------------------------------------------- memory="lean"


def test_memory_argument():
    """kvcompress.functional.mlp(memory=...): "auto" or "lean" (TypeError for
    a non-str, ValueError for another str, before any backend runs);
    "lean" with a backend that stores the hidden layer (gemm, torch) raises
    ValueError naming memory; with no lean backend for the device (the CPU:
    the Triton backend is picked automatically on CUDA only) it raises
    ValueError naming memory; a lean backend named explicitly (Triton, here
    in its interpreter) runs and gives what it gives without memory."""
    t = _small()
    kw = dict(block_size=4, stride=2)
    with pytest.raises(TypeError, match="memory must be a str"):
        _call(t, "auto", memory=1, **kw)
    with pytest.raises(ValueError, match=r"memory must be one of \('auto', 'lean'\)"):
        _call(t, "auto", memory="small", **kw)
    for name in ("gemm", "torch"):
        assert not kb.get("mlp", name).lean
        with pytest.raises(ValueError, match=f"memory='lean', but backend '{name}' stores the hidden layer"):
            _call(t, name, memory="lean", **kw)
    with pytest.raises(ValueError, match="memory='lean': no registered backend"):
        _call(t, "auto", memory="lean", **kw)
    assert torch.equal(_call(t, "auto", memory="auto", **kw), _call(t, "auto", **kw))
    triton = kb.get("mlp", "triton")
    assert triton.lean
    if os.environ.get("TRITON_INTERPRET") == "1":     # the suite's CPU sessions (conftest sets it without CUDA)
        assert triton.accepts(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], pe=t["pe"], padding="valid", **kw)
        assert torch.equal(_call(t, "triton", memory="lean", **kw), _call(t, "triton", **kw))


def test_grouped_mlp_memory():
    from kvcompress.modules import GroupedMLP
    with pytest.raises(ValueError, match="GroupedMLP: memory must be one of"):
        GroupedMLP(8, 4, 2, memory="none")
    with pytest.raises(TypeError, match="GroupedMLP: memory must be a str"):
        GroupedMLP(8, 4, 2, memory=None)
    m = GroupedMLP(8, 4, 2, memory="lean")
    with pytest.raises(ValueError, match="memory='lean'"):          # the CPU has no lean backend
        m(torch.randn(1, 2, 3, 4, 8))
