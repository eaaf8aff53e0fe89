"""Exact gradients and their error bounds: the tolerance model of
kvcompress/testing/tolerance.py carried through the backward pass.

For a cotangent g (B, H, W, D_out) we compute, in float64 and analytically,
the exact gradient of sum(y * g) with respect to x, every parameter and pe,
and for each element the largest error an implementation obeying SPEC
section 3 may make. ``tests/test_harness_model.py`` checks these exact
gradients against central finite differences of the loop reference, so the
formulas below are verified, not trusted.

Structure of the derivation. Every gradient is a sum over windows of a
per-window ("local") gradient: a token collects the windows that contain
it, pe[h] collects every window of head h, a weight group collects every
window of its heads. So for each kind we derive, per window, the exact local
gradient, its magnitude (the same expression on absolute values) and a local
error bound; summing K local terms then adds K (u_a + u_64) times the summed
magnitudes (the usual gamma_K bound), and the result is stored in the input
dtype once: u_o |exact| + (1 + u_o) (everything else), as the forward's
output (``sum_of_terms``). The local bounds below are the ``strict``
class's (SPEC 3c: float32 throughout). ``io-intermediates`` adds, per
local term, what autograd in the input dtype rounds: each window's share
of a gradient and the op gradient feeding it (IO_SHARE = 2 roundings on
its magnitude), x + pe where there is pe, the MLP hidden layer and its
gradient gp, the attention/gated probabilities and logit gradient (u_o in
rho and in e_gz), the logits (u_o A in Delta).

Local bounds per kind (u_a: accumulation unit roundoff, u_o: the dtype's;
io terms in brackets):

- mean_pool: gX = g / L, one division: 2 u_a |g| / L.
- weighted_pool: gX = w g; gw = sum_d X g (D terms).
- linear: gX = W g (D_out terms); gW = X (x) g (one product); gbias = g.
- mlp: p = flat(X) w1 + b1 carries e_p = ((L D + 2) u_a [+ u_o, p stored,
  + u_o with pe])
  M_p, with M_p = |flat X| |w1| + |b1| (forward model); the hidden h =
  act(p) carries e_h = lambda e_p + (8 u_a [+ u_o]) M_p. Backward: gh =
  w2 g (D_out terms, magnitude Mgh = |w2| |g|), gp = gh * act'(p^) [stored:
  + u_o lambda Mgh]. The derivative of relu is
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
  gives P^ within a factor exp(+-2 Delta) of P plus (L + 4) u_a [+ u_o]
  roundings: rho = expm1(2 Delta) + (L + 4) u_a [+ u_o]. gz = P g (X - y)
  then carries (2 rho + (L + 8) u_a [+ u_o + u_o with pe]) Gz + P |g| e_y
  with Gz = P |g| (|X| + Q), Q = sum_j P |X_j| >= |y|, e_y = (rho + L u_a)
  Q the error of the unrounded y the backward reads (a y rounded to the
  dtype would cost u_o |y| in every X - y: neither class allows it).
- gated_pool (SPEC 3b; ``gated_pool_exact_and_bounds`` on gathered
  windows): y = sum_j P_j v_j with P = softmax(s), s = z + bias, so
  dv_j = P_j g and ds_j = P_j (v_j - y) g (the softmax's Jacobian
  diag(P) - P P^T applied to v g); ds is dz at the position's token and
  feature chunk and, summed over windows and the heads of a group, dbias.
  The same softmax backward as attention_pool (``_softmax_local``), with
  the logit perturbation of tolerance.py's gated_pool, Delta = 3 u_a A
  [+ u_o A], A = max_j (|z_j| + |bias_j|): rho = expm1(2 Delta) + (L + 4)
  u_a [+ u_o], dv carries (rho + 2 u_a) P |g| + tiny_a |g| (P^ times g),
  ds carries attention's e_gz plus u_a Gz [each + IO_SHARE u_o times its
  magnitude]. A token's gradient sums the
  windows holding it (K = ceil(L / S) + 1; with ``split`` at most one per
  feature, so this K is generous); dbias sums K = B W H / G terms.

Every function here runs on NumPy arrays and on torch tensors on any device
(kvcompress/testing/_xp.py): the parameter gradients are contractions over
windows (einsum), never per-window outer products, so NSA sizes fit a GPU.
"""

from __future__ import annotations

