"""mlp: y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g] (SPEC section 3).

flat(X) is the window row by row, token-major (the seed's ``(n d)``), so
feature j*D + d of the flattened window is X[j][d].
"""

import math

from ._windows import (
    check_choice,
    check_groups,
    check_param,
    check_shape,
    check_window_args,
    check_x,
    compress,
    to_lists,
)

ACTIVATIONS = ("relu", "gelu", "silu")


def relu(z):
    # max(z, 0.0) would turn NaN into 0.0 or keep it depending on order
    return z if (z > 0.0 or z != z) else 0.0


def gelu(z):
    """Exact GELU, z * Phi(z), with the error function."""
    return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))


def silu(z):
    """z * sigmoid(z), with the sigmoid written so exp never overflows."""
    if z >= 0.0:
        return z / (1.0 + math.exp(-z))
    e = math.exp(z)  # z < 0 or NaN
    return z * e / (1.0 + e)


def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
        cu_seqlens=None):
    """Per-window two-layer MLP on the flattened window.

    x: (B, H, T, D); w1: (G, L*D, F); b1: (G, F) or None; w2: (G, F, D_out);
    b2: (G, D_out) or None; activation: "relu", "gelu" (exact erf form) or
    "silu"; pe: (H, L, D) or None; cu_seqlens: (N+1,) or None.
    Returns (B, H, W, D_out) in x's dtype.
    """
    x = check_x(x)
    L, _ = check_window_args(block_size, stride, padding)
    check_choice(activation, "activation", ACTIVATIONS)
    act = {"relu": relu, "gelu": gelu, "silu": silu}[activation]
    w1, w2 = check_param(w1, "w1", 3), check_param(w2, "w2", 3)
    b1, b2 = check_param(b1, "b1", 2, optional=True), check_param(b2, "b2", 2, optional=True)
    H, D = x.shape[1], x.shape[-1]
    G, F, D_out = w1.shape[0], w1.shape[-1], w2.shape[-1]
    check_groups(G, H, "w1")
    check_shape(w1, (G, L * D, F), "w1")
    check_shape(b1, (G, F), "b1")
    check_shape(w2, (G, F, D_out), "w2")
    check_shape(b2, (G, D_out), "b2")
    w1_, w2_ = to_lists(w1), to_lists(w2)
    b1_ = to_lists(b1) if b1 is not None else None
    b2_ = to_lists(b2) if b2 is not None else None

    def compress_window(window, h):
        g = h // (H // G)
        flat = []
        for j in range(L):
            for d in range(D):
                flat.append(window[j][d])
        hidden = []
        for f in range(F):
            acc = 0.0 if b1_ is None else b1_[g][f]
            for k in range(L * D):
                acc += flat[k] * w1_[g][k][f]
            hidden.append(act(acc))
        y = []
        for o in range(D_out):
            acc = 0.0 if b2_ is None else b2_[g][o]
            for f in range(F):
                acc += hidden[f] * w2_[g][f][o]
            y.append(acc)
        return y

    return compress(x, compress_window, D_out, block_size=block_size, stride=stride,
                    padding=padding, pe=pe, cu_seqlens=cu_seqlens)
