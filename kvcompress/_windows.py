"""Windowing arithmetic shared by every torch path (SPEC section 2).

``num_windows`` and ``compressed_cu_seqlens`` are public. ``StreamLayout``
is how the vectorized torch path reaches every window through strided views
instead of an unfolded copy:

Each sequence (a batch row, or one packed sequence of ``cu_seqlens``) is
copied once into a per-group token stream, starting at a multiple of S and
preceded by the L - S zero tokens of ``padding="left"``. In that stream,
window i of a sequence begins at a multiple of S, so position j of *every*
window is the strided view ``stream[j::S]``: one bmm per window position
computes position j for all windows of all heads and sequences at once.
The few positions that straddle two sequences are computed and dropped.
"""

from __future__ import annotations

import torch

PADDINGS = ("valid", "left")


def num_windows(n: int, block_size: int, stride: int, padding: str = "valid") -> int:
    """Number of windows W in a sequence of ``n`` tokens.

    ``"valid"``: (n - L) // S + 1 if n >= L else 0; ``"left"``: n // S.
    """
    if padding == "valid":
        return (n - block_size) // stride + 1 if n >= block_size else 0
    if padding == "left":
        return n // stride
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _num_windows_tensor(lengths: torch.Tensor, block_size: int, stride: int, padding: str) -> torch.Tensor:
    if padding == "valid":
        return torch.where(lengths >= block_size, torch.div(lengths - block_size, stride, rounding_mode="floor") + 1,
                           torch.zeros_like(lengths))
    return torch.div(lengths, stride, rounding_mode="floor")


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int,
                          padding: str = "valid") -> torch.Tensor:
    """Offsets of each sequence's compressed tokens in a packed output.

    cu_seqlens: (N+1,) int32/int64, non-decreasing from 0 to T.
    Returns (N+1,) of the same dtype and device; entry k counts the windows
    of sequences 0..k-1. Runs on the device, without a host synchronisation.
    """
    from ._validate import check_cu_seqlens_tensor, check_window_args
    check_window_args("compressed_cu_seqlens", block_size, stride, padding)
    check_cu_seqlens_tensor("compressed_cu_seqlens", cu_seqlens)
    counts = _num_windows_tensor(cu_seqlens[1:] - cu_seqlens[:-1], block_size, stride, padding)
    return torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(counts, 0).to(cu_seqlens.dtype)])


class StreamLayout:
    """Where each token and each window sits in the per-group token stream.

    Built for x of shape (B, H, T, D) with G weight groups (Hg = H // G
    heads each). The stream of group g is [Hg, B, Tp] tokens flattened, plus
    L - S zero tokens at the end so the last strided view stays in bounds.

    Attributes: ``Tp`` tokens per (head, batch) row, a multiple of S;
    ``Np = Tp // S`` window positions per row; ``R = Hg * B * Np`` positions
    per group; ``dest`` (T,) stream offset of each token in its row;
    ``windows`` (W,) row position of each output window; ``W``.
    """

    def __init__(self, B: int, H: int, G: int, T: int, D: int, *, block_size: int, stride: int,
                 padding: str, cu_seqlens: torch.Tensor | None, device: torch.device):
        L, S = block_size, stride
        self.B, self.H, self.G, self.Hg, self.T, self.D, self.L, self.S = B, H, G, H // G, T, D, L, S
        pre = L - S if padding == "left" else 0
        if cu_seqlens is None:   # one sequence per row: the offsets below in host integers, two aranges
            self.W = num_windows(T, L, S, padding)
            self.dest = torch.arange(pre, pre + T, device=device)          # [T]
            self.windows = torch.arange(self.W, device=device)             # [W]
            self.Tp = -(-(pre + T) // S) * S
            self.Np = self.Tp // S
            self.R = self.Hg * B * self.Np
            return
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]                                     # [N]
        extent = torch.div(pre + lengths + S - 1, S, rounding_mode="floor") * S  # [N] stream tokens per sequence
        offset = torch.cumsum(extent, 0) - extent                      # [N] stream start of each sequence
        n_win = _num_windows_tensor(lengths, L, S, padding)            # [N]
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=T)  # [T]
        self.dest = offset[seq] + pre + torch.arange(T, device=device) - cu[:-1][seq]  # [T]
        self.W = int(n_win.sum())
        first = torch.repeat_interleave(torch.cumsum(n_win, 0) - n_win, n_win, output_size=self.W)  # [W]
        self.windows = (torch.repeat_interleave(torch.div(offset, S, rounding_mode="floor"), n_win, output_size=self.W)
                        + torch.arange(self.W, device=device) - first)
        self.Tp = int(extent.sum())
        self.Np = self.Tp // S
        self.R = self.Hg * B * self.Np

    def to_stream(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Copy x (B, H, T, D), any strides, into the zero-filled stream
        (G, Hg * B * Tp + L - S, D) of ``dtype``. Differentiable."""
        G, Hg, B, Tp, D = self.G, self.Hg, self.B, self.Tp, self.D
        n = Hg * B * Tp
        stream = x.new_zeros((G, n + self.L - self.S, D), dtype=dtype)
        rows = stream[:, :n].view(G, Hg, B, Tp, D)
        src = x.unflatten(1, (G, Hg)).permute(1, 2, 0, 3, 4).to(dtype)  # [G, Hg, B, T, D]
        rows.index_copy_(3, self.dest, src)
        return stream

    def position(self, stream: torch.Tensor, j: int) -> torch.Tensor:
        """Token j of every window position: a strided view (G, R, D)."""
        return stream[:, j: j + self.R * self.S: self.S]

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """Keep the real windows: (G, R, C) -> (G, Hg, B, W, C)."""
        G, C = y.shape[0], y.shape[-1]
        return y.view(G, self.Hg, self.B, self.Np, C).index_select(3, self.windows)

    def to_bhwc(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(G, Hg, B, W, C) -> (B, H, W, C) of ``dtype``, contiguous."""
        out = y.permute(2, 0, 1, 3, 4).reshape(self.B, self.H, self.W, y.shape[-1])
        return out.to(dtype).contiguous()

    def per_head(self, c: torch.Tensor) -> torch.Tensor:
        """A per-head constant (H, C) shaped to broadcast onto (G, Hg, B, W, C)."""
        return c.view(self.G, self.Hg, 1, 1, c.shape[-1])