from . import _xp
from .tolerance import (
    LARGEST,
    LIPSCHITZ,
    MAX_LOGIT_DELTA,
    PRECISIONS,
    U64,
    _units,
    gated_pool_delta,
    gated_pool_logits,
    output_roundings,
)

ACT_ULPS = 8
KAPPA = 0.8  # max |act''| for gelu (2 phi(0) = 0.798) and silu (0.5)
IO_SHARE = 2  # io-intermediates: a window's share of a gradient, and the op gradient feeding it, stored


def _local(case, inputs, g, io: bool):
    """The window-level terms: "X" -> (exact, bound, magnitude), each
    (B, H, W, L, D), per window; every parameter -> the same three summed
    over batch and windows per head, (H, *param shape without G): the sums
    are contractions (einsum), so nothing (B, H, W, *param shape) is built
    and NSA sizes fit a GPU. The bounds are the accumulation's (and under
    ``io``, io-intermediates, the stored intermediates'); the gradient's own
    rounding is added once, by ``sum_of_terms``."""
    xp = _xp.namespace(inputs.x64)
    u_o, u_a, _, tiny_a = _units(case.dtype)
    ua = u_a + U64
    u_x = u_o if io and inputs.pe64 is not None else 0.0     # x + pe stored in the dtype
    kw = dict(seqlens=case.seqlens, **case.window_kwargs())
    win = _xp.gather(inputs.x64, pe=inputs.pe64, **kw)                                   # [B, H, W, L, D]
    pe_abs = None if inputs.pe64 is None else xp.abs(inputs.pe64)
    win_abs = _xp.gather(xp.abs(inputs.x64), pe=pe_abs, **kw)
    B, H, W, L, D = win.shape
    p = inputs.params64
    ag = xp.abs(g)                                                                       # [B, H, W, O]
    out = {}
    if case.kind == "mean_pool":
        ex = xp.broadcast_to(g[:, :, :, None, :] / L, win.shape)
        mag = xp.broadcast_to(ag[:, :, :, None, :] / L, win.shape)
        out["X"] = (ex, 2 * ua * mag, mag)
    elif case.kind == "weighted_pool":
        wh = _xp.heads(xp, p["weight"], H)[None, :, None, :, None]                       # [1, H, 1, L, 1]
        mag = xp.abs(wh) * ag[:, :, :, None, :]
        out["X"] = (wh * g[:, :, :, None, :], ua * mag, mag)
        mag_w = xp.einsum("bhwld,bhwd->hl", win_abs, ag)
        out["weight"] = (xp.einsum("bhwld,bhwd->hl", win, g), (D * ua + u_x) * mag_w, mag_w)
    elif case.kind == "linear":
        Wh = _xp.heads(xp, p["weight"], H)                                               # [H, L, D, O]
        O = Wh.shape[-1]
        mag = xp.einsum("bhwo,hldo->bhwld", ag, xp.abs(Wh))
        out["X"] = (xp.einsum("bhwo,hldo->bhwld", g, Wh), O * ua * mag, mag)
        mag_w = xp.einsum("bhwld,bhwo->hldo", win_abs, ag)
        out["weight"] = (xp.einsum("bhwld,bhwo->hldo", win, g), (ua + u_x) * mag_w, mag_w)
        if p["bias"] is not None:
            agh = xp.sum(ag, axis=(0, 2))
            out["bias"] = (xp.sum(g, axis=(0, 2)), 0.0 * agh, agh)
    elif case.kind == "mlp":
        _mlp_local(xp, case.activation, p, win, win_abs, g, ag, u_o if io else 0.0, u_x, ua, out)
    elif case.kind == "attention_pool":
        _attention_local(xp, p["weight"], win, win_abs, g, ag, u_o if io else 0.0, u_x, ua, out, tiny_a)
    else:
        raise ValueError(case.kind)
    return out


