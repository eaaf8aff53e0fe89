"""Exact gradients and their error bounds: the tolerance model of
kvcompress/testing/tolerance.py carried through the backward pass.

For a cotangent g (B, H, W, D_out) we compute, in float64 and analytically,
the exact gradient of sum(y * g) with respect to x, every parameter and pe,
and for each element the largest error an implementation obeying SPEC
section 3 may make. ``tests/test_gradients.py`` checks these exact
gradients against central finite differences of the loop reference, so the
formulas below are verified, not trusted.

Structure of the derivation. Every gradient is a sum over windows of a
per-window ("local") gradient: a token collects the windows that contain
it, pe[h] collects every window of head h, a weight group collects every
window of its heads. So for each kind we derive, per window, the exact local
gradient, its magnitude (the same expression on absolute values) and a local
error bound; summing K local terms then adds K (u_a + u_64) times the summed
magnitudes (the usual gamma_K bound), and the result is stored in the input
dtype (c_o = 3 roundings allowed: the result, and one intermediate such as
a partial sum or a window-level gradient kept in the input dtype).

Local bounds per kind (u_a: accumulation unit roundoff, u_o: the dtype's):

- mean_pool: gX = g / L, one division: (2 u_a + c_o u_o) |g| / L.
- weighted_pool: gX = w g; gw = sum_d X g (D terms).
- linear: gX = W g (D_out terms); gW = X (x) g (one product); gbias = g.
- mlp: p = flat(X) w1 + b1 carries e_p = ((L D + 2) u_a + u_o) M_p, with
  M_p = |flat X| |w1| + |b1| (forward model); the hidden h = act(p) carries
  e_h = lambda e_p + (8 u_a + u_o) M_p. Backward: gh = w2 g (D_out terms,
  magnitude Mgh = |w2| |g|), gp = gh * act'(p^). The derivative of relu is
  exact unless the computed p^ can have the other sign than p, i.e. unless
  |p| <= e_p: there the error of gp may be the whole |gh| (the "ReLU sign
  flip": in bfloat16, p is known only to ~u_o |p|-scale, so units near 0
  flip, and the w1 and x gradients move by ~1e-2 relative while the others
  stay near u_o). For gelu and silu the derivative is smooth: its error is
  at most kappa e_p + 8 u_a lambda, kappa = max|act''| (gelu 2 phi(0) =
  0.798, silu 0.5; we use 0.8). Then gX = w1 gp, gw1 = flat X (x) gp,
  gb1 = gp, gw2 = h (x) g (whose error includes e_h |g|), gb2 = g.
- attention_pool: with P = softmax(Z), y = sum_j P_j X_j, the local gradients
  are gX = P g + (P g (X - y)) W^T, gW = X^T (P g (X - y)). The forward model
  gives P^ within a factor exp(+-2 Delta) of P plus (L + 4) u_a + u_o
  roundings: rho = expm1(2 Delta) + (L + 4) u_a + u_o. gz = P g (X - y) then
  carries (2 rho + (L + 8) u_a + 2 u_o) Gz + P |g| e_y with
  Gz = P |g| (|X| + Q), Q = sum_j P |X_j| >= |y|, e_y the forward bound.
"""

from __future__ import annotations

import math

import numpy as np

from . import windows
from .tolerance import LARGEST, LIPSCHITZ, MAX_LOGIT_DELTA, U64, _units

C_O = 3
ACT_ULPS = 8
KAPPA = 0.8  # max |act''| for gelu (2 phi(0) = 0.798) and silu (0.5)

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _act_prime(name, z):
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
    s = 0.5 * (1.0 + np.tanh(0.5 * z))   # sigmoid without overflow
    return s * (1.0 + z * (1.0 - s))


