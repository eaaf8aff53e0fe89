"""The tolerance model: one place, one derivation per kind.

An implementation's output y^ is compared with the float64 reference y on
the same inputs (inputs are exactly representable in the dtype under test,
so the only error is the implementation's arithmetic). We allow, per output
element, the a-priori rounding-error bound of any implementation that obeys
SPEC section 3 (accumulate in at least float32, i.e. unit roundoff u_a;
store in the input dtype, unit roundoff u_o):

    |y^ - y| <= bound = (c_o * u_o + n * (u_a + u_64)) * M + floor

- M is the magnitude of the computation: the same computation on absolute
  values (|x| + |pe|, |weights|, |biases|), computed in float64.
  For a sum of n products, the classic bound is gamma_n * sum |a_k b_k|
  with gamma_n ~ n u (Higham, Accuracy and Stability, eq. 3.5).
- n is the number of roundings in the longest accumulation chain; u_64 is
  added because the reference itself computes in float64.
- c_o counts the roundings to the storage dtype the implementation may make:
  the output itself, x + pe if it adds them in the input dtype, and for the
  kinds with an intermediate (the MLP hidden layer, the attention
  probabilities) that intermediate too.
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
  for bias, the folded pe term and the division of the mean; c_o = 2.
- mlp: p = flat(X) @ w1 + b1 carries (n1 u_a + u_o) * M_p with
  n1 = L*D + 2 and M_p = |flat X| @ |w1| + |b1|. The activation is
  lambda-Lipschitz (relu 1, silu 1.0998, gelu 1.1289; we use 1.13) and is
  evaluated to c_act = 8 ulps of u_a; the hidden may be stored in the input
  dtype (u_o); since |act(p)| <= |p|, every term is bounded by
  M = (|flat X| @ |w1| + |b1|) @ |w2| + |b2|, the MLP on absolute values
  with relu. Altogether n = 1.13 * n1 + 8 + F + 2, c_o = 1.13 + 2.
- attention_pool: logits z = X @ W carry at most
  Delta = ((D + 2) u_a + u_o) * max_j A_j, A = |X| @ |W| (per feature).
  Perturbing logits by at most Delta moves every softmax weight by a factor
  within exp(+-2 Delta), so |P^ - P| <= expm1(2 Delta) P. With the value
  rounding, the exp/sum/division (2L + 8 roundings) and the output:
  bound = (expm1(2 Delta) + (2L + 8)(u_a + u_64) + 3 u_o) * Q,
  Q = sum_j P_j |X_j| (the softmax-weighted magnitude). Logits are never
  stored in the input dtype: SPEC requires float32 accumulation, and in
  bfloat16 a rounded logit of size 100 would move P by 40%.
  Cases with Delta > 1/8 are ill-conditioned (the bound says nothing);
  the strategies drop them with ``assume`` instead of loosening anything.
"""

from __future__ import annotations

import numpy as np

from . import windows

UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SMALLEST_SUBNORMAL = {"float64": 2.0 ** -1074, "float32": 2.0 ** -149, "float16": 2.0 ** -24,
                      "bfloat16": 2.0 ** -133}