def _mlp_local(xp, activation, p, win, win_abs, g, ag, u_i, u_x, ua, out):
    """u_i: the unit of a stored intermediate (the hidden layer, its
    gradient; 0 in the strict class), u_x: of x + pe."""
    B, H, W, L, D = win.shape
    w1, w2 = _xp.heads(xp, p["w1"], H), _xp.heads(xp, p["w2"], H)                       # [H, LD, F], [H, F, O]
    aw1 = xp.abs(w1)
    X, Xa = win.reshape(B, H, W, L * D), win_abs.reshape(B, H, W, L * D)
    pre = _xp.mlp_pre(win, p["w1"], p["b1"])                                             # [B, H, W, F]
    M_p = _xp.mlp_pre(win_abs, xp.abs(p["w1"]), None if p["b1"] is None else xp.abs(p["b1"]))
    e_p = ((L * D + 2) * ua + u_x + u_i) * M_p                 # io: x + pe, and p itself, stored
    e_h = LIPSCHITZ * e_p + (ACT_ULPS * ua + u_i) * M_p
    hid = _xp.act(xp, activation, pre)
    gh = xp.einsum("bhwo,hfo->bhwf", g, w2)
    Mgh = xp.einsum("bhwo,hfo->bhwf", ag, xp.abs(w2))
    e_gh = (w2.shape[-1] + 1) * ua * Mgh
    if activation == "relu":
        e_d = xp.where(xp.abs(pre) <= e_p, 1.0, 0.0)       # the sign of p^ may differ from p's
    else:
        e_d = KAPPA * e_p + ACT_ULPS * ua * LIPSCHITZ
    gp = gh * _xp.act_prime(xp, activation, pre)
    e_gp = LIPSCHITZ * e_gh + Mgh * e_d + (ua + u_i) * LIPSCHITZ * Mgh               # u_i: gp stored
    agp, lm = xp.abs(gp), LIPSCHITZ * Mgh
    F = w1.shape[-1]
    shape = (B, H, W, L, D)
    bnd_x = xp.einsum("bhwf,hkf->bhwk", e_gp, aw1) + F * ua * xp.einsum("bhwf,hkf->bhwk", lm, aw1)
    out["X"] = (xp.einsum("bhwf,hkf->bhwk", gp, w1).reshape(shape), bnd_x.reshape(shape),
                xp.einsum("bhwf,hkf->bhwk", agp, aw1).reshape(shape))
    out["w1"] = (xp.einsum("bhwk,bhwf->hkf", X, gp),
                 xp.einsum("bhwk,bhwf->hkf", Xa, e_gp) + (ua + u_x) * xp.einsum("bhwk,bhwf->hkf", Xa, lm),
                 xp.einsum("bhwk,bhwf->hkf", Xa, agp))
    if p["b1"] is not None:
        out["b1"] = (xp.sum(gp, axis=(0, 2)), xp.sum(e_gp, axis=(0, 2)), xp.sum(agp, axis=(0, 2)))
    out["w2"] = (xp.einsum("bhwf,bhwo->hfo", hid, g),
                 xp.einsum("bhwf,bhwo->hfo", e_h, ag) + ua * xp.einsum("bhwf,bhwo->hfo", M_p, ag),
                 xp.einsum("bhwf,bhwo->hfo", xp.abs(hid), ag))
    if p["b2"] is not None:
        agh = xp.sum(ag, axis=(0, 2))
        out["b2"] = (xp.sum(g, axis=(0, 2)), 0.0 * agh, agh)


def _softmax_local(xp, P, v, v_abs, g, ag, rho, u_i, u_x, ua, tiny_a):
    """The softmax pooling's backward, shared by attention_pool and
    gated_pool: y = sum_j P_j v_j per feature; P, v, v_abs (B, H, W, L, C),
    g, ag (B, H, W, C), rho (B, H, W, C) the relative error of P^; u_i the
    unit of a stored logit gradient (io-intermediates; else 0), u_x of the
    stored values v (x + pe). Returns gP = P g and its magnitude, the logit
    gradient gz = P g (v - y), its magnitude Gz and its error e_gz (module
    docstring). y is the unrounded output (float32 in the kernel): the one
    stored in the dtype would cost u_o |y| in every v - y."""
    L = v.shape[3]
    y = xp.sum(P * v, axis=3)                                                          # [B, H, W, C]
    Q = xp.sum(P * v_abs, axis=3)
    e_y = (rho + L * ua + u_x) * Q
    gP = P * g[:, :, :, None, :]
    agP = P * ag[:, :, :, None, :]
    gz = gP * (v - y[:, :, :, None, :])                                                # [B, H, W, L, C]
    Gz = agP * (v_abs + Q[:, :, :, None, :])
    # a softmax weight flushed to zero (tiny_a, see tolerance.py) costs at most
    # tiny_a |g| (|v| + Q) in gz and tiny_a |g| in the direct term P g
    e_gz = (2 * rho[:, :, :, None, :] + (L + 8) * ua + u_x + u_i) * Gz + agP * e_y[:, :, :, None, :] \
        + tiny_a * ag[:, :, :, None, :] * (v_abs + Q[:, :, :, None, :])
    return gP, agP, gz, Gz, e_gz