def _local(case, inputs, g):
    """Per-window (exact, bound, magnitude) for "X" (B, H, W, L, D) and each
    parameter (B, H, W, *param shape without G)."""
    u_o, u_a, _, _ = _units(case.dtype)
    ua = u_a + U64
    kw = dict(seqlens=case.seqlens, **case.window_kwargs())
    win = windows.gather_windows(inputs.x64, pe=inputs.pe64, **kw)                      # [B, H, W, L, D]
    win_abs = windows.gather_windows(np.abs(inputs.x64), pe=_abs(inputs.pe64), **kw)
    B, H, W, L, D = win.shape
    p = inputs.params64
    ag = np.abs(g)                                                                       # [B, H, W, O]
    out = {}

    def heads(a):
        return a[windows.group_of_head(a.shape[0], H)]

    if case.kind == "mean_pool":
        ex = np.broadcast_to(g[:, :, :, None, :] / L, win.shape)
        mag = np.broadcast_to(ag[:, :, :, None, :] / L, win.shape)
        out["X"] = (ex, (2 * ua + C_O * u_o) * mag, mag)
    elif case.kind == "weighted_pool":
        wh = heads(p["weight"])[None, :, None, :, None]                                 # [1, H, 1, L, 1]
        mag = np.abs(wh) * ag[:, :, :, None, :]
        out["X"] = (wh * g[:, :, :, None, :], (ua + C_O * u_o) * mag, mag)
        ex_w = np.einsum("bhwld,bhwd->bhwl", win, g)
        mag_w = np.einsum("bhwld,bhwd->bhwl", win_abs, ag)
        out["weight"] = (ex_w, (D * ua + C_O * u_o) * mag_w, mag_w)
    elif case.kind == "linear":
        Wh = heads(p["weight"])                                                         # [H, L, D, O]
        O = Wh.shape[-1]
        ex = np.einsum("bhwo,hldo->bhwld", g, Wh)
        mag = np.einsum("bhwo,hldo->bhwld", ag, np.abs(Wh))
        out["X"] = (ex, (O * ua + C_O * u_o) * mag, mag)
        ex_w = win[..., None] * g[:, :, :, None, None, :]                                # [B, H, W, L, D, O]
        mag_w = win_abs[..., None] * ag[:, :, :, None, None, :]
        out["weight"] = (ex_w, (ua + C_O * u_o) * mag_w, mag_w)
        if p["bias"] is not None:
            out["bias"] = (g, C_O * u_o * ag, ag)
    elif case.kind == "mlp":
        _mlp_local(case, p, win, win_abs, g, ag, u_o, ua, out)
    elif case.kind == "attention_pool":
        _attention_local(case, p["weight"], win, win_abs, g, ag, u_o, ua, out, _units(case.dtype)[3])
    else:
        raise ValueError(case.kind)
    return out


def _abs(a):
    return None if a is None else np.abs(a)


