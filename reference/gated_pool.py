"""gated_pool: softmax-gated pooling of values by per-token gate scores,
DeepSeek-V4's KV compressor core (SPEC section 3b).

Window i, position j holds token t (section 2, left pads included); its
chunk is c = j // S with ``split``, else 0. For f in [0, D_out):
v[j, f] = x[t, c*D_out + f], s[j, f] = z[t, c*D_out + f] + bias[g, j, f];
a pad position has v = 0 and s = -inf (weight 0);
y[f] = sum_j softmax_j(s[:, f])[j] * v[j, f], the softmax max-shifted.

DeepSeek-V4 mapping (compression ratio R, head dim d; its ``Compressor``:
values ``wkv(h)``, scores ``wgate(h)``, position bias ``ape``):

- CSA, R = 4: block_size = 2R, stride = R, padding = "left", split = True,
  x and z with Dx = 2d features, D_out = d, and
  bias[g, j, f] = ape[j mod R, (j // R)*d + f]. Window i holds groups i-1
  (positions j < R, chunk 0: the first d features) and i (positions j >= R,
  chunk 1: the last d features); the previous group of group 0 is the R left
  pads, which is its overlap transform (missing group: score -inf, value 0).
- HCA, R = 128: block_size = stride = R, padding = "valid", split = False,
  bias = ape (R, d) with a leading group axis.
- The RMSNorm and RoPE that follow the pooling stay outside the kind.
"""

import math

import numpy as np

from ._windows import check_groups, check_param, check_shape, check_window_args, check_x, compress, to_lists

INPUTS = ("x", "z")   # the per-token inputs, windowed alike (reference/streaming.py reads this)
PAD_FILL = (0.0, -math.inf)   # a left pad as a token: value 0, score -inf (weight 0)


def gated_pool(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """Gated pooling of every window: one softmax over window positions per
    output feature, of the gate scores z (+ bias), weighting the values x.

    x: (B, H, T, Dx) floating array (float16/32/64 or bfloat16), the values.
    z: (B, H, T, Dx) floating array, the gate scores, same shape as x.
    bias: (G, L, D_out) floating array or None (default): a learned position
        bias added to the scores; G divides H, head h uses group
        h // (H // G).
    split: bool, default False. With split, position j reads feature chunk
        c = j // S of Dx = C * D_out features, C = L // S (S must divide L and
        C must divide Dx); without, D_out = Dx and every position reads all.
    block_size (L), stride (S), padding ("valid" or "left"), cu_seqlens
        ((N+1,) integer offsets or None): the windowing of SPEC section 2.
    Returns (B, H, W, D_out) in x's dtype. DeepSeek-V4's CSA and HCA
    compressors are calls of this function: the module docstring gives the
    arguments.

    Left pads have weight 0 and are never the only positions of a window:
    with padding "left" the pads are positions [0, L - S) and the last S >= 1
    positions are real tokens, so every softmax has a real position. The
    scores are float64 and max-shifted, so finite scores give finite
    weights; scores that are all -inf in a window give NaN (0/0), and a
    score of +inf gives NaN (inf - inf in the shift), as torch's softmax
    does.

    Raises TypeError for a non-floating x, z or bias, a non-bool split, or
    non-integer windowing arguments; ValueError for a wrong rank or shape
    (z not of x's shape, bias not (G, L, D_out)), G not dividing H, S not
    dividing L or C not dividing Dx with split, or out-of-range windowing
    arguments (docs/semantics.md, "Errors").
    """
    x = check_x(x)
    z = check_param(z, "z", 4)
    check_shape(z, x.shape, "z")
    L, S = check_window_args(block_size, stride, padding)
    if not isinstance(split, (bool, np.bool_)):
        raise TypeError(f"split must be a bool, got {type(split).__name__} {split!r}")
    split = bool(split)
    B, H, T, Dx = x.shape
    if split:
        if L % S != 0:
            raise ValueError(f"with split, stride S={S} must divide block_size L={L}")
        C = L // S
        if Dx % C != 0:
            raise ValueError(f"with split, the L // S = {C} chunks must divide the feature dim Dx={Dx} of x")
    else:
        C = 1
    D_out = Dx // C
    bias = check_param(bias, "bias", 3, optional=True)
    if bias is not None:
        G = bias.shape[0]
        check_groups(G, H, "bias")
        check_shape(bias, (G, L, D_out), "bias")

    # One array through the shared windowing (which zero-fills pad tokens):
    # x's features, z's features and a flag that is 1 on every real token, so
    # a pad token is told apart from a real token that happens to be zero.
    flag = np.ones((B, H, T, 1))
    xz = np.concatenate([x.astype(np.float64), z.astype(np.float64), flag], axis=-1)   # [B, H, T, 2*Dx + 1]
    b = to_lists(bias) if bias is not None else None

    def compress_window(window, h):
        g = h // (H // G) if b is not None else 0
        real = [token[2 * Dx] == 1.0 for token in window]
        # With "left" padding the pads are positions [0, L - S): the last S >= 1
        # positions are real, so no softmax is over pads only.
        assert real[L - 1], "the last position of a window is always a real token"
        y = []
        for f in range(D_out):
            v = []
            s = []
            for j in range(L):
                c = j // S if split else 0
                if real[j]:
                    v.append(window[j][c * D_out + f])
                    s.append(window[j][Dx + c * D_out + f] + (0.0 if b is None else b[g][j][f]))
                else:
                    v.append(0.0)
                    s.append(-math.inf)
            m = -math.inf
            for j in range(L):
                if s[j] > m or s[j] != s[j]:
                    m = s[j]  # a NaN score makes the maximum NaN, and with it the output
            e = [math.exp(s[j] - m) if real[j] else 0.0 for j in range(L)]   # a pad weighs exactly 0
            total = 0.0
            num = 0.0
            for j in range(L):
                total += e[j]
                num += e[j] * v[j]
            y.append(num / total)
        return y

    y = compress(xz, compress_window, D_out, block_size=block_size, stride=stride,
                 padding=padding, cu_seqlens=cu_seqlens)            # float64, as xz
    return y.astype(x.dtype)