SMALLEST_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126}
LARGEST = {"float64": 1.79e308, "float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38}
U64 = UNIT_ROUNDOFF["float64"]
LIPSCHITZ = 1.13
ACT_ULPS = 8
MAX_LOGIT_DELTA = 1.0 / 8


def _units(dtype):
    u_o = UNIT_ROUNDOFF[dtype]
    u_a = U64 if dtype == "float64" else UNIT_ROUNDOFF["float32"]
    tiny_a = SMALLEST_NORMAL["float64" if dtype == "float64" else "float32"]   # flush-to-zero allowed
    return u_o, u_a, SMALLEST_SUBNORMAL[dtype], tiny_a


def _abs(a):
    return None if a is None else np.abs(a)


def _windows(case, x, pe):
    return windows.gather_windows(x, pe=pe, seqlens=case.seqlens, **case.window_kwargs())


class Bound:
    """Per-element bound (same shape as the output), the magnitude it scales,
    and whether the case is well-conditioned enough for the bound to mean
    anything (no overflow, attention logits perturbation <= 1/8)."""

    def __init__(self, bound, magnitude, well_conditioned):
        self.bound, self.magnitude, self.well_conditioned = bound, magnitude, well_conditioned


# above this many gathered window elements (B * H * W * L * D) the magnitudes
# come from the memory-lean oracle (kvcompress/testing/oracle.py), which
# loops over window positions instead of gathering windows; below it, from
# windows.py as always (tests/test_oracle.py checks that both agree)
LEAN_ABOVE = 2 ** 22


def forward_bound(case, inputs) -> Bound:
    """The allowed |y^ - y| for every output element of ``case``."""
    if case.B * case.H * case.W * case.L * case.D > LEAN_ABOVE:
        from . import oracle

        return oracle.forward_bound(case, inputs)
    p = {k: _abs(v) for k, v in inputs.params64.items()}
    win_abs = _windows(case, np.abs(inputs.x64), _abs(inputs.pe64))
    finite = all(np.isfinite(a).all() for a in [inputs.x64, inputs.pe64, *inputs.params64.values()] if a is not None)
    if case.kind in ("mean_pool", "weighted_pool", "linear"):
        M = getattr(windows, case.kind)(win_abs, *p.values())
        return bound_from(case, M, finite=finite)
    if case.kind == "mlp":
        return bound_from(case, windows.mlp(win_abs, *p.values(), activation="relu"), finite=finite)
    if case.kind == "attention_pool":
        w = inputs.params64["weight"]
        win = _windows(case, inputs.x64, inputs.pe64)
        A = windows.attention_logits(win_abs, np.abs(w)).max(axis=3)     # [B, H, W, D]
        z = windows.attention_logits(win, w)
        P = np.exp(z - z.max(axis=3, keepdims=True))
        P = P / P.sum(axis=3, keepdims=True)
        M = (P * win_abs).sum(axis=3)                                     # Q
        return bound_from(case, M, finite=finite, max_logit=A, abs_sum=win_abs.sum(axis=3))
    raise ValueError(f"unknown kind {case.kind!r}")


def bound_from(case, M, *, finite: bool, max_logit=None, abs_sum=None) -> Bound:
    """The Bound of ``case`` from its magnitudes, all (B, H, W, D_out)
    float64: M (attention_pool: Q = sum_j P_j |X_j|), and for attention_pool
    the largest logit magnitude per feature A = max_j |X_j| @ |W|
    (``max_logit``) and sum_j |X_j| (``abs_sum``). ``finite``: every input
    is finite. The model of the module docstring, written once for both
    ways of computing the magnitudes (windows.py here, oracle.py at
    production sizes)."""
    u_o, u_a, tiny_o, tiny_a = _units(case.dtype)
    L, D = case.L, case.D
    ok = True
    if case.kind in ("mean_pool", "weighted_pool", "linear"):
        n = (L * D if case.kind == "linear" else L) + 3
        bound = (2 * u_o + n * (u_a + U64)) * M + tiny_o + n * tiny_a
    elif case.kind == "mlp":
        n = LIPSCHITZ * (L * D + 2) + ACT_ULPS + case.F + 2
        bound = ((LIPSCHITZ + 2) * u_o + n * (u_a + U64)) * M + tiny_o + n * tiny_a
    elif case.kind == "attention_pool":
        delta = ((D + 2) * u_a + u_o) * max_logit
        ok = bool(np.all(delta <= MAX_LOGIT_DELTA))
        bound = (np.expm1(2 * np.minimum(delta, 50.0)) + (2 * L + 8) * (u_a + U64) + 3 * u_o) * M \
            + tiny_o + (L + abs_sum) * tiny_a
    else:
        raise ValueError(f"unknown kind {case.kind!r}")
    ok = ok and finite and bool(np.all(np.isfinite(M))) and bool(np.all(M < LARGEST[case.dtype] / 8))
    return Bound(bound, M, ok)


def x_rounding_bound(case, inputs, x_exact) -> np.ndarray:
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
    u_o, _, tiny_o, _ = _units(case.dtype)
    params = [None if name == "bias" else _abs(v) for name, v in inputs.params64.items()]
    dx = _windows(case, u_o * np.abs(x_exact) + tiny_o / 2, None)
    return getattr(windows, case.kind)(dx, *params)


def compare(got: np.ndarray, expected: np.ndarray, bound: np.ndarray):
    """(passed, worst error / bound, index of the worst element, its error).

    Non-finite outputs where the reference is finite fail with ratio inf."""
    if got.shape != expected.shape:
        return False, float("inf"), None, float("inf")
    if got.size == 0:
        return True, 0.0, None, 0.0
    err = np.abs(got - expected)
    err = np.where(np.isfinite(got), err, np.inf)
    ratio = err / bound
    i = np.unravel_index(np.argmax(ratio), ratio.shape)
    return bool(np.all(ratio <= 1.0)), float(ratio[i]), tuple(int(k) for k in i), float(err[i])