def _mlp_local(case, p, win, win_abs, g, ag, u_o, ua, out):
    B, H, W, L, D = win.shape
    gh_idx = windows.group_of_head(p["w1"].shape[0], H)
    w1, w2 = p["w1"][gh_idx], p["w2"][gh_idx]                                           # [H, LD, F], [H, F, O]
    b1 = None if p["b1"] is None else p["b1"][gh_idx][None, :, None, :]
    X, Xa = win.reshape(B, H, W, L * D), win_abs.reshape(B, H, W, L * D)
    pre = np.einsum("bhwk,hkf->bhwf", X, w1) + (0 if b1 is None else b1)
    M_p = np.einsum("bhwk,hkf->bhwf", Xa, np.abs(w1)) + (0 if b1 is None else np.abs(b1))
    e_p = ((L * D + 2) * ua + u_o) * M_p
    e_h = LIPSCHITZ * e_p + (ACT_ULPS * ua + u_o) * M_p
    hid = windows.act(case.activation, pre)
    gh = np.einsum("bhwo,hfo->bhwf", g, w2)
    Mgh = np.einsum("bhwo,hfo->bhwf", ag, np.abs(w2))
    e_gh = (w2.shape[-1] + 1) * ua * Mgh
    d = _act_prime(case.activation, pre)
    if case.activation == "relu":
        e_d = (np.abs(pre) <= e_p).astype(np.float64)       # the sign of p^ may differ from p's
    else:
        e_d = KAPPA * e_p + ACT_ULPS * ua * LIPSCHITZ
    gp = gh * d
    e_gp = LIPSCHITZ * e_gh + Mgh * e_d + (ua + u_o) * LIPSCHITZ * Mgh
    agp = np.abs(gp)
    F = w1.shape[-1]
    ex_x = np.einsum("bhwf,hkf->bhwk", gp, w1)
    mag_x = np.einsum("bhwf,hkf->bhwk", agp, np.abs(w1))
    bnd_x = np.einsum("bhwf,hkf->bhwk", e_gp, np.abs(w1)) + (F * ua + C_O * u_o) * \
        np.einsum("bhwf,hkf->bhwk", LIPSCHITZ * Mgh, np.abs(w1))
    shape = (B, H, W, L, D)
    out["X"] = (ex_x.reshape(shape), bnd_x.reshape(shape), mag_x.reshape(shape))
    ex_w1 = X[..., None] * gp[:, :, :, None, :]                                         # [B, H, W, LD, F]
    mag_w1 = Xa[..., None] * agp[:, :, :, None, :]
    bnd_w1 = Xa[..., None] * e_gp[:, :, :, None, :] + (ua + C_O * u_o) * Xa[..., None] * \
        (LIPSCHITZ * Mgh)[:, :, :, None, :]
    out["w1"] = (ex_w1, bnd_w1, mag_w1)
    if p["b1"] is not None:
        out["b1"] = (gp, e_gp + C_O * u_o * LIPSCHITZ * Mgh, agp)
    ah = np.abs(hid)
    out["w2"] = (hid[..., None] * g[:, :, :, None, :],
                 e_h[..., None] * ag[:, :, :, None, :] + (ua + C_O * u_o) * M_p[..., None] * ag[:, :, :, None, :],
                 ah[..., None] * ag[:, :, :, None, :])
    if p["b2"] is not None:
        out["b2"] = (g, C_O * u_o * ag, ag)


def _attention_local(case, weight, win, win_abs, g, ag, u_o, ua, out, tiny_a):
    B, H, W, L, D = win.shape
    Wh = weight[windows.group_of_head(weight.shape[0], H)]                             # [H, D, D]
    z = np.einsum("bhwld,hdc->bhwlc", win, Wh)
    P = np.exp(z - z.max(axis=3, keepdims=True))
    P = P / P.sum(axis=3, keepdims=True)                                               # [B, H, W, L, D]
    y = (P * win).sum(axis=3)                                                          # [B, H, W, D]
    A = np.einsum("bhwld,hdc->bhwlc", win_abs, np.abs(Wh)).max(axis=3)                # [B, H, W, D]
    delta = ((D + 2) * ua + u_o) * A
    rho = np.expm1(2 * np.minimum(delta, 50.0)) + (L + 4) * ua + u_o                   # [B, H, W, D]
    Q = (P * win_abs).sum(axis=3)
    e_y = (rho + L * ua + 2 * u_o) * Q
    gP = P * g[:, :, :, None, :]
    agP = P * ag[:, :, :, None, :]
    gz = gP * (win - y[:, :, :, None, :])                                              # [B, H, W, L, D]
    Gz = agP * (win_abs + Q[:, :, :, None, :])
    # a softmax weight flushed to zero (tiny_a, see tolerance.py) costs at most
    # tiny_a |g| (|X| + Q) in gz and tiny_a |g| in the direct term P g
    e_gz = (2 * rho[:, :, :, None, :] + (L + 8) * ua + 2 * u_o) * Gz + agP * e_y[:, :, :, None, :] \
        + tiny_a * ag[:, :, :, None, :] * (win_abs + Q[:, :, :, None, :])
    aW = np.abs(Wh)
    ex_x = gP + np.einsum("bhwlc,hdc->bhwld", gz, Wh)
    mag_x = agP + np.einsum("bhwlc,hdc->bhwld", np.abs(gz), aW)
    bnd_x = (rho[:, :, :, None, :] + ua + u_o) * agP + tiny_a * ag[:, :, :, None, :] \
        + np.einsum("bhwlc,hdc->bhwld", e_gz, aW) \
        + ((D + 1) * ua + C_O * u_o) * (agP + np.einsum("bhwlc,hdc->bhwld", Gz, aW))
    out["X"] = (ex_x, bnd_x, mag_x)
    ex_w = np.einsum("bhwld,bhwlc->bhwdc", win, gz)
    mag_w = np.einsum("bhwld,bhwlc->bhwdc", win_abs, np.abs(gz))
    bnd_w = np.einsum("bhwld,bhwlc->bhwdc", win_abs, e_gz) + (L * ua + C_O * u_o + u_o) * \
        np.einsum("bhwld,bhwlc->bhwdc", win_abs, Gz)
    out["weight"] = (ex_w, bnd_w, mag_w)


