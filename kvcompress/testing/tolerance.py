"""The tolerance model: one place, one derivation per kind.

An implementation's output y^ is compared with the float64 reference y on
the same inputs (inputs are exactly representable in the dtype under test,
so the only error is the implementation's arithmetic). We allow, per output
element, the a-priori rounding-error bound of any implementation that obeys
SPEC section 3 (accumulate in at least float32, i.e. unit roundoff u_a;
store in the input dtype, unit roundoff u_o):

    |y^ - y| <= bound = c u_o |y| + (1 + c u_o) inner + tiny_o,
    inner = (n (u_a + u_64) + c_i u_o) M + floors

- The output's own rounding is relative to the output, u_o |y^| <= u_o
  (|y| + inner): c = 1 (2 for bfloat16 under Triton's CPU interpreter,
  ``output_roundings``). In float16/bfloat16 this term dominates a correct
  kernel's error, so the bound is a few ulps of the output itself.
- M is the magnitude of the computation: the same computation on absolute
  values (|x| + |pe|, |weights|, |biases|), computed in float64.
  For a sum of n products, the classic bound is gamma_n * sum |a_k b_k|
  with gamma_n ~ n u (Higham, Accuracy and Stability, eq. 3.5).
- n is the number of roundings in the longest accumulation chain; u_64 is
  added because the reference itself computes in float64.
- c_i counts the intermediates rounded to the storage dtype, by precision
  class (SPEC 3c, docs/semantics.md "Numerics"): 0 in ``strict``; in
  ``io-intermediates`` x + pe (when there is pe), the MLP hidden layer, the
  attention probabilities (and logits, through Delta below), each once.
- floor: underflow. Rounding the output into the dtype's subnormal range
  adds at most its smallest subnormal; every accumulation-precision
  operation may flush a subnormal result to zero (GPUs run float32 math
  with flush-to-zero), an absolute error of at most the smallest *normal*
  of the accumulation type, 2**-126 for float32 (this is what breaks a
  purely relative rule when the reference error is 0, flash-attention #1136).
  In attention_pool a flushed softmax weight multiplies its value, so that
  floor is scaled by sum_j |X_j|.

The bound is worst-case, so a correct implementation can never exceed it;
real errors are ~sqrt(n) u, so a bug that costs even a few ulps of the
storage dtype in a short sum, or that accumulates in half precision, shows.
Kind-specific terms:

- mean_pool, weighted_pool, linear: n = L (pools) or L*D (linear), plus 3
  for bias, the folded pe term and the division of the mean; io: c_i = 1
  with pe.
- mlp: p = flat(X) @ w1 + b1 carries n1 u_a M_p (io with pe: + u_o M_p,
  x + pe rounded) with n1 = L*D + 2 and M_p = |flat X| @ |w1| + |b1|. The
  activation is lambda-Lipschitz (relu 1, silu 1.0998, gelu 1.1289; we use
  1.13) and is evaluated to c_act = 8 ulps of u_a; io stores the hidden in
  the input dtype (u_o); since |act(p)| <= |p|, every term is bounded by
  M = (|flat X| @ |w1| + |b1|) @ |w2| + |b2|, the MLP on absolute values
  with relu. Altogether n = 1.13 * n1 + 8 + F + 2; io: c_i = 1 + 1.13 (1 + [pe])
  (the hidden layer, and before the activation p and x + pe, stored).
  (M is ~sqrt(L*D) times the real hidden layer's size: the worst case is
  loose here, and the RMS check of quality.py carries the load.)
- attention_pool: logits z = X @ W carry at most
  Delta = ((D + 2) u_a + c_z u_o) * max_j A_j, A = |X| @ |W| (per
  feature), c_z = 0 in strict, 1 + [pe] in io (the logits stored, x + pe
  rounded before them). Perturbing logits by at most Delta moves every
  softmax weight by a factor within exp(+-2 Delta), so |P^ - P| <=
  expm1(2 Delta) P. With the exp/sum/division (2L + 8 roundings), in io the
  probabilities, the terms P_j v_j and the values x + pe stored (c_i = 2 + [pe]), and the
  output: inner = (expm1(2 Delta) + (2L + 8)(u_a + u_64) + c_i u_o) * Q,
  Q = sum_j P_j |X_j| (the softmax-weighted magnitude). In bfloat16 a
  rounded logit of size 100 moves P by 40%: cases with Delta > 1/8 are
  ill-conditioned (the bound says nothing), and the strategies drop them
  with ``assume`` instead of loosening anything.
- gated_pool (SPEC 3b; ``gated_pool_bound`` on gathered windows, v and z
  the features each position reads): y = sum_j P_j v_j, P = softmax_j(s),
  s = z + bias, pads s = -inf and v = 0. The logit is one float32 addition
  of two exact inputs, s^ = (z + bias)(1 + e), |e| <= u_a, so it moves by
  at most u_a (|z| + |bias|); the max-shift s^ - max s^ is one more
  rounding of a number of size <= 2 max (|z| + |bias|). Per feature,
  Delta = 3 (u_a + u_64) A, A = max_j (|z_j| + |bias_j|) over real
  positions, plus u_o A in io-intermediates (logits stored in the input
  dtype; the float32 rounding before it is already counted). Then
  attention_pool's argument word for word, the values read exactly (no x +
  pe): inner = (expm1(2 Delta) + (2L + 8)(u_a + u_64) + [io] u_o) * Q
  + (L + sum_j |v_j|) tiny_a, Q = sum_j P_j |v_j|; Delta > 1/8 is
  ill-conditioned.

The model is written once for NumPy arrays and torch tensors on any device
(``_xp.namespace``): the property suite runs it in NumPy, scripts/gpu_check.py
on the GPU's tensors at NSA sizes (``_xp.float64_inputs``).
"""

