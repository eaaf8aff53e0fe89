"""weighted_pool: y = sum_j weight[g, j] * X[j] (SPEC section 3)."""

from ._windows import check_groups, check_param, check_shape, check_window_args, check_x, compress, to_lists


def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Weighted sum of every window, one weight per window position and group.

    x: (B, H, T, D); weight: (G, L), G divides H, head h uses group
    h // (H // G); pe: (H, L, D) or None; cu_seqlens: (N+1,) or None.
    Returns (B, H, W, D) in x's dtype.
    """
    x = check_x(x)
    L, _ = check_window_args(block_size, stride, padding)
    weight = check_param(weight, "weight", 2)
    H, D = x.shape[1], x.shape[-1]
    G = weight.shape[0]
    check_groups(G, H, "weight")
    check_shape(weight, (G, L), "weight")
    w = to_lists(weight)

    def compress_window(window, h):
        g = h // (H // G)
        y = []
        for d in range(D):
            acc = 0.0
            for j in range(L):
                acc += w[g][j] * window[j][d]
            y.append(acc)
        return y

    return compress(x, compress_window, D, block_size=block_size, stride=stride,
                    padding=padding, pe=pe, cu_seqlens=cu_seqlens)
