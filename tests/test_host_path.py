"""The host path's caches change no behaviour (issue 14, item 2): the
validation fast path of ``kvcompress.functional`` (``_VALID``), the
registry's sorted backends, the fixed-length plans. Behaviour only: the
host time is measured by scripts/host_overhead.py, never here."""

from __future__ import annotations

import pytest
import torch

import kvcompress.functional as kf
from kvcompress import backends as kb
from kvcompress.ops._triton import plan as tplan
from kvcompress.testing.impls import arm_tripwire


@pytest.fixture
def clean_cache():
    """An empty validation cache before and after the test."""
    kf._VALID.clear()
    yield kf._VALID
    kf._VALID.clear()


def _linear_args(*, dtype=torch.float32, B=1, H=2, T=9, D=3, L=4, DO=5):
    x = torch.randn(B, H, T, D, dtype=dtype)
    w = torch.randn(H, L, D, DO, dtype=dtype)
    b = torch.randn(H, DO, dtype=dtype)
    pe = torch.randn(H, L, D, dtype=dtype)
    return x, w, b, pe


def test_a_valid_call_is_cached_and_gives_the_same_result(clean_cache):
    x, w, b, pe = _linear_args()
    y0 = kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    assert len(clean_cache) == 1
    y1 = kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    assert len(clean_cache) == 1
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)


BAD = [
    # (what, mutate(x, w, b, pe) -> (x, w, b, pe), exception, message): each shares every shape with the good call
    ("weight dtype", lambda x, w, b, pe: (x, w.double(), b, pe), TypeError, "weight must have x's dtype"),
    ("bias dtype", lambda x, w, b, pe: (x, w, b.half(), pe), TypeError, "bias must have x's dtype"),
    ("pe dtype", lambda x, w, b, pe: (x, w, b, pe.double()), TypeError, "pe must have x's dtype"),
    ("x dtype", lambda x, w, b, pe: (x.long(), w, b, pe), TypeError, "x must have a dtype in"),
    ("weight device", lambda x, w, b, pe: (x, w.to("meta"), b, pe), ValueError, "weight must be on x's device"),
    ("pe device", lambda x, w, b, pe: (x, w, b, pe.to("meta")), ValueError, "pe must be on x's device"),
    ("weight not a tensor", lambda x, w, b, pe: (x, w.numpy(), b, pe), TypeError, "weight must be a torch.Tensor"),
    ("bias not a tensor", lambda x, w, b, pe: (x, w, b.tolist(), pe), TypeError, "bias must be a torch.Tensor"),
]


@pytest.mark.parametrize("what, mutate, exc, match", BAD, ids=[c[0] for c in BAD])
def test_a_bad_call_after_a_good_one_of_the_same_shapes_raises(clean_cache, monkeypatch, what, mutate, exc, match):
    """The cached good call does not let a bad property through, and the
    error still comes before any backend runs."""
    x, w, b, pe = _linear_args()
    kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    arm_tripwire(monkeypatch)
    x2, w2, b2, pe2 = mutate(x, w, b, pe)
    with pytest.raises(exc, match=match):
        kf.linear(x2, w2, b2, block_size=4, stride=2, pe=pe2, backend="torch")


@pytest.mark.parametrize("bad, exc, match", [
    (dict(block_size=4.0), TypeError, "block_size must be an int"),
    (dict(block_size=True), TypeError, "block_size must be an int"),
    (dict(stride=2.0), TypeError, "stride must be an int"),
    (dict(stride=True), TypeError, "stride must be an int"),
    (dict(padding="same"), ValueError, "padding must be one of"),
])
def test_scalars_equal_to_a_cached_call_still_raise(clean_cache, bad, exc, match):
    """4.0 == 4 and True == 1 in a dict key: the fast path takes exact ints only."""
    x = torch.randn(1, 2, 9, 3)
    kf.mean_pool(x, block_size=4, stride=2, backend="torch")
    kf.mean_pool(x, block_size=1, stride=1, backend="torch")
    kw = dict(block_size=4, stride=2) if "block_size" not in bad or bad["block_size"] is not True else {"stride": 1}
    kw.update(bad)
    with pytest.raises(exc, match=match):
        kf.mean_pool(x, **kw, backend="torch")


