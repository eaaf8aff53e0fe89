"""A memory-lean float64 oracle for production shapes, and the tolerance
model's magnitudes at those shapes.

``windows.py`` gathers every window, (B, H, W, L, D), then einsums: clear,
but at NSA sizes (T = 64k tokens, L = 64, S = 16, D = 128) the gather holds
L / S = 4 copies of x and linear's einsum more. Here nothing is gathered.
For a fixed window position j, the tokens of all W windows of a sequence are
one strided slice of it (SPEC section 2: window i, position j holds token
i*S + j of the sequence with its L - S left pads prepended), so each kind is
a loop over the L positions of (B, H, W, D) slices, each a BLAS matmul
(numpy's matmul takes a row-strided slice without copying it). Peak memory
is a few (B, H, W, max(D, D_out, F)) arrays.

- ``forward(kind, x, params, ...)``: the exact (float64) output, any kind.
- ``forward_bound(case, inputs)``: ``tolerance.forward_bound``'s Bound,
  computed here (magnitude M, and for attention_pool the softmax-weighted
  magnitude Q, the largest logit magnitude A per feature and sum_j |X_j|),
  then assembled by ``tolerance.bound_from``: one tolerance model.
- ``evaluate(case, inputs)``: both, sharing the pass where they can.

Independent of the loop reference and of ``windows.py``;
``tests/test_oracle.py`` checks it against both.
"""

from __future__ import annotations

import kvcompress_reference as reference
import numpy as np

from . import _xp, tolerance
from .windows import group_of_head


def act(name: str, z: np.ndarray) -> np.ndarray:
    """relu (NaN kept), exact-erf gelu, silu, in float64 (``_xp.act``)."""
    return _xp.act(_xp.namespace(z), name, z)


def sequences(T: int, *, block_size: int, stride: int, padding: str, seqlens=None):
    """(start, tokens, windows) of every sequence, in packed order."""
    out, s = [], 0
    for n in ([T] if seqlens is None else list(seqlens)):
        out.append((s, n, reference.num_windows(n, block_size, stride, padding)))
        s += n
    return out


def _positions(x, start, n, W, *, block_size, stride, padding):
    """The L window positions of one sequence as a function j -> slice.

    x (B, H, T, D) float64; returns slice(j) (B, H, W, D): token j of every
    window, a view of x (valid) or of the sequence with its L - S zero pads
    prepended (left; one copy of the sequence)."""
    L, S = block_size, stride
    seq = x[:, :, start:start + n]                                          # [B, H, n, D]
    if padding == "left" and L > S:
        B, H, _, D = x.shape
        seq = np.concatenate([np.zeros((B, H, L - S, D)), seq], axis=2)      # [B, H, L - S + n, D]
    return lambda j: seq[:, :, j:j + (W - 1) * S + 1:S]                     # [B, H, W, D]


def _pe_term(kind, pe, params, gh, L, D):
    """The pe contribution to the output (H, C), the same for every window:
    pe is added at every position, pads included, and every kind but
    attention_pool is affine in the window."""
    if kind == "mean_pool":
        return pe.sum(axis=1) / L
    if kind == "weighted_pool":
        return np.einsum("hl,hld->hd", params[0][gh], pe)
    if kind == "linear":
        return np.einsum("hld,hldo->ho", pe, params[0][gh])
    if kind == "mlp":
        return np.einsum("hk,hkf->hf", pe.reshape(pe.shape[0], L * D), params[0][gh])
    raise ValueError(kind)


