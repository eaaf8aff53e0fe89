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

from ._validate import PADDINGS, check_cu_seqlens_tensor, check_int, check_window_args

__all__ = ["PADDINGS", "StreamLayout", "compressed_cu_seqlens", "num_windows"]


def num_windows(n: int, block_size: int, stride: int, padding: str = "valid") -> int:
    """Number of windows W in a sequence of ``n`` tokens.

    n: int >= 0; block_size: int >= 1; stride: int, 1 <= stride <=
    block_size; padding: "valid" (default) or "left". Integers may be any
    ``numbers.Integral`` except bool (numpy integers included).
    ``"valid"``: (n - L) // S + 1 if n >= L else 0; ``"left"``: n // S.

    Raises TypeError for a non-integer n, block_size or stride (bool, float,
    str, None) or a non-str padding; ValueError for n < 0, block_size < 1, a
    stride outside [1, block_size] or an unknown padding.
    """
    n = check_int("num_windows", "n", n, lo=0)
    block_size, stride = check_window_args("num_windows", block_size, stride, padding)
    return _num_windows(n, block_size, stride, padding)


def _num_windows(n: int, block_size: int, stride: int, padding: str) -> int:
    """num_windows for arguments already validated (the hot paths)."""
    if padding == "valid":
        return (n - block_size) // stride + 1 if n >= block_size else 0
    return n // stride


def _num_windows_tensor(lengths: torch.Tensor, block_size: int, stride: int, padding: str) -> torch.Tensor:
    # L and S may exceed int64; any length is below 2**62, so clamping both keeps every count (0 beyond it)
    block_size, stride = min(block_size, 2 ** 62), min(stride, 2 ** 62)
    if padding == "valid":
        return torch.where(lengths >= block_size, torch.div(lengths - block_size, stride, rounding_mode="floor") + 1,
                           torch.zeros_like(lengths))
    return torch.div(lengths, stride, rounding_mode="floor")


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int,
                          padding: str = "valid") -> torch.Tensor:
    """Offsets of each sequence's compressed tokens in a packed output.

    cu_seqlens: (N+1,) int32/int64, non-decreasing from 0 to T.
    Returns (N+1,) of the same dtype and device; entry k counts the windows
    of sequences 0..k-1. Runs on the device, without a host synchronisation
    (so the values of cu_seqlens are not checked).

    Raises TypeError/ValueError naming block_size, stride, padding or
    cu_seqlens (its type, dtype or shape).
    """
    block_size, stride = check_window_args("compressed_cu_seqlens", block_size, stride, padding)
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
    per group; ``dest`` (T,) stream offset of each token in its row (empty
    when W = 0);
    ``windows`` (W,) row position of each output window; ``W``.

    With no window at all (W = 0) the stream is empty (Tp = Np = R = 0, no
    L - S tail): nothing is ever sized by L alone, which may be any int
    (block_size = 2**40 on 10 tokens gives an empty output, not a 105 TB
    request). Otherwise the stream holds at most about T + N*L tokens per
    row, and a window's L positions are read anyway.

    Malformed cu_seqlens values (possible only when the caller passed
    total_windows, so they were not read on the host) raise ValueError
    naming cu_seqlens where they are detected here.
    """

    def __init__(self, B: int, H: int, G: int, T: int, D: int, *, block_size: int, stride: int,
                 padding: str, cu_seqlens: torch.Tensor | None, device: torch.device):
        L, S = block_size, stride
        self.B, self.H, self.G, self.Hg, self.T, self.D, self.L, self.S = B, H, G, H // G, T, D, L, S
        pre = L - S if padding == "left" else 0
        if cu_seqlens is None:   # one sequence per row: the offsets below in host integers, two aranges
            self.W = _num_windows(T, L, S, padding)
            self.windows = torch.arange(self.W, device=device)             # [W]
            if self.W == 0:
                self._empty(device)
                return
            self.dest = torch.arange(pre, pre + T, device=device)          # [T]
            self.Tp = -(-(pre + T) // S) * S
            self.Np = self.Tp // S
            self.R = self.Hg * B * self.Np
            return
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]                                     # [N]
        extent = torch.div(pre + lengths + S - 1, S, rounding_mode="floor") * S  # [N] stream tokens per sequence
        offset = torch.cumsum(extent, 0) - extent                      # [N] stream start of each sequence
        n_win = _num_windows_tensor(lengths, L, S, padding)            # [N]
        self.W = int(n_win.sum())
        if self.W == 0:
            self.windows = torch.zeros(0, dtype=torch.int64, device=device)
            self._empty(device)
            return
        try:   # negative or mismatched lengths: cu_seqlens was malformed (its values were trusted)
            seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=T)  # [T]
            first = torch.repeat_interleave(torch.cumsum(n_win, 0) - n_win, n_win, output_size=self.W)  # [W]
            start = torch.repeat_interleave(torch.div(offset, S, rounding_mode="floor"), n_win, output_size=self.W)
        except RuntimeError as e:
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T} (its values were trusted because "
                             f"total_windows was given): {e}") from e
        self.dest = offset[seq] + pre + torch.arange(T, device=device) - cu[:-1][seq]  # [T]
        self.windows = start + torch.arange(self.W, device=device) - first              # [W]
        self.Tp = int(extent.sum())
        self.Np = self.Tp // S
        self.R = self.Hg * B * self.Np

    def _empty(self, device) -> None:
        """No window: an empty stream, whatever L is (no token is copied: ``dest`` is empty)."""
        self.dest = torch.zeros(0, dtype=torch.int64, device=device)
        self.Tp = self.Np = self.R = 0

    def to_stream(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Copy x (B, H, T, D), any strides, into the zero-filled stream
        (G, Hg * B * Tp + L - S, D) of ``dtype``; (G, 0, D) when there is no
        window. Differentiable."""
        G, Hg, B, Tp, D = self.G, self.Hg, self.B, self.Tp, self.D
        if self.W == 0:   # still attached to x, so that x gets a (zero, empty) gradient
            return x.new_zeros((G, 0, D), dtype=dtype) + x[:0].sum().to(dtype)
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