def _attention_local(xp, weight, win, win_abs, g, ag, u_i, u_x, ua, out, tiny_a):
    B, H, W, L, D = win.shape
    Wh = _xp.heads(xp, weight, H)                                                       # [H, D, D]
    aW = xp.abs(Wh)
    P = _xp.softmax_positions(_xp.attention_logits(win, weight))                        # [B, H, W, L, D]
    A = xp.max(xp.einsum("bhwld,hdc->bhwlc", win_abs, aW), axis=3)                      # [B, H, W, D]
    delta = ((D + 2) * ua + u_i + u_x) * A
    rho = xp.expm1(2 * xp.minimum(delta, 50.0)) + (L + 4) * ua + u_i                    # u_i: P stored
    gP, agP, gz, Gz, e_gz = _softmax_local(xp, P, win, win_abs, g, ag, rho, u_i, u_x, ua, tiny_a)
    ex_x = gP + xp.einsum("bhwlc,hdc->bhwld", gz, Wh)
    mag_x = agP + xp.einsum("bhwlc,hdc->bhwld", xp.abs(gz), aW)
    bnd_x = (rho[:, :, :, None, :] + ua) * agP + tiny_a * ag[:, :, :, None, :] \
        + xp.einsum("bhwlc,hdc->bhwld", e_gz, aW) \
        + (D + 1) * ua * (agP + xp.einsum("bhwlc,hdc->bhwld", Gz, aW))
    out["X"] = (ex_x, bnd_x, mag_x)
    out["weight"] = (xp.einsum("bhwld,bhwlc->hdc", win, gz),
                     xp.einsum("bhwld,bhwlc->hdc", win_abs, e_gz) + (L * ua + u_x)
                     * xp.einsum("bhwld,bhwlc->hdc", win_abs, Gz),
                     xp.einsum("bhwld,bhwlc->hdc", win_abs, xp.abs(gz)))


class GradBounds:
    """name -> exact gradient, its bound, and whether the case is well
    conditioned (finite magnitudes below the dtype's overflow, attention
    logits perturbation <= 1/8). NumPy arrays or torch tensors, as the
    inputs were."""

    def __init__(self, exact, bound, well_conditioned):
        self.exact, self.bound, self.well_conditioned = exact, bound, well_conditioned


def sum_of_terms(ex, bn, mag, K, dtype):
    """(exact, bound) of a gradient element that sums K local terms (their
    exact values ``ex``, local bounds ``bn`` and magnitudes ``mag``, already
    summed): the summation adds K (u_a + u_64) times the summed magnitudes
    (gamma_K), the result is rounded to the dtype once (``output_roundings``:
    u_o |computed| <= u_o (|exact| + error)), plus the floors of one stored
    result and K flushed partials."""
    u_o, u_a, tiny_o, tiny_a = _units(dtype)
    xp = _xp.namespace(ex)
    c = output_roundings(dtype)
    inner = bn + K * (u_a + U64) * mag + K * tiny_a
    return ex, c * u_o * xp.abs(ex) + (1 + c * u_o) * inner + tiny_o


def _overflows(xp, arrays, dtype) -> bool:
    return not all(xp.all(xp.isfinite(a)) and xp.all(a < LARGEST[dtype] / 8) for a in arrays)


