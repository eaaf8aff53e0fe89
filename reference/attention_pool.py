"""attention_pool: softmax-weighted pooling, one softmax per feature
(Enformer's attention pool, the seed's ``AttentionPool``; SPEC section 3).

Z = X @ weight[g]; P[:, c] = softmax over window positions j of Z[:, c];
y[c] = sum_j P[j, c] * X[j, c].
"""

import math

from ._windows import check_groups, check_param, check_shape, check_window_args, check_x, compress, to_lists


def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Attention pooling of every window.

    x: (B, H, T, D); weight: (G, D, D); pe: (H, L, D) or None;
    cu_seqlens: (N+1,) or None. Returns (B, H, W, D) in x's dtype.
    The softmax is shifted by its maximum and the logits are float64, so
    every finite input whose logits fit float64 gives a finite output. An
    implementation is held to this answer only where the logits fit its
    accumulation dtype (float32 for half and float32 input; beyond, a
    logit of inf makes the max-shifted softmax inf - inf = NaN):
    docs/semantics.md, "Numerics".
    """
    x = check_x(x)
    L, _ = check_window_args(block_size, stride, padding)
    weight = check_param(weight, "weight", 3)
    H, D = x.shape[1], x.shape[-1]
    G = weight.shape[0]
    check_groups(G, H, "weight")
    check_shape(weight, (G, D, D), "weight")
    w = to_lists(weight)

    def compress_window(window, h):
        g = h // (H // G)
        y = []
        for c in range(D):
            z = []
            for j in range(L):
                acc = 0.0
                for d in range(D):
                    acc += window[j][d] * w[g][d][c]
                z.append(acc)
            m = z[0]
            for j in range(1, L):
                if z[j] > m or z[j] != z[j]:
                    m = z[j]  # a NaN logit makes the maximum NaN, and with it the output
            e = [math.exp(z[j] - m) for j in range(L)]
            total = 0.0
            num = 0.0
            for j in range(L):
                total += e[j]
                num += e[j] * window[j][c]
            y.append(num / total)
        return y

    return compress(x, compress_window, D, block_size=block_size, stride=stride,
                    padding=padding, pe=pe, cu_seqlens=cu_seqlens)
