"""mean_pool: y = (1/L) * sum_j X[j] (SPEC section 3)."""

from ._windows import compress


def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Mean of every window.

    x: (B, H, T, D); pe: (H, L, D) or None; cu_seqlens: (N+1,) or None.
    Returns (B, H, W, D) in x's dtype.
    """
    L = block_size
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