def test_requires_grad_and_grad_mode_take_effect_on_a_cached_call(clean_cache):
    x, w, b, pe = _linear_args()
    y = kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    assert not y.requires_grad
    w.requires_grad_(True)
    y = kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    assert y.requires_grad
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    with torch.no_grad():
        assert not kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch").requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calls_differing_in_strides_or_dtype_both_validate(clean_cache, dtype):
    """A transposed x (other strides) and another dtype each give the torch
    backend's own answer, and a mismatch of the two still raises."""
    x, w, b, pe = _linear_args(dtype=dtype)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)          # same values, (B, T, H, D) strides
    assert xt.stride() != x.stride()
    y = kf.linear(x, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    yt = kf.linear(xt, w, b, block_size=4, stride=2, pe=pe, backend="torch")
    torch.testing.assert_close(y, yt, rtol=0, atol=0)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    with pytest.raises(TypeError, match="pe must have x's dtype"):     # pe is checked before the parameters
        kf.linear(x.to(other), w, b, block_size=4, stride=2, pe=pe, backend="torch")


def test_the_cache_is_bounded(clean_cache):
    x = torch.randn(1, 1, 8, 2)
    for T in range(1, 3 * kf._VALID_MAX):
        kf.mean_pool(x[:, :, : T % 8 + 1], block_size=T % 7 + 1, stride=1, backend="torch")
        kf.mean_pool(torch.randn(1, 1, T, 1), block_size=1, stride=1, backend="torch")
        assert len(clean_cache) <= kf._VALID_MAX


def test_cu_seqlens_values_are_checked_on_every_call(clean_cache, monkeypatch):
    """cu_seqlens' values are read on the host (the CPU always reads them):
    a cached key never vouches for them."""
    x = torch.randn(1, 2, 9, 3)
    good = torch.tensor([0, 4, 9], dtype=torch.int32)
    y = kf.mean_pool(x, block_size=2, stride=2, cu_seqlens=good, backend="torch")
    assert y.shape[2] == 2 + 2
    assert len(clean_cache) == 1
    # the same shapes, dtype and device: only the values differ
    for bad in (torch.tensor([0, 6, 4], dtype=torch.int32), torch.tensor([1, 4, 9], dtype=torch.int32),
                torch.tensor([0, 4, 8], dtype=torch.int32)):
        arm_tripwire(monkeypatch)
        with pytest.raises(ValueError, match="non-decreasing from 0 to T=9"):
            kf.mean_pool(x, block_size=2, stride=2, cu_seqlens=bad, backend="torch")
        monkeypatch.undo()
    # other valid values, other window counts
    y = kf.mean_pool(x, block_size=2, stride=2, cu_seqlens=torch.tensor([0, 1, 9], dtype=torch.int32),
                     backend="torch")
    assert y.shape[2] == 0 + 4
    # total_windows is compared with the values' count on every call
    x10 = torch.randn(1, 2, 10, 3)
    kf.mean_pool(x10, block_size=2, stride=2, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
                 total_windows=5, backend="torch")
    with pytest.raises(ValueError, match="total_windows=5, but cu_seqlens gives 4 windows"):
        kf.mean_pool(x10, block_size=2, stride=2, cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32),
                     total_windows=5, backend="torch")


def test_cu_seqlens_values_are_read_again_on_a_hit(clean_cache, monkeypatch):
    reads = []
    real = kf.check_cu_seqlens_values

    def counting(*a):
        reads.append(1)
        return real(*a)
    monkeypatch.setattr(kf, "check_cu_seqlens_values", counting)
    x = torch.randn(1, 2, 9, 3)
    cu = torch.tensor([0, 4, 9], dtype=torch.int64)
    for _ in range(3):
        kf.mean_pool(x, block_size=2, stride=2, cu_seqlens=cu, backend="torch")
    assert len(reads) == 3


def test_no_windows_from_a_cached_key(clean_cache):
    """W comes from the cache only where shapes fix it: T < L gives the empty output each time."""
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    for _ in range(2):
        y = kf.mean_pool(x, block_size=4, stride=2, backend="torch")
        assert y.shape == (1, 2, 0, 3)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_a_tensor_subclass_takes_the_slow_path(clean_cache):
    class Sub(torch.Tensor):
        pass
    x = torch.randn(1, 2, 9, 3).as_subclass(Sub)
    kf.mean_pool(x, block_size=4, stride=2, backend="torch")
    assert len(clean_cache) == 0