from __future__ import annotations

import os

import numpy as np

from . import _xp

UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SMALLEST_SUBNORMAL = {"float64": 2.0 ** -1074, "float32": 2.0 ** -149, "float16": 2.0 ** -24,
                      "bfloat16": 2.0 ** -133}
SMALLEST_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126}
LARGEST = {"float64": 1.79e308, "float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38}
U64 = UNIT_ROUNDOFF["float64"]
LIPSCHITZ = 1.13
ACT_ULPS = 8
MAX_LOGIT_DELTA = 1.0 / 8
PRECISIONS = ("strict", "io-intermediates")   # SPEC section 3c


def output_roundings(dtype) -> int:
    """Roundings of gated_pool's output to ``dtype``: one (strict, SPEC 3c),
    or two for bfloat16 under Triton's CPU interpreter, whose fp32 -> bf16
    conversion truncates (an error below one ulp, 2 u_o, where rounding to
    nearest makes at most u_o; pinned by a strict xfail in
    tests/test_interpreter_defects.py, so the allowance goes when the defect
    does). The kinds with c_o >= 2 absorb it already."""
    return 2 if dtype == "bfloat16" and os.environ.get("TRITON_INTERPRET") == "1" else 1


def _units(dtype):
    u_o = UNIT_ROUNDOFF[dtype]
    u_a = U64 if dtype == "float64" else UNIT_ROUNDOFF["float32"]
    tiny_a = SMALLEST_NORMAL["float64" if dtype == "float64" else "float32"]   # flush-to-zero allowed
    return u_o, u_a, SMALLEST_SUBNORMAL[dtype], tiny_a


def _abs(xp, a):
    return None if a is None else xp.abs(a)


def _windows(case, x, pe):
    return _xp.gather(x, pe=pe, seqlens=case.seqlens, **case.window_kwargs())


def _finite(xp, inputs) -> bool:
    return all(xp.all(xp.isfinite(a)) for a in [inputs.x64, inputs.pe64, *inputs.params64.values()]
               if a is not None)


class Bound:
    """Per-element bound (same shape as the output), the magnitude it scales,
    and whether the case is well-conditioned enough for the bound to mean
    anything (no overflow, attention logits perturbation <= 1/8). The
    arrays are NumPy arrays or torch tensors, as the inputs were.

    ``inner`` (same shape): the part of the bound before the output's own
    rounding (accumulation, and under io-intermediates the stored
    intermediates), bound = c u_o |y| + (1 + c u_o) inner + tiny_o; ``chain``:
    the number of roundings it counts along the longest chain (the RMS
    quality check, kvcompress/testing/quality.py, scales it by 1/sqrt(chain))."""

    def __init__(self, bound, magnitude, well_conditioned, inner=None, chain=1.0):
        self.bound, self.magnitude, self.well_conditioned = bound, magnitude, well_conditioned
        self.inner, self.chain = inner, chain


# above this many gathered window elements (B * H * W * L * D) the magnitudes
# of NumPy inputs come from the memory-lean oracle (kvcompress/testing/oracle.py),
# which loops over window positions instead of gathering windows; below it,
# and for torch tensors (a GPU holds the windows at NSA sizes), from the
# gathered windows (tests/test_oracle.py checks that both agree)
LEAN_ABOVE = 2 ** 22


def exact_output(case, inputs):
    """The exact (float64) output (B, H, W, D_out) of ``case`` on ``inputs``
    (the harness's Inputs, or ``_xp.float64_inputs`` of tensors on any
    device), from the gathered windows."""
    if case.kind == "gated_pool":
        v, z, valid = gated_windows(case, inputs)
        return gated_pool_exact(v, z, inputs.params64["bias"], valid)
    win = _windows(case, inputs.x64, inputs.pe64)
    return _xp.on_windows(case.kind, win, list(inputs.params64.values()), activation=case.activation)


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def forward_bound(case, inputs, precision: str = "strict") -> Bound:
    """The allowed |y^ - y| for every output element of ``case`` by a kernel
    of class ``precision`` ("strict" or "io-intermediates", SPEC 3c).
    inputs: the harness's Inputs, or any object with float64 ``x64``,
    ``params64`` and ``pe64`` (``_xp.float64_inputs``): NumPy arrays, or
    torch tensors on any device (the Bound's arrays are then tensors on that
    device). Raises ValueError for an unknown precision."""
    _check_precision(precision)
    xp = _xp.namespace(inputs.x64)
    if case.kind == "gated_pool":   # gathered windows at every size: L / S <= 4 at production shapes
        v, z, valid = gated_windows(case, inputs)
        b = gated_pool_bound(v, z, inputs.params64["bias"], valid, dtype=case.dtype, precision=precision)
        return Bound(b.bound, b.magnitude, b.well_conditioned and _finite(xp, inputs), b.inner, b.chain)
    if xp.name == "numpy" and case.B * case.H * case.W * case.L * case.D > LEAN_ABOVE:
        from . import oracle

        return oracle.forward_bound(case, inputs, precision)
    p = [_abs(xp, v) for v in inputs.params64.values()]
    win_abs = _windows(case, xp.abs(inputs.x64), _abs(xp, inputs.pe64))
    finite = _finite(xp, inputs)
    if case.kind == "attention_pool":
        w = inputs.params64["weight"]
        win = _windows(case, inputs.x64, inputs.pe64)
        A = xp.max(_xp.attention_logits(win_abs, xp.abs(w)), axis=3)                  # [B, H, W, D]
        P = _xp.softmax_positions(_xp.attention_logits(win, w))
        M = xp.sum(P * win_abs, axis=3)                                                 # Q
        y = xp.sum(P * win, axis=3)
        return bound_from(case, M, y=y, finite=finite, max_logit=A, abs_sum=xp.sum(win_abs, axis=3),
                          precision=precision)
    if case.kind not in ("mean_pool", "weighted_pool", "linear", "mlp"):
        raise ValueError(f"unknown kind {case.kind!r}")
    y = _xp.on_windows(case.kind, _windows(case, inputs.x64, inputs.pe64), list(inputs.params64.values()),
                       activation=case.activation)
    return bound_from(case, _xp.on_windows(case.kind, win_abs, p, activation="relu"), y=y, finite=finite,
                      precision=precision)


def _softmax_bound(M, y, delta, abs_sum, *, L, dtype, c_v, c_out=1):
    """The softmax-pooling bound shared by attention_pool and gated_pool (the
    module docstring): every logit within delta (per feature) of its exact
    value, 2L + 8 accumulation roundings, c_v roundings of the terms P_j v_j
    (io-intermediates: the probabilities stored in the dtype, and x + pe
    when there is pe), the output rounded c_out times, the floors; M = Q = sum_j P_j |v_j|, y the exact output,
    abs_sum = sum_j |v_j|."""
    xp = _xp.namespace(M)
    u_o, u_a, tiny_o, tiny_a = _units(dtype)
    inner = (xp.expm1(2 * xp.minimum(delta, 50.0)) + (2 * L + 8) * (u_a + U64) + c_v * u_o) * M \
        + (L + abs_sum) * tiny_a
    return c_out * u_o * xp.abs(y) + (1 + c_out * u_o) * inner + tiny_o, inner


def bound_from(case, M, *, y, finite: bool, max_logit=None, abs_sum=None, precision: str = "strict") -> Bound:
    """The Bound of ``case`` from its magnitudes, all (B, H, W, D_out)
    float64: M (attention_pool: Q = sum_j P_j |X_j|), the exact output y,
    and for attention_pool the largest logit magnitude per feature A =
    max_j |X_j| @ |W| (``max_logit``) and sum_j |X_j| (``abs_sum``).
    ``finite``: every input is finite. precision: the kernel's class (SPEC
    3c). The model of the module docstring, written once for every way of
    computing the magnitudes (gathered windows here, NumPy or torch;
    oracle.py at production sizes)."""
    _check_precision(precision)
    xp = _xp.namespace(M)
    u_o, u_a, tiny_o, tiny_a = _units(case.dtype)
    io = precision == "io-intermediates"
    xpe = io and case.use_pe          # x + pe stored in the dtype
    c_out = output_roundings(case.dtype)
    L, D = case.L, case.D
    ok = True
    if case.kind in ("mean_pool", "weighted_pool", "linear"):
        n = chain = (L * D if case.kind == "linear" else L) + 3
        inner = (n * (u_a + U64) + xpe * u_o) * M + n * tiny_a
        bound = c_out * u_o * xp.abs(y) + (1 + c_out * u_o) * inner + tiny_o
    elif case.kind == "mlp":
        n = chain = LIPSCHITZ * (L * D + 2) + ACT_ULPS + case.F + 2
        # io: x + pe (with pe) and the pre-activation, through the activation, and the hidden layer stored
        inner = (n * (u_a + U64) + (LIPSCHITZ * (xpe + io) + io) * u_o) * M + n * tiny_a
        bound = c_out * u_o * xp.abs(y) + (1 + c_out * u_o) * inner + tiny_o
    elif case.kind == "attention_pool":
        delta = ((D + 2) * (u_a + U64) + (io + xpe) * u_o) * max_logit
        ok = xp.all(delta <= MAX_LOGIT_DELTA)
        # io-intermediates: the values x + pe (with pe), the probabilities and the terms P_j v_j stored in
        # the dtype (the seed's (x * attn).sum(): its float16 stand-in reached 1.04 of the bound without them)
        bound, inner = _softmax_bound(M, y, delta, abs_sum, L=L, dtype=case.dtype, c_v=xpe + 2 * io, c_out=c_out)
        chain = D + 2 + 2 * L + 8
    else:
        raise ValueError(f"unknown kind {case.kind!r}")
    ok = ok and finite and xp.all(xp.isfinite(M)) and xp.all(M < LARGEST[case.dtype] / 8)
    return Bound(bound, M, ok, inner, chain)


# --------------------------------------------------------------------------- gated_pool (SPEC 3b)


def gated_windows(case, inputs):
    """(win_v, win_z, valid) of a gated_pool case: the values and gate
    scores each window position reads, (B, H, W, L, D_out) float64 (with
    ``split``, position j's feature chunk j // S; pads 0), and valid (W, L),
    False at a left pad. inputs: the harness's Inputs (z is the parameter
    "z") or ``_xp.float64_inputs``; NumPy or torch."""
    xp = _xp.namespace(inputs.x64)
    kw = dict(case.window_kwargs(), seqlens=case.seqlens)
    _, valid = _xp.window_index(xp, inputs.x64, inputs.x64.shape[2], **kw)
    v, z = _xp.gather(inputs.x64, **kw), _xp.gather(inputs.params64["z"], **kw)       # [B, H, W, L, D]
    if case.split:
        B, H, W, L, D = v.shape
        C = L // case.S
        j = xp.arange(L, v)
        v = v.reshape(B, H, W, L, C, D // C)[:, :, :, j, j // case.S]                # [B, H, W, L, D_out]
        z = z.reshape(B, H, W, L, C, D // C)[:, :, :, j, j // case.S]
    return v, z, valid


def gated_pool_logits(win_z, bias, valid):
    """Scores s (B, H, W, L, D_out) = z + bias[g], -inf at pad positions.

    win_z: (B, H, W, L, D_out) float64, the gate scores each window position
    reads (its feature chunk already selected); bias: (G, L, D_out) float64
    or None; valid: (W, L) bool, False at a left pad. NumPy or torch."""
    xp = _xp.namespace(win_z)
    s = win_z if bias is None else win_z + _xp.heads(xp, bias, win_z.shape[1])[None, :, None]
    return xp.where(valid[None, None, :, :, None], s, -xp.inf)


def gated_pool_exact(win_v, win_z, bias, valid):
    """The exact output (B, H, W, D_out): sum_j softmax_j(s)[j] v[j]; a pad
    (v = 0, weight 0) never reads its value."""
    xp = _xp.namespace(win_v)
    P = _xp.softmax_positions(gated_pool_logits(win_z, bias, valid))
    return xp.sum(xp.where(valid[None, None, :, :, None], P * win_v, 0.0), axis=3)


def gated_pool_delta(win_z, bias, valid, *, dtype, precision="strict"):
    """Delta (B, H, W, D_out): the most any computed logit, max-shifted, may
    differ from the exact one (module docstring, gated_pool)."""
    xp = _xp.namespace(win_z)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    u_o, u_a, _, _ = _units(dtype)
    a = xp.abs(win_z) if bias is None else xp.abs(win_z) + xp.abs(_xp.heads(xp, bias, win_z.shape[1]))[None, :, None]
    A = xp.max(xp.where(valid[None, None, :, :, None], a, 0.0), axis=3)              # [B, H, W, D_out]
    return (3 * (u_a + U64) + (u_o if precision == "io-intermediates" else 0.0)) * A


def gated_pool_bound(win_v, win_z, bias, valid, *, dtype: str, precision: str = "strict") -> Bound:
    """The allowed |y^ - y| (B, H, W, D_out) of gated_pool on gathered windows.

    win_v, win_z: (B, H, W, L, D_out) float64, the values and gate scores
    each window position reads (``split``'s feature chunk already selected;
    pads 0); bias: (G, L, D_out) float64 or None; valid: (W, L) bool, False
    at a left pad; dtype: the dtype under test (a key of UNIT_ROUNDOFF);
    precision: "strict" (default) or "io-intermediates" (SPEC 3c: logits
    may be stored in the dtype). NumPy arrays or torch tensors on any
    device, all of one kind. Raises ValueError for an unknown precision.
    The Bound's magnitude is Q = sum_j P_j |v_j|; well_conditioned requires
    finite inputs, Delta <= 1/8 and Q below the dtype's overflow / 8."""
    xp = _xp.namespace(win_v)
    delta = gated_pool_delta(win_z, bias, valid, dtype=dtype, precision=precision)
    P = _xp.softmax_positions(gated_pool_logits(win_z, bias, valid))
    m = valid[None, None, :, :, None]
    av = xp.where(m, xp.abs(win_v), 0.0)
    M = xp.sum(P * av, axis=3)                                                          # Q
    y = xp.sum(xp.where(m, P * win_v, 0.0), axis=3)
    bound, inner = _softmax_bound(M, y, delta, xp.sum(av, axis=3), L=win_v.shape[3], dtype=dtype,
                                  c_v=int(precision == "io-intermediates"),   # the probabilities stored
                                  c_out=output_roundings(dtype))
    finite = all(xp.all(xp.isfinite(a)) for a in (win_v, win_z, bias) if a is not None)
    ok = finite and xp.all(delta <= MAX_LOGIT_DELTA) and xp.all(xp.isfinite(M)) and xp.all(M < LARGEST[dtype] / 8)
    return Bound(bound, M, ok, inner, 2 * win_v.shape[3] + 11)


# --------------------------------------------------------------------------- helpers


def x_rounding_bound(case, inputs, x_exact):
    """For the affine kinds (mean_pool, weighted_pool, linear): the most that
    rounding the float64 tokens ``x_exact`` (B, H, T, D) into the case's dtype
    moves each output element (B, H, W, D_out), given the parameters of
    ``inputs``.

    Round to nearest moves v by at most u_o |v| in the normal range and by at
    most half the smallest subnormal below it, so by <= u_o |v| + tiny_o / 2
    everywhere. The output moves by the kind's linear part (no bias, no pe:
    they do not depend on x) applied to that perturbation, bounded by the
    linear part on absolute values. The subnormal term is what a purely
    relative u_o * |y| misses: float16 tokens near 2**-15 carry absolute
    errors up to 2**-25, about 2**-10 of themselves (GPU run 20)."""
    if case.kind not in ("mean_pool", "weighted_pool", "linear"):
        raise ValueError(f"x_rounding_bound: {case.kind!r} is not affine in x")
    xp = _xp.namespace(x_exact)
    u_o, _, tiny_o, _ = _units(case.dtype)
    params = [None if name == "bias" else _abs(xp, v) for name, v in inputs.params64.items()]
    dx = _windows(case, u_o * xp.abs(x_exact) + tiny_o / 2, None)
    return _xp.on_windows(case.kind, dx, params)


def compare(got, expected, bound):
    """(passed, worst error / bound, index of the worst element, its error).

    NumPy arrays or torch tensors (of one kind). Non-finite outputs where
    the reference is finite fail with ratio inf."""
    if got.shape != expected.shape:
        return False, float("inf"), None, float("inf")
    if int(np.prod(got.shape)) == 0:
        return True, 0.0, None, 0.0
    xp = _xp.namespace(got, expected)
    err = xp.abs(xp.f64(got) - xp.f64(expected))
    err = xp.where(xp.isfinite(got), err, xp.inf)
    ratio = err / bound
    k = int(ratio.reshape(-1).argmax())
    i = tuple(int(j) for j in np.unravel_index(k, tuple(ratio.shape)))
    return xp.all(ratio <= 1.0), float(ratio[i]), i, float(err[i])
