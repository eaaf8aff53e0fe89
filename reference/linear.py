"""linear: y = sum_j X[j] @ weight[g, j] + bias[g] (SPEC section 3).

This is NSA's compression (arXiv 2502.11089, eq. 7) as a per-position linear
map, the Triton ``linear_compress`` and the seed's ``ConvLinearCompress``.
"""

from ._windows import check_groups, check_param, check_shape, check_window_args, check_x, compress, to_lists


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Per-window linear map.

    x: (B, H, T, D); weight: (G, L, D, D_out); bias: (G, D_out) or None;
    pe: (H, L, D) or None; cu_seqlens: (N+1,) or None.
    Returns (B, H, W, D_out) in x's dtype.
    """
    x = check_x(x)
    L, _ = check_window_args(block_size, stride, padding)
    weight = check_param(weight, "weight", 4)
    bias = check_param(bias, "bias", 2, optional=True)
    H, D = x.shape[1], x.shape[-1]
    G, D_out = weight.shape[0], weight.shape[-1]
    check_groups(G, H, "weight")
    check_shape(weight, (G, L, D, D_out), "weight")
    check_shape(bias, (G, D_out), "bias")
    w = to_lists(weight)
    b = to_lists(bias) if bias is not None else None

    def compress_window(window, h):
        g = h // (H // G)
        y = []
        for o in range(D_out):
            acc = 0.0 if b is None else b[g][o]
            for j in range(L):
                for d in range(D):
                    acc += window[j][d] * w[g][j][d][o]
            y.append(acc)
        return y

    return compress(x, compress_window, D_out, block_size=block_size, stride=stride,
                    padding=padding, pe=pe, cu_seqlens=cu_seqlens)