def test_the_backend_order_follows_the_registry(monkeypatch):
    """The sorted list is cached per state of the registry: an entry replaced
    without ``register`` (as the tripwire does) is what a look-up returns."""
    import dataclasses
    first = kb.backends("mean_pool")
    assert [b.priority for b in first] == sorted((b.priority for b in first), reverse=True)
    b0 = first[-1]
    moved = dataclasses.replace(b0, priority=max(b.priority for b in first) + 1)
    monkeypatch.setitem(kb._REGISTRY["mean_pool"], b0.name, moved)
    assert kb.backends("mean_pool")[0] is moved
    assert kb.get("mean_pool", b0.name) is moved
    monkeypatch.undo()
    assert kb.backends("mean_pool") == first
    assert kb.get("mean_pool", b0.name) is b0
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        kb.get("mean_pool", "no-such-backend")


def test_prefer_is_asked_by_auto_only(monkeypatch):
    """A backend's ``prefer`` predicate passes a call it declines on to the
    next backend in priority order under backend="auto" (and the decode
    path's resolution, which asks the same ``accepts_auto``); named outright,
    the backend runs whatever ``prefer`` says."""
    calls = []

    def spy(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
        calls.append(x.shape[2])
        return kf.mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe,
                            cu_seqlens=cu_seqlens, backend="torch")

    top = max(b.priority for b in kb.backends("mean_pool")) + 1
    entry = kb.Backend("mean_pool", "spy", spy, ("cpu",), (torch.float32,), top,
                       prefer=lambda x, *args, **kwargs: x.shape[2] >= 16)
    monkeypatch.setitem(kb._REGISTRY["mean_pool"], "spy", entry)
    small, large = torch.randn(1, 2, 9, 3), torch.randn(1, 2, 16, 3)
    assert entry.accepts(small, block_size=4, stride=2) and not entry.accepts_auto(small, block_size=4, stride=2)
    assert entry.accepts_auto(large, block_size=4, stride=2)
    want = kf.mean_pool(small, block_size=4, stride=2, backend="torch")
    assert torch.equal(kf.mean_pool(small, block_size=4, stride=2), want) and calls == []    # passed on
    kf.mean_pool(large, block_size=4, stride=2)
    assert calls == [16]
    from kvcompress import decode
    assert decode._resolve("mean_pool", "auto", small, (), dict(block_size=4, stride=2)).name != "spy"
    assert decode._resolve("mean_pool", "auto", large, (), dict(block_size=4, stride=2)) is entry
    assert torch.equal(kf.mean_pool(small, block_size=4, stride=2, backend="spy"), want) and calls == [16, 9]