def exact_and_bounds(case, inputs, g, precision: str = "strict") -> GradBounds:
    """Exact gradients of sum(y * g) and their bounds for a kernel of class
    ``precision`` (SPEC 3c), for "x", every parameter that is not None, and
    "pe" when present. g: (B, H, W, D_out) float64, exactly representable in
    the case's dtype. inputs: the harness's Inputs, or
    ``_xp.float64_inputs`` of tensors on any device (g then a float64 tensor
    on that device). Raises ValueError for an unknown precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    xp = _xp.namespace(inputs.x64)
    u_o, u_a, _, _ = _units(case.dtype)
    io = precision == "io-intermediates"
    if case.kind == "gated_pool":
        return _gated_exact_and_bounds(case, inputs, g, precision)
    local = _local(case, inputs, g, io)
    if io:   # each window's share of a gradient stored once in the dtype (autograd in the dtype)
        local = {k: (ex, bn + IO_SHARE * u_o * mag, mag) for k, (ex, bn, mag) in local.items()}
    B, H, W = g.shape[:3]
    G = case.G
    exact, bound, magnitude = {}, {}, {}
    ex, bn, mag = local.pop("X")
    kw = dict(seqlens=case.seqlens, **case.window_kwargs())
    K = -(-case.L // case.S) + 1                         # windows holding one token, + 1
    magnitude["x"] = _xp.scatter(mag, case.T, **kw)
    exact["x"], bound["x"] = sum_of_terms(_xp.scatter(ex, case.T, **kw), _xp.scatter(bn, case.T, **kw),
                                          magnitude["x"], K, case.dtype)
    if inputs.pe64 is not None:
        magnitude["pe"] = xp.sum(mag, axis=(0, 2))
        exact["pe"], bound["pe"] = sum_of_terms(xp.sum(ex, axis=(0, 2)), xp.sum(bn, axis=(0, 2)), magnitude["pe"],
                                                B * W, case.dtype)
    for name, (ex, bn, mag) in local.items():                      # per head -> per group
        magnitude[name] = _xp.groups(mag, G)
        exact[name], bound[name] = sum_of_terms(_xp.groups(ex, G), _xp.groups(bn, G), magnitude[name],
                                                B * W * (H // G), case.dtype)
    # the bound and the gradient's magnitude (sum of |terms|, >= |exact|) below the dtype's overflow, as
    # tolerance.forward_bound requires of the output: a gradient that overflows the dtype has no
    # representable answer to compare against (thorough profile on the GPU, run 10: a float16
    # attention_pool weight gradient of -75999 came back -inf, as any float16 result must)
    ok = not _overflows(xp, [*bound.values(), *magnitude.values()], case.dtype)
    if case.kind == "attention_pool" and W * B > 0:
        win_abs = _xp.gather(xp.abs(inputs.x64), pe=None if inputs.pe64 is None else xp.abs(inputs.pe64), **kw)
        A = xp.max(_xp.attention_logits(win_abs, xp.abs(inputs.params64["weight"])), axis=3)
        u_i = u_o * (io + (io and inputs.pe64 is not None))
        ok = ok and xp.all(((case.D + 2) * u_a + u_i) * A <= MAX_LOGIT_DELTA)
    return GradBounds(exact, bound, ok)


def _gated_exact_and_bounds(case, inputs, g, precision) -> GradBounds:
    """gated_pool's GradBounds for "x", "z" and "bias" (when present): the
    per-position terms of ``gated_pool_exact_and_bounds`` carried back to
    the tokens (through the split's chunk selection, then the adjoint of the
    window gather) and summed over the windows holding each token."""
    from .tolerance import gated_windows
    xp = _xp.namespace(inputs.x64)
    v, z, valid = gated_windows(case, inputs)
    gb = gated_pool_exact_and_bounds(v, z, inputs.params64["bias"], valid, g, dtype=case.dtype, precision=precision)
    kw = dict(seqlens=case.seqlens, **case.window_kwargs())
    B, H, W, L, Do = v.shape
    D, T = case.D, case.T
    K = -(-case.L // case.S) + 1                         # windows holding one token, + 1

    def to_tokens(a):   # (B, H, W, L, D_out) per position -> (B, H, T, D), the adjoint of gated_windows
        if case.split:
            C = L // case.S
            full = xp.zeros((B, H, W, L, C, Do), a)
            j = xp.arange(L, a)
            full[:, :, :, j, j // case.S] = a
            a = full.reshape(B, H, W, L, D)
        return _xp.scatter(a, T, **kw)

    exact, bound = {}, {}
    for name, token in (("v", "x"), ("z", "z")):
        mag = to_tokens(gb.magnitude[name])
        exact[token], bound[token] = sum_of_terms(to_tokens(gb.exact[name]), to_tokens(gb.bound[name]), mag, K,
                                                  case.dtype)
    if "bias" in gb.exact:
        exact["bias"], bound["bias"] = gb.exact["bias"], gb.bound["bias"]
    ok = gb.well_conditioned and not _overflows(xp, [*bound.values()], case.dtype)
    return GradBounds(exact, bound, ok)


def model(case, inputs, g, precision: str = "strict"):
    """Everything a check of one call needs: ({"y" | "x" | "pe" | parameter
    name: (exact, bound)}, well_conditioned), the output's from
    kvcompress/testing/tolerance.py, the gradients' of sum(y * g) from here,
    for a kernel of class ``precision`` (SPEC 3c). NumPy arrays, or torch
    tensors on any device (``_xp.float64_inputs``): scripts/gpu_check.py
    runs it on CUDA tensors at NSA sizes."""
    from . import tolerance
    fb = tolerance.forward_bound(case, inputs, precision)
    gb = exact_and_bounds(case, inputs, g, precision)
    out = {"y": (tolerance.exact_output(case, inputs), fb.bound)}
    out.update({k: (gb.exact[k], gb.bound[k]) for k in gb.exact})
    return out, bool(fb.well_conditioned and gb.well_conditioned)


# --------------------------------------------------------------------------- gated_pool (SPEC 3b)


def gated_pool_exact_and_bounds(win_v, win_z, bias, valid, g, *, dtype: str, precision: str = "strict") -> GradBounds:
    """Exact gradients of sum(y * g) for gated_pool on gathered windows, and
    their bounds (module docstring, gated_pool).

    win_v, win_z: (B, H, W, L, D_out) float64, what each window position
    reads (``split``'s chunk selected, pads 0); bias: (G, L, D_out) float64
    or None; valid: (W, L) bool, False at a left pad; g: (B, H, W, D_out)
    float64; dtype, precision: as ``tolerance.gated_pool_bound``. NumPy or
    torch, one kind.

    Returns GradBounds with, per window position, "v" and "z" (B, H, W, L,
    D_out): the local exact gradient and its local bound (not yet summed over
    the windows holding a token: the caller scatters exact, bound and the
    magnitude in ``magnitude`` through the adjoint of its gather, then
    applies ``sum_of_terms`` with K = ceil(L / S) + 1); and "bias" (G, L,
    D_out), complete (K = B W H / G terms), when bias is not None.
    ``magnitude`` (an attribute) holds the three magnitudes."""
    xp = _xp.namespace(win_v)
    u_o, u_a, _, tiny_a = _units(dtype)
    ua = u_a + U64
    B, H, W, L, Do = win_v.shape
    m = valid[None, None, :, :, None]
    P = _xp.softmax_positions(gated_pool_logits(win_z, bias, valid))                   # [B, H, W, L, Do]
    v = xp.where(m, win_v, 0.0)
    v_abs = xp.abs(v)
    delta = gated_pool_delta(win_z, bias, valid, dtype=dtype, precision=precision)
    u_i = u_o if precision == "io-intermediates" else 0.0       # P and the logit gradient stored
    rho = xp.expm1(2 * xp.minimum(delta, 50.0)) + (L + 4) * ua + u_i                    # [B, H, W, Do]
    ag = xp.abs(g)
    gP, agP, gz, Gz, e_gz = _softmax_local(xp, P, v, v_abs, g, ag, rho, u_i, 0.0, ua, tiny_a)
    exact = {"v": gP, "z": gz}
    magnitude = {"v": agP, "z": xp.abs(gz)}
    bound = {"v": (rho[:, :, :, None, :] + 2 * ua) * agP + tiny_a * ag[:, :, :, None, :],
             "z": e_gz + ua * Gz}
    bound = {k: b + IO_SHARE * u_i * magnitude[k] for k, b in bound.items()}   # each window's share stored
    if bias is not None:
        G = bias.shape[0]
        magnitude["bias"] = _xp.groups(xp.sum(magnitude["z"], axis=(0, 2)), G)
        exact["bias"], bound["bias"] = sum_of_terms(_xp.groups(xp.sum(gz, axis=(0, 2)), G),
                                                    _xp.groups(xp.sum(bound["z"], axis=(0, 2)), G),
                                                    magnitude["bias"], B * W * (H // G), dtype)
    ok = xp.all(delta <= MAX_LOGIT_DELTA) and not _overflows(xp, [*bound.values(), *magnitude.values()], dtype)
    gb = GradBounds(exact, bound, ok)
    gb.magnitude = magnitude
    return gb