def _affine_sequence(kind, pos, W, params, gh, L, D):
    """mean_pool, weighted_pool, linear and mlp's first layer for one
    sequence, without pe and biases: (B, H, W, C)."""
    acc = None
    for j in range(L):
        xj = pos(j)                                                         # [B, H, W, D]
        if kind == "mean_pool":
            t = xj
        elif kind == "weighted_pool":
            t = xj * params[0][gh][None, :, None, j, None]                  # weight (G, L)
        elif kind == "linear":
            t = np.matmul(xj, params[0][gh, j][None])                       # weight (G, L, D, D_out)
        else:                                                               # mlp: w1 (G, L*D, F), token-major
            t = np.matmul(xj, params[0][gh, j * D:(j + 1) * D][None])
        acc = t.copy() if acc is None else acc + t
    return acc / L if kind == "mean_pool" else acc


def forward(kind: str, x: np.ndarray, params: list, *, block_size: int, stride: int, padding: str = "valid",
            pe: np.ndarray | None = None, seqlens=None, activation: str = "relu") -> np.ndarray:
    """The exact output of ``kind`` in float64.

    x: (B, H, T, D) float64. params: the kind's parameters after x, in
    signature order (kvcompress.testing.records), float64 or None.
    pe: (H, L, D) or None. seqlens: lengths of packed sequences (B == 1) or
    None. Returns (B, H, W, D_out). Raises ValueError for an unknown kind.
    """
    if kind == "attention_pool":
        return _attention(x, params[0], block_size=block_size, stride=stride, padding=padding, pe=pe,
                          seqlens=seqlens)[0]
    if kind not in ("mean_pool", "weighted_pool", "linear", "mlp"):
        raise ValueError(f"unknown kind {kind!r}")
    B, H, T, D = x.shape
    L = block_size
    G = params[0].shape[0] if params else 1
    gh = group_of_head(G, H)
    C = params[0].shape[-1] if kind == "linear" else params[2].shape[-1] if kind == "mlp" else D   # D_out
    seqs = sequences(T, block_size=L, stride=stride, padding=padding, seqlens=seqlens)
    out = np.zeros((B, H, sum(W for _, _, W in seqs), C))                   # [B, H, W, D_out]
    pe_term = None if pe is None else _pe_term(kind, pe, params, gh, L, D)  # [H, D_out or F]
    w0 = 0
    for start, n, W in seqs:
        if W == 0:
            continue
        pos = _positions(x, start, n, W, block_size=L, stride=stride, padding=padding)
        y = _affine_sequence(kind, pos, W, params, gh, L, D)                # [B, H, W, D_out or F]
        if pe_term is not None:
            y = y + pe_term[None, :, None]
        if kind == "linear" and params[1] is not None:
            y = y + params[1][gh][None, :, None]
        if kind == "mlp":
            w1, b1, w2, b2 = params
            if b1 is not None:
                y = y + b1[gh][None, :, None]
            y = np.matmul(act(activation, y), w2[gh][None])                 # [B, H, W, D_out]
            if b2 is not None:
                y = y + b2[gh][None, :, None]
        out[:, :, w0:w0 + W] = y
        w0 += W
    return out