def test_fixed_plans_are_cached_by_shape_and_keep_their_tensors():
    x = torch.randn(1, 2, 9, 3)
    p1 = tplan.seq_plan(x, block_size=4, stride=2, padding="left", cu_seqlens=None)
    x2 = torch.randn(1, 2, 9, 3)
    p2 = tplan.seq_plan(x2, block_size=4, stride=2, padding="left", cu_seqlens=None)
    assert p1.cu is x and p2.cu is x2            # the placeholders are the call's own x
    assert (p1.W, p1.NQ, p1.PRE, p1.C) == (p2.W, p2.NQ, p2.PRE, p2.C) == (9 // 2, 6, 2, 2)
    assert p2.seq_kwargs()["cu"] is x2 and p2.seq_kwargs() is not p2.seq_kwargs()
    p3 = tplan.seq_plan(x, block_size=4, stride=2, padding="valid", cu_seqlens=None)
    assert p3.W == (9 - 4) // 2 + 1 and p3.PRE == 0
    for T in range(600):
        tplan.seq_plan(torch.empty(1, 1, T, 1), block_size=1, stride=1, padding="valid", cu_seqlens=None)
    assert len(tplan._FIXED) <= 256


# --------------------------------------------------------------------------- the Triton wrappers' launch caches


def _triton_caches():
    """Every launch cache of the Triton wrappers: the pooling kinds', gated_pool's, linear's, mlp's and
    attention_pool's."""
    from kvcompress.ops import _triton_pool as tpool
    from kvcompress.ops.attention_pool import triton_impl as attention
    from kvcompress.ops.gated_pool import triton_impl as gated
    from kvcompress.ops.linear import triton_impl as linear
    from kvcompress.ops.mlp import triton_impl as mlp
    return (tpool._FWD_LAUNCH, tpool._BWD_LAUNCH, gated._FWD_LAUNCH, gated._BWD_LAUNCH, mlp._FWD_LAUNCH,
            mlp._DP_LAUNCH, linear._FWD_LAUNCH, linear._BWD_LAUNCH, linear._DW_LAUNCH, linear._DX_LAUNCH,
            attention._FWD_LAUNCH, attention._BWD_LAUNCH)


# (dtype, layout, T, pe, packed): each differs from the first in one property a launch's integers depend on
LAUNCH_VARIANTS = [(torch.float32, "bhtd", 9, True, False), (torch.bfloat16, "bhtd", 9, True, False),
                   (torch.float32, "bthd", 9, True, False), (torch.float32, "bhtd", 11, True, False),
                   (torch.float32, "bhtd", 9, False, False), (torch.float32, "bhtd", 9, True, True)]


def _launch_inputs(kind, dtype, layout, T, use_pe, packed):
    """(x, the kind's parameters, keywords, generator) of one small Triton call (H = 2, D = L = 4, S = 2,
    left padding); the generator then draws the cotangent."""
    g = torch.Generator().manual_seed(T)
    H, D, L = 2, 4, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    x = rnd(1, T, H, D).transpose(1, 2) if layout == "bthd" else rnd(1, H, T, D)
    params = {"mean_pool": lambda: [], "weighted_pool": lambda: [rnd(1, L)],
              "gated_pool": lambda: [rnd(1, H, T, D), rnd(H, L, D)],
              "linear": lambda: [rnd(H, L, D, 3) / 4, rnd(H, 3)],
              "attention_pool": lambda: [rnd(1, D, D) / 2],
              "mlp": lambda: [rnd(H, L * D, 6) / 4, rnd(H, 6), rnd(H, 6, 3) / 2, rnd(H, 3)]}[kind]()
    kw = dict(block_size=L, stride=2, padding="left", cu_seqlens=torch.tensor([0, 3, T]) if packed else None,
              backend="triton")
    if use_pe and kind != "gated_pool":
        kw["pe"] = rnd(H, L, D)
    return x, params, kw, g


def _launch_call(kind, dtype, layout, T, use_pe, packed):
    """Output and every gradient of one small Triton call (real launches on the interpreter)."""
    x, params, kw, g = _launch_inputs(kind, dtype, layout, T, use_pe, packed)
    leaves = [t.requires_grad_(True) for t in (x, *params, kw.get("pe")) if t is not None]
    y = getattr(kf, kind)(x, *params, **kw)
    y.backward(torch.randn(y.shape, generator=g).to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("kind", ["mean_pool", "weighted_pool", "gated_pool", "linear", "mlp", "attention_pool"])
def test_launch_caches_key_on_dtype_strides_shape_and_options(kind):
    """Each launch's integer arguments, grid and constexprs are built once
    per key: calls differing only in dtype, strides, length, pe or packing
    give the bits of the same call run with empty caches, and calling them
    all again adds no entry."""
    caches = _triton_caches()
    cold = []
    for v in LAUNCH_VARIANTS:
        for c in caches:
            c.clear()
        cold.append(_launch_call(kind, *v))
    for c in caches:
        c.clear()

    def check(i):
        got = _launch_call(kind, *LAUNCH_VARIANTS[i])
        assert len(got) == len(cold[i])
        for a, b in zip(got, cold[i]):
            assert torch.equal(a, b) and a.stride() == b.stride(), f"{kind}, {LAUNCH_VARIANTS[i]}"
    for i in range(len(LAUNCH_VARIANTS)):
        check(i)
    sizes = [len(c) for c in caches]
    assert sum(sizes) > 0
    for i in reversed(range(len(LAUNCH_VARIANTS))):
        check(i)
    assert [len(c) for c in caches] == sizes


def test_launch_caches_are_bounded(monkeypatch):
    from kvcompress.ops import _triton_pool as tpool
    from kvcompress.ops._triton import launch
    monkeypatch.setattr(launch, "LAUNCH_CACHE_SIZE", 2)
    tpool._FWD_LAUNCH.clear()
    for T in (9, 10, 11, 12):
        x = torch.randn(1, 2, T, 4)
        y = kf.mean_pool(x, block_size=4, stride=2, backend="triton")
        torch.testing.assert_close(y, kf.mean_pool(x, block_size=4, stride=2, backend="torch"))
        assert len(tpool._FWD_LAUNCH) <= 2


def test_mlp_eager_backward_takes_the_forward_constant(monkeypatch):
    """An eager mlp call with pe computes the first layer's per-head constant
    (one head_gemv launch) in the forward only: the backward takes it from the
    forward (its other head_gemv is dpe's), and gives the custom op's bits."""
    from kvcompress.ops.mlp import triton_impl as mlp
    calls = []
    real = mlp.head_gemv

    def spy(H, vec, *args, **kwargs):
        calls.append(vec.dtype)       # the constant's vec is pe (x's dtype), dpe's the float32 column sums
        return real(H, vec, *args, **kwargs)
    monkeypatch.setattr(mlp, "head_gemv", spy)
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2, pe = (torch.randn(*s, generator=g).to(torch.bfloat16)
                             for s in [(1, 2, 9, 4), (2, 16, 6), (2, 6), (2, 6, 3), (2, 3), (2, 4, 4)])
    grads = {}
    for path in ("eager", "op"):
        leaves = [t.detach().requires_grad_(True) for t in (x, w1, b1, w2, b2, pe)]
        calls.clear()
        if path == "eager":
            y = kf.mlp(*leaves[:5], pe=leaves[5], block_size=4, stride=2, padding="left", backend="triton")
            assert calls == [torch.bfloat16]
        else:
            y = torch.ops.kvcompress.mlp_triton(*leaves, None, 4, 2, "left", "relu", -1)
        calls.clear()
        y.backward(torch.ones_like(y))
        assert calls == ([torch.float32] if path == "eager" else [torch.bfloat16, torch.float32])
        grads[path] = [y.detach()] + [t.grad for t in leaves]
    for a, b in zip(grads["eager"], grads["op"]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the eager path without autograd


@pytest.mark.parametrize("kind", ["mean_pool", "weighted_pool", "gated_pool", "mlp"])
def test_a_call_with_nothing_to_differentiate_skips_the_autograd_function(kind, monkeypatch):
    """An eager Triton call whose inputs need no gradient (or under
    torch.no_grad) runs the kind's forward without its autograd.Function:
    the same bits and strides as the call through the Function, an output
    without grad_fn; with an input requiring grad the Function runs."""
    from kvcompress.ops import _custom_op
    applied = []
    real = torch.autograd.Function.apply.__func__

    def spy(cls, *args, **kwargs):
        applied.append(cls.__name__)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(spy))
    want = _launch_call(kind, torch.float32, "bthd", 9, True, False)[0]          # through the Function
    assert applied and all(name.endswith("Fn") for name in applied)
    x, params, kw, _ = _launch_inputs(kind, torch.float32, "bthd", 9, True, False)       # the same inputs
    applied.clear()
    y = getattr(kf, kind)(x, *params, **kw)
    assert applied == [] and y.grad_fn is None
    assert torch.equal(y, want) and y.stride() == want.stride()
    x.requires_grad_(True)
    with torch.no_grad():
        y = getattr(kf, kind)(x, *params, **kw)
    assert applied == [] and y.grad_fn is None and torch.equal(y, want)
    y = getattr(kf, kind)(x, *params, **kw)
    assert applied and y.grad_fn is not None and torch.equal(y.detach(), want)
    assert _custom_op.eager_call(x)


def test_vmap_takes_the_custom_op():
    """Under vmap the Triton call goes through the custom op (eager_call is
    False while a functorch transform runs), which torch runs per sample
    (its batching fallback): the per-sample results. The eager path handed
    batched tensors to the Function (an error) or, without autograd, to the
    kernels (an error: no storage)."""
    from kvcompress.ops import _custom_op
    x = torch.randn(3, 1, 2, 9, 4)
    kw = dict(block_size=4, stride=2, padding="left", backend="triton")
    seen = []

    def one(t):
        seen.append(_custom_op.eager_call(t))
        return kf.mean_pool(t, **kw)
    y = torch.vmap(one)(x)
    assert seen == [False] and _custom_op.eager_call(x)
    assert torch.equal(y, torch.stack([kf.mean_pool(t, **kw) for t in x]))
