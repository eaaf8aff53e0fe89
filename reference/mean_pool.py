"""mean_pool: y = (1/L) * sum_j X[j] (SPEC section 3)."""

from ._windows import check_window_args, check_x, compress


def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Mean of every window.

    x: (B, H, T, D); pe: (H, L, D) or None; cu_seqlens: (N+1,) or None.
    Returns (B, H, W, D) in x's dtype.

    The window sum is taken in float64 before the division by L, so every
    finite input gives a finite mean. An implementation is held to this
    answer only where the window sum fits its accumulation dtype (float32
    for half and float32 input): docs/semantics.md, "Numerics".
    """
    x = check_x(x)
    L, _ = check_window_args(block_size, stride, padding)
    D = x.shape[-1]

    def compress_window(window, h):
        y = []
        for d in range(D):
            acc = 0.0
            for j in range(L):
                acc += window[j][d]
            y.append(acc / L)
        return y

    return compress(x, compress_window, D, block_size=block_size, stride=stride,
                    padding=padding, pe=pe, cu_seqlens=cu_seqlens)