def _attention(x, weight, *, block_size, stride, padding, pe=None, seqlens=None, terms=False):
    """attention_pool with a one-pass (online) softmax over the L positions,
    max-shifted like the reference. With ``terms``, also what the tolerance
    model needs, all (B, H, W, D): Q = sum_j P_j |X_j| (|X_j| = |x| + |pe|),
    A = max_j |X_j| @ |weight| and sum_j |X_j|. Returns (y, Q, A, abs_sum)."""
    B, H, T, D = x.shape
    L, S = block_size, stride
    gh = group_of_head(weight.shape[0], H)
    wh = weight[gh][None]                                                   # [1, H, D, D]
    wabs = np.abs(wh)
    seqs = sequences(T, block_size=L, stride=S, padding=padding, seqlens=seqlens)
    Wt = sum(W for _, _, W in seqs)
    out = [np.zeros((B, H, Wt, D)) for _ in range(4 if terms else 1)]
    w0 = 0
    for start, n, W in seqs:
        if W == 0:
            continue
        pos = _positions(x, start, n, W, block_size=L, stride=S, padding=padding)
        m = np.full((B, H, W, D), -np.inf)
        den, num = np.zeros((B, H, W, D)), np.zeros((B, H, W, D))
        if terms:
            q, a, sabs = np.zeros((B, H, W, D)), np.zeros((B, H, W, D)), np.zeros((B, H, W, D))
        for j in range(L):
            v = pos(j) if pe is None else pos(j) + pe[None, :, None, j]    # [B, H, W, D]
            z = np.matmul(v, wh)                                            # [B, H, W, D]
            m_new = np.maximum(m, z)
            scale, e = np.exp(m - m_new), np.exp(z - m_new)
            den = den * scale + e
            num = num * scale + e * v
            m = m_new
            if terms:
                vabs = np.abs(pos(j)) if pe is None else np.abs(pos(j)) + np.abs(pe)[None, :, None, j]
                q = q * scale + e * vabs
                a = np.maximum(a, np.matmul(vabs, wabs))
                sabs += vabs
        out[0][:, :, w0:w0 + W] = num / den
        if terms:
            out[1][:, :, w0:w0 + W] = q / den
            out[2][:, :, w0:w0 + W] = a
            out[3][:, :, w0:w0 + W] = sabs
        w0 += W
    return tuple(out) if terms else (out[0], None, None, None)


def _finite(inputs) -> bool:
    return all(np.isfinite(a).all() for a in [inputs.x64, inputs.pe64, *inputs.params64.values()]
               if a is not None)


def _call(case, x, params, pe, *, activation=None):
    return forward(case.kind, x, params, pe=pe, seqlens=case.seqlens,
                   activation=activation or case.activation, **case.window_kwargs())


def _abs(a):
    return None if a is None else np.abs(a)


# the kinds with a memory-lean form here; gated_pool's windows are gathered
# (tolerance.gated_windows: at production shapes L / S <= 4)
LEAN_KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool")


def evaluate(case, inputs, precision: str = "strict") -> tuple[np.ndarray, tolerance.Bound]:
    """(the exact output (B, H, W, D_out), its ``tolerance.Bound`` for a
    kernel of class ``precision``) for a Case (kvcompress.testing.cases) and
    its Inputs, without gathering windows: the same Bound as
    ``tolerance.forward_bound`` (to float64 rounding of the magnitudes), at a
    fraction of its memory."""
    params = list(inputs.params64.values())
    if case.kind == "gated_pool":   # no lean form: its windows are gathered (L / S <= 4 at production shapes)
        return tolerance.exact_output(case, inputs), tolerance.forward_bound(case, inputs, precision)
    if case.kind == "attention_pool":
        y, Q, A, sabs = _attention(inputs.x64, params[0], pe=inputs.pe64, seqlens=case.seqlens, terms=True,
                                   **case.window_kwargs())
        return y, tolerance.bound_from(case, Q, y=y, finite=_finite(inputs), max_logit=A, abs_sum=sabs,
                                       precision=precision)
    y = _call(case, inputs.x64, params, inputs.pe64)
    return y, _bound(case, inputs, y, precision)


def _bound(case, inputs, y, precision):
    params = [_abs(p) for p in inputs.params64.values()]
    M = _call(case, np.abs(inputs.x64), params, _abs(inputs.pe64), activation="relu")
    return tolerance.bound_from(case, M, y=y, finite=_finite(inputs), precision=precision)


def forward_bound(case, inputs, precision: str = "strict") -> tolerance.Bound:
    """``tolerance.forward_bound(case, inputs, precision)``, memory-lean: the
    magnitude is the same computation on absolute values (|x| + |pe|,
    |weights|, |biases|; the MLP with relu), see
    kvcompress/testing/tolerance.py."""
    if case.kind not in LEAN_KINDS or case.kind == "attention_pool":
        return evaluate(case, inputs, precision)[1]
    return _bound(case, inputs, _call(case, inputs.x64, list(inputs.params64.values()), inputs.pe64), precision)