class GradBounds:
    """name -> exact gradient, its bound, and whether the case is well
    conditioned (finite magnitudes below the dtype's overflow, attention
    logits perturbation <= 1/8)."""

    def __init__(self, exact, bound, well_conditioned):
        self.exact, self.bound, self.well_conditioned = exact, bound, well_conditioned


def exact_and_bounds(case, inputs, g) -> GradBounds:
    """Exact gradients of sum(y * g) and their bounds, for "x", every
    parameter that is not None, and "pe" when present. g: (B, H, W, D_out)
    float64, exactly representable in the case's dtype."""
    u_o, u_a, tiny_o, tiny_a = _units(case.dtype)
    ua = u_a + U64
    local = _local(case, inputs, g)
    B, H, W = g.shape[:3]
    G = case.G
    exact, bound, magnitude = {}, {}, {}
    ex, bn, mag = local.pop("X")
    kw = dict(seqlens=case.seqlens, **case.window_kwargs())
    K = -(-case.L // case.S) + 1                         # windows holding one token, + 1
    exact["x"] = windows.scatter_windows(ex, case.T, **kw)
    magnitude["x"] = windows.scatter_windows(mag, case.T, **kw)
    bound["x"] = windows.scatter_windows(bn, case.T, **kw) + K * ua * windows.scatter_windows(mag, case.T, **kw) \
        + tiny_o + K * tiny_a
    if inputs.pe64 is not None:
        K = B * W
        exact["pe"] = ex.sum(axis=(0, 2))
        magnitude["pe"] = mag.sum(axis=(0, 2))
        bound["pe"] = bn.sum(axis=(0, 2)) + K * ua * mag.sum(axis=(0, 2)) + tiny_o + K * tiny_a
    for name, (ex, bn, mag) in local.items():
        K = B * W * (H // G)

        def total(a):                                  # [B, H, W, ...] -> [G, ...]
            s = a.sum(axis=(0, 2))
            return s.reshape((G, H // G) + s.shape[1:]).sum(axis=1)
        exact[name] = total(ex)
        magnitude[name] = total(mag)
        bound[name] = total(bn) + K * ua * total(mag) + tiny_o + K * tiny_a
    # the bound and the gradient's magnitude (sum of |terms|, >= |exact|) below the dtype's overflow, as
    # tolerance.forward_bound requires of the output: a gradient that overflows the dtype has no
    # representable answer to compare against (thorough profile on the GPU, run 10: a float16
    # attention_pool weight gradient of -75999 came back -inf, as any float16 result must)
    ok = all(np.isfinite(b).all() and (b < LARGEST[case.dtype] / 8).all() for b in bound.values()) \
        and all(np.isfinite(m).all() and (m < LARGEST[case.dtype] / 8).all() for m in magnitude.values())
    if case.kind == "attention_pool" and W * B > 0:
        win_abs = windows.gather_windows(np.abs(inputs.x64), pe=_abs(inputs.pe64), **kw)
        Wh = inputs.params64["weight"][windows.group_of_head(G, H)]
        A = np.einsum("bhwld,hdc->bhwlc", win_abs, np.abs(Wh)).max(axis=3)
        ok = ok and bool(np.all(((case.D + 2) * u_a + u_o) * A <= MAX_LOGIT_DELTA))
    return GradBounds(exact, bound, ok)
