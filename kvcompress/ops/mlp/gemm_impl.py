"""mlp through cuBLAS with the hidden layer stored. Registered as backend
"gemm" (CPU and CUDA; backend="auto" picks it on CUDA only, ahead of
"triton", where ``supports_call`` accepts the call and ``prefer_call``
finds it large enough for cuBLAS to win).

relu (the default activation, the seed's): per group, the windows are
copied once into one group's buffer (M, L*D) in x's dtype (one Triton
launch on CUDA, C strided copies elsewhere; left pads stay zero), and the
first layer is one GEMM, its output in x's dtype; pe's and b1's per-head
constant flat(pe[h]) @ w1[g] + b1[g] enters the GEMM's float32 accumulator
through a few extra columns of the windows and rows of w1
(``_relu_buffers``), b1 alone through cuBLAS's bias epilogue. Then, for
all groups at once, relu in place and the second layer as one batched
GEMM, b2 added in its float32 accumulator. The hidden layer is saved for
the backward (relu's derivative is read from its sign).

gelu and silu: the chunked formulation. With S dividing L, a window is C =
L / S consecutive non-overlapping chunks of S tokens, so

    flat(X_i) @ w1[g] = sum_c chunk_{i + c - P} @ w1[g][c*S*D : (c+1)*S*D]

(P = C - 1 left-pad chunks with padding "left", else 0), and x (B, H, T, D)
seen as (B, H, T // S, S*D) is a plain strided matrix per head (row stride
S*D): the first layer is C batched GEMMs over shifted row ranges, each
accumulating into a float32 pre-activation, with no copy of x. A left pad
chunk is zero, so chunk c of window i takes part only where its source
chunk i + c - P exists. pe and b1 add the same row to every window of head
h, pads included: const[h] = flat(pe[h]) @ w1[g] + b1[g] initialises the
pre-activation. The float32 pre-activation is saved for the backward
(their derivatives need it; rounding it is not in the precision class).

Backward (both): the chunk structure. dx[chunk j] = sum_c dpre_{j - c + P}
@ w1[g][c]^T by C GEMMs into a float32 accumulator (relu: one group's at a
time); dw1[g][c] = sum over windows of chunk^T @ dpre (+ pe's share, pe^T
cs with cs = dpre summed over windows); dh = dy @ w2^T and dw2 = hidden^T @
dy one batched GEMM each.

Layout. The hidden layer and its gradient are stored group-major, (G, B,
Hg, W, F) with Hg = H // G heads per group (M = B * Hg * W rows per group).

Numerics (precision class io-intermediates, docs/semantics.md). Every GEMM
has input-dtype operands, exact products and float32 accumulation; on
CUDA either a float32 output (``out_dtype``) or one rounding of the
float32 result, with ``allow_bf16_reduced_precision_reduction`` switched
off around the calls (``_float32_reductions``), so cuBLAS never reduces
split-K partials in bfloat16. On the CPU the operands are upcast, exactly,
and multiplied in float32 (the same math up to summation order). Rounded
once to the input dtype: relu's hidden layer (the float32 pre-activation,
then relu, which commutes with rounding) and the hidden layer's gradient
dy @ w2^T (then masked, exactly); gelu's and silu's
hidden layer (act of the float32 pre-activation) and dpre. y and every
gradient: float32 sums, one rounding. The products with a float32 operand
(pe's gradient: cs @ w1^T and pe^T @ cs) take it as bfloat16 hi + lo
(residual 2**-16 relative), so no float32 GEMM, and hence no TF32, runs in
a bfloat16 call. float32: plain float32 GEMMs; ``supports_call`` declines
a float32 call on a device where torch would run float32 matmuls in
reduced precision (TF32 on CUDA, ``torch.backends.cuda.matmul.allow_tf32``;
oneDNN's bf16/tf32 modes on the CPU). float16 is not supported: its hidden
layer rounded to float16 can fall into float16's subnormals, an absolute
error the tolerance model does not grant (the Triton backend keeps that
intermediate in tf32). float64 is not supported either (the "torch"
backend serves it).

Memory (u = B * H * W * F hidden units, v = B * H * W * L * D window
elements, e bytes per element of x; ``workspace_bytes``). relu: the
hidden layer (e * u) lives from the forward to the end of the backward;
besides it the forward holds one group's windows (e * v / G) and w1's
augmented copy and the backward one group's hidden-layer gradient, float32 dx accumulator and
(S*D, F) float32 dw1 buffer. At the NSA shape (bfloat16, B = 1, H = G = 4,
T = 131072, F = 4096: u = v = 2**27) that is 256 MiB of hidden layer plus
at most 192 MiB, besides the gradients themselves. gelu and
silu keep a float32 pre-activation (4u) and transient float32 buffers (up
to 12u in all). An x whose tokens are not rows of stride D (keys stored
(B, T, H, D), passed transposed) is copied once to (B, H, T, D) for the
chunk view (and that copy is saved for the backward).

Domain (``supports_call``): dense input (cu_seqlens None), S dividing L,
bfloat16 and float32 (the latter with IEEE float32 matmuls), and on CUDA a
workspace that fits what this process's allocator can still hand out (the
device's total memory less what is allocated and a reserve for the CUDA
context; other processes on the device are not seen; not asked during
CUDA-graph capture). Outside it
backend="auto" picks another backend ("triton", the memory-lean fused
kernel, on CUDA; ``kvcompress.functional.mlp(memory="lean")`` asks for it
outright) and backend="gemm" raises ValueError. Not batch-invariant: cuBLAS
picks its kernels (and summation order) by shape.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..._cache import bounded_put
from ..._windows import _num_windows
from ...backends import register

ACTIVATIONS = ("relu", "gelu", "silu")
DTYPES = (torch.bfloat16, torch.float32)

# what the property suite may draw for this backend (kvcompress.testing.Domain's
# fields, as plain data: the runtime never imports the suite)
DOMAIN = dict(inputs=("batched",), strides="divides", dtypes=("float32", "bfloat16"),
              precision="io-intermediates")


# --------------------------------------------------------------------------- domain


def _ieee_float32(device: torch.device) -> bool:
    """Whether torch runs float32 matmuls on ``device`` in full float32 (no
    TF32 on CUDA, no oneDNN bf16/tf32 mode on the CPU)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def preactivation_bytes(x: torch.Tensor, w1: torch.Tensor, *, block_size: int, stride: int, padding: str) -> int:
    """Bytes of a float32 pre-activation, 4 * B * H * W * F, for x
    (B, H, T, D) and w1 (G, L*D, F)."""
    B, H, T = x.shape[:3]
    return 4 * B * H * _num_windows(T, block_size, stride, padding) * w1.shape[2]


def workspace_bytes(x: torch.Tensor, w1: torch.Tensor, *, block_size: int, stride: int, padding: str,
                    activation: str = "relu") -> int:
    """The most memory a call allocates beyond its inputs, output, dy and
    gradients, x (B, H, T, D), w1 (G, L*D, F): with u = B * H * W * F hidden
    units, v = B * H * W * L * D window elements, e x's element size and
    one group's chunked tokens n = B * (H / G) * N * S * D (N = W + C - 1 -
    P chunks read), relu holds the hidden layer (e * u) from the forward to
    the end of the backward, plus the larger of one group's windows and
    w1 augmented by pe's constant (forward, e * (v / G + L * D * F)) and
    the backward's per-group buffers (the hidden
    layer's gradient e * u / G, the float32 dx accumulator 4 * n, a float32
    (S*D, F) dw1 buffer, and a copy of the group's tokens e * n when x's
    tokens are not rows of stride D); gelu and silu 12 * u (float32
    pre-activation, its float32 gradient and the hidden layer, transiently
    its float32 activation). An estimate, not a promise: the allocator's
    rounding and cuBLAS's workspace come on top."""
    B, H, T, D = x.shape
    L, S, G, F_ = block_size, stride, w1.shape[0], w1.shape[2]
    W = _num_windows(T, L, S, padding)
    u, v, e = B * H * W * F_, B * H * W * L * D, x.element_size()
    if activation != "relu":
        return 12 * u
    C = L // S
    n = B * (H // G) * (W + C - 1 - (C - 1 if padding == "left" else 0)) * S * D
    return e * u + max(e * (v // G + L * D * F_), e * u // G + 4 * n + 4 * S * D * F_ + e * n)


# what the CUDA context and cuBLAS's workspaces take outside the caching allocator, kept free
CONTEXT_RESERVE = 1 << 30


def _free_bytes(device: torch.device) -> int:
    """Bytes this process's caching allocator can still hand out on a CUDA
    ``device``: the device's total memory less what it has handed out and
    CONTEXT_RESERVE. Host-side counters only: cudaMemGetInfo, the driver's
    count (which would also see other processes), waits for the device, and
    asked once per call it serialised the host with the GPU (H200 run 55:
    the host took 2.25 ms to issue a 2.3 ms forward). The counter is read
    from ``torch.cuda.memory_stats_as_nested_dict``: ``memory_allocated``
    reads the same number but first flattens and sorts all ~120 statistics
    into strings, about 55 us of Python a call (timed on the CPU on a dict
    of the same shape)."""
    total = torch.cuda.get_device_properties(device).total_memory
    allocated = torch.cuda.memory_stats_as_nested_dict(device).get("allocated_bytes", {}).get("all", {})
    return total - allocated.get("current", 0) - CONTEXT_RESERVE


def supports_call(x, w1, b1, w2, b2, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
                  activation="relu", **_) -> bool:
    """The registry's per-call predicate (arguments already validated): dense
    input, stride dividing block_size, float32 only with IEEE float32 matmuls
    (on the CPU every call computes in float32), and on CUDA a workspace
    (``workspace_bytes``) that fits in the memory this process's allocator
    can still hand out (``_free_bytes``; the hidden layer "would not fit"
    otherwise: backend="auto" then takes the
    memory-lean fused Triton kernel); not while torch.compile traces the
    call (its GEMMs write float32 outputs in place, out_dtype with out=,
    which fake tensors reject: H200 run 46), so a compiled mlp keeps the
    Triton backend's custom op. During CUDA-graph capture the memory
    is not asked (the eager warm-up before a capture made the choice)."""
    if torch.compiler.is_compiling():
        return False
    if cu_seqlens is not None or block_size % stride != 0:
        return False
    if (x.dtype == torch.float32 or x.device.type == "cpu") and not _ieee_float32(x.device):
        return False
    return _fits(x.device, lambda: workspace_bytes(x, w1, block_size=block_size, stride=stride, padding=padding,
                                                    activation=activation))


# backend="auto" takes gemm on CUDA only when one group's first layer is at least this many FLOPs
# (2 * B * Hg * W * L*D * F): below it the fused Triton kernel is faster, gemm's per-group host work not
# hidden by its GEMMs. H200 runs 68-69 (tree 65a7ad5, after gemm's host path was cut; B = 1, G = H = 4,
# F = L*D; forward / forward + backward): per-group 1.7e10 FLOPs (D = 128, T = 8192) triton 0.387 / 1.56 ms
# against gemm 0.600 / 3.72; 3.9e10 (D = 192, T = 8192) triton 0.81 / 2.91 against 1.18 / 4.90; 1.4e11
# (D = 128, T = 65536) gemm 1.15 / 3.57 against triton 1.61 / 6.26 (runs 66-67, before the cut: triton
# faster there, hence the earlier 2e11). The threshold lies between 3.9e10 and 1.4e11, near their geometric
# mean.
AUTO_MIN_GROUP_FLOPS = 7e10


def group_flops(x, w1, *, block_size: int, stride: int, padding: str) -> int:
    """FLOPs of one group's first layer, 2 * B * (H / G) * W * L*D * F, for x
    (B, H, T, D) and w1 (G, L*D, F)."""
    B, H, T = x.shape[:3]
    G, LD, F_ = w1.shape
    return 2 * B * (H // G) * _num_windows(T, block_size, stride, padding) * LD * F_


def prefer_call(x, w1, b1, w2, b2, *, block_size, stride, padding="valid", **_) -> bool:
    """The registry's ``prefer`` (backend="auto" only): gemm where one
    group's first layer reaches AUTO_MIN_GROUP_FLOPS, else the next backend
    (the fused Triton kernel on CUDA). backend="gemm" ignores it."""
    return group_flops(x, w1, block_size=block_size, stride=stride, padding=padding) >= AUTO_MIN_GROUP_FLOPS


def _fits(device: torch.device, need) -> bool:
    """Whether ``need()`` bytes fit in what a CUDA device's allocator can hand out (always on
    another device, and during CUDA-graph capture)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return True
    return need() <= _free_bytes(device)


# --------------------------------------------------------------------------- GEMMs


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (n, m, p) = [out +] a (n, m, k) @ b (n, k, p), in place.

    a and b share a dtype (the input's); out is float32 (or a's dtype when
    that is float32). Half operands: exact products, float32 sums and
    output (cuBLAS with out_dtype on CUDA; upcast operands on the CPU, which
    has no such kernel: bfloat16 -> float32 is exact)."""
    if a.dtype != out.dtype:
        if out.is_cuda:
            if accumulate:
                torch.baddbmm(out, a, b, out.dtype, out=out)
            else:
                torch.bmm(a, b, out.dtype, out=out)
            return
        a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        torch.baddbmm(out, a, b, out=out)
    else:
        torch.bmm(a, b, out=out)


def _split(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A float32 tensor as (hi, lo) in a half ``dtype``, t = hi + lo to about
    2**-16 relative (bfloat16): two half GEMM operands standing for a float32
    one."""
    hi = t.to(dtype)
    return hi, (t - hi.to(t.dtype)).to(dtype)


def _gemm_mixed(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """_gemm where one of a, b is in out's (float32) dtype and the other in the
    input dtype: on CUDA the float32 one is split into half hi + lo (two half
    GEMMs, no TF32); on the CPU the half one is upcast."""
    if a.dtype == b.dtype:
        return _gemm(out, a, b, accumulate)
    if not out.is_cuda:
        return _gemm(out, a.to(out.dtype), b.to(out.dtype), accumulate)
    if a.dtype == out.dtype:
        for k, part in enumerate(_split(a, b.dtype)):
            _gemm(out, part, b, accumulate or k > 0)
    else:
        for k, part in enumerate(_split(b, a.dtype)):
            _gemm(out, a, part, accumulate or k > 0)


def _pairs(*ts: torch.Tensor, merge: bool) -> list[tuple[torch.Tensor, ...]]:
    """The 3-D operands of a per-head product, matched batch by batch.

    ts: tensors (G, B, Hg, ., .) (group-major; x's chunks enter as
    ``xs.transpose(0, 1)``), head h = g * Hg + i. Returns a list of tuples,
    one 3-D batch (G, ., .) of each tensor, batch j in group j: one tuple
    per (batch row b, head of the group i). With ``merge`` and one group
    (one weight for every head), a single tuple of (B * Hg, ., .) batches
    where every tensor's (B, Hg) dims merge (the caller expands the weight
    over it)."""
    G, B, Hg = ts[0].shape[:3]
    if merge and G == 1:
        try:
            return [tuple(t[0].view(B * Hg, *t.shape[3:]) for t in ts)]
        except RuntimeError:      # x's (B, H) strides do not merge: one product per head
            pass
    return [tuple(t[:, b, i] for t in ts) for b in range(B) for i in range(Hg)]


def _weight(w: torch.Tensor, n: int) -> torch.Tensor:
    """A group weight (G, k, p) for n batches: itself, or expanded (stride 0)
    when a merged pair spans every head of the single group."""
    return w if w.shape[0] == n else w.expand(n, *w.shape[1:])


# --------------------------------------------------------------------------- pieces


class _Shape:
    """The sizes of one call: B, H, T, D, G, Hg, L, S, C = L / S chunks,
    K = S * D, P left-pad chunks, W windows, N chunks read, F, DO, acc."""

    def __init__(self, x, w1, w2, block_size, stride, padding):
        self.B, self.H, self.T, self.D = x.shape
        self.G, _, self.F = w1.shape
        self.DO = w2.shape[2]
        self.Hg = self.H // self.G
        self.L, self.S = block_size, stride
        self.C, self.K = block_size // stride, stride * self.D
        self.P = self.C - 1 if padding == "left" else 0
        self.W = _num_windows(self.T, block_size, stride, padding)
        self.N = self.W + self.C - 1 - self.P
        self.M = self.B * self.Hg * self.W
        self.acc = torch.float32

    def rows(self, c: int) -> tuple[int, int, int]:
        """Chunk c of the windows: (i0, r0, n): windows i0 .. i0 + n - 1 read
        x's chunks r0 .. r0 + n - 1 (window i, chunk c reads chunk i + c - P;
        the windows whose source is a left pad are left out: n = 0 when
        there are no more than P - c windows)."""
        i0 = min(max(0, self.P - c), self.W)
        return i0, i0 - self.P + c, self.W - i0


def _chunkable(x: torch.Tensor, sh: _Shape) -> torch.Tensor:
    """x's first N * S tokens in a layout whose chunks are rows: x itself (a
    view) when its tokens are rows of stride D, else one contiguous copy."""
    xt = x[:, :, : sh.N * sh.S]
    return xt if _rows_view(xt, sh) is not None else xt.contiguous()


def _chunks(xt: torch.Tensor, sh: _Shape) -> torch.Tensor:
    """(B, H, N*S, D) chunkable tokens -> (B, G, Hg, N, S*D), a view."""
    return xt.view(sh.B, sh.G, sh.Hg, sh.N, sh.K)


def _constant(w1, b1, pe, sh: _Shape) -> torch.Tensor | None:
    """What every window of head h = g * Hg + i adds to its pre-activation:
    (G, Hg, F) flat(pe[h]) @ w1[g] + b1[g] in float32 ((G, 1, F) for b1
    alone; None for neither)."""
    if pe is None:
        return None if b1 is None else b1.to(sh.acc)[:, None]
    const = w1.new_empty((sh.G, sh.Hg, sh.F), dtype=sh.acc)
    _gemm(const, pe.reshape(sh.G, sh.Hg, sh.L * sh.D), w1, False)
    if b1 is not None:
        const += b1.to(sh.acc)[:, None]
    return const


def _activate(pre: torch.Tensor, act: str, dtype: torch.dtype) -> torch.Tensor:
    """act(pre) rounded once to ``dtype`` (a new tensor; NaN stays NaN).
    relu commutes with rounding, so it runs on the rounded copy (two passes
    over the narrow copy: on an H200 0.32 ms at the NSA shape, against 0.52
    for one torch.maximum writing bfloat16 from float32)."""
    if act == "relu":
        return pre.to(dtype, copy=True).clamp_min_(0)
    out = F.gelu(pre, approximate="none") if act == "gelu" else F.silu(pre)
    return out.to(dtype)


def _act_backward_(dh: torch.Tensor, pre: torch.Tensor, act: str) -> torch.Tensor:
    """dh * act'(pre), in place in dh (float32)."""
    if act == "relu":
        return torch.ops.aten.threshold_backward.grad_input(dh, pre, 0, grad_input=dh)
    if act == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(dh, pre, approximate="none", grad_input=dh)
    return torch.ops.aten.silu_backward.grad_input(dh, pre, grad_input=dh)


def _forward(xt, w1, b1, w2, b2, pe, sh: _Shape, act: str, keep_pre: bool):
    """y (B, H, W, DO) in x's dtype, and the float32 pre-activation
    (G, B, Hg, W, F) if keep_pre (else None). xt: _chunkable(x)."""
    dt = xt.dtype
    xs = _chunks(xt, sh).transpose(0, 1)                                      # [G, B, Hg, N, K] view
    w1c = w1.unflatten(1, (sh.C, sh.K))                                       # [G, C, K, F] view
    const = _constant(w1, b1, pe, sh)
    pre = xt.new_empty((sh.G, sh.B, sh.Hg, sh.W, sh.F), dtype=sh.acc)
    if const is not None:
        pre.copy_(const[:, None, :, None, :].expand_as(pre))
    # the last chunk first: it reaches every window (left pads only ever cut the first ones)
    for k, c in enumerate(reversed(range(sh.C))):
        i0, r0, n = sh.rows(c)
        if n == 0:
            continue
        for a, m in _pairs(xs[:, :, :, r0: r0 + n], pre[:, :, :, i0:], merge=True):   # [G or B*Hg, n, K / F]
            _gemm(m, a, _weight(w1c[:, c], m.shape[0]), accumulate=const is not None or k > 0)
    hidden = _activate(pre, act, dt).view(sh.G, sh.M, sh.F)
    if not keep_pre:
        del pre
        pre = None
    y32 = xt.new_empty((sh.G, sh.M, sh.DO), dtype=sh.acc)
    _gemm(y32, hidden, w2, False)
    del hidden
    if b2 is not None:
        y32 += b2.to(sh.acc)[:, None]
    y = xt.new_empty((sh.B, sh.H, sh.W, sh.DO))
    y.view(sh.B, sh.G, sh.Hg, sh.W, sh.DO).copy_(y32.view(sh.G, sh.B, sh.Hg, sh.W, sh.DO).transpose(0, 1))
    return y, pre


def _backward(dy, xt, w1, b1, w2, pe, pre, sh: _Shape, act: str, need):
    """Gradients (dx, dw1, db1, dw2, db2, dpe), None where not needed. dy
    (B, H, W, DO); xt: _chunkable(x), its first N * S tokens; pre (G, B, Hg,
    W, F) float32; need: six bools in that order. dx has x's shape (B, H, T,
    D), zero on the tokens no window reads."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_pe = need
    dt, acc = xt.dtype, sh.acc
    G, B, Hg, W, F_, C, K = sh.G, sh.B, sh.Hg, sh.W, sh.F, sh.C, sh.K
    dx = dw1 = db1 = dw2 = db2 = dpe = None
    dyg = dy.view(B, G, Hg, W, sh.DO).transpose(0, 1).reshape(G, sh.M, sh.DO)     # group-major rows
    if need_b2:
        db2 = dyg.sum(1, dtype=acc).to(dt)
    if need_w2:
        hidden = _activate(pre, act, dt).view(G, sh.M, F_)          # recomputed, rounded as the forward did
        dw2_32 = dy.new_empty((G, F_, sh.DO), dtype=acc)
        _gemm(dw2_32, hidden.mT, dyg, False)
        del hidden
        dw2 = dw2_32.to(dt)
    if not (need_x or need_w1 or need_b1 or need_pe):
        return dx, dw1, db1, dw2, db2, dpe
    dpre = dy.new_empty((G, sh.M, F_), dtype=acc)
    _gemm(dpre, dyg, w2.mT, False)                                               # dh = dy @ w2^T
    _act_backward_(dpre, pre.view(G, sh.M, F_), act)                             # dpre = dh * act'(pre)
    cs = None
    if need_b1 or need_pe or (need_w1 and pe is not None):
        cs = dpre.view(G, B, Hg, W, F_).sum((1, 3))                               # [G, Hg, F] float32
    if need_b1:
        db1 = cs.sum(1).to(dt)
    dp = dpre.to(dt).view(G, B, Hg, W, F_)                                       # rounded once: the GEMM operand
    del dpre
    w1c = w1.unflatten(1, (C, K))                                                # [G, C, K, F]
    if need_x:
        dx32 = dy.new_empty((G, B, Hg, sh.N, K), dtype=acc)
        for k, c in enumerate(reversed(range(C))):
            i0, r0, n = sh.rows(c)
            if n == 0:
                continue
            if k == 0 and r0 > 0:           # chunks before the last chunk's first source: written by the others only
                dx32[:, :, :, :r0].zero_()
            for d, x_ in _pairs(dp[:, :, :, i0:], dx32[:, :, :, r0: r0 + n], merge=True):
                _gemm(x_, d, _weight(w1c[:, c].mT, d.shape[0]), accumulate=k > 0)   # [., n, K]
        dx = xt.new_empty((B, sh.H, sh.T, sh.D))
        dx[:, :, sh.N * sh.S:] = 0                                                 # tokens no window reads
        dx[:, :, : sh.N * sh.S].view(B, G, Hg, sh.N, K).copy_(dx32.transpose(0, 1))
        del dx32
    if need_w1:
        xs = _chunks(xt, sh).transpose(0, 1)                                      # [G, B, Hg, N, K]
        dw1_32 = dy.new_empty((G, C, K, F_), dtype=acc)
        for c in range(C):
            i0, r0, n = sh.rows(c)
            pairs = _pairs(xs[:, :, :, r0: r0 + n], dp[:, :, :, i0:], merge=False) if n > 0 else []
            if not pairs:        # no window reads a real chunk through block c (or no batch row)
                dw1_32[:, c].zero_()
            for j, (a, m) in enumerate(pairs):
                _gemm(dw1_32[:, c], a.mT, m, accumulate=j > 0)      # summed over batch rows and heads of the group
        if pe is not None:   # const = flat(pe[h]) @ w1[g]: dw1[g] += sum_i flat(pe[h])^T cs[h]
            _gemm_mixed(dw1_32.view(G, C * K, F_), pe.reshape(G, Hg, -1).mT, cs, True)
        dw1 = dw1_32.view(G, C * K, F_).to(dt)
    if need_pe:              # dpe[h] = w1[g] @ cs[h]
        dpe32 = dy.new_empty((G, Hg, C * K), dtype=acc)
        _gemm_mixed(dpe32, cs, w1.mT, False)
        dpe = dpe32.view(sh.H, sh.L, sh.D).to(dt)
    return dx, dw1, db1, dw2, db2, dpe


# --------------------------------------------------------------------------- relu: one GEMM per group


@contextlib.contextmanager
def _float32_reductions(device: torch.device):
    """cuBLAS keeps every reduction in float32 inside: a half-output GEMM may
    otherwise reduce split-K partials in the output dtype
    (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``,
    on by default), a sum carried in bfloat16 that neither precision class
    allows. The flag is global: restored on exit."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    old = m.allow_bf16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = old


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype: x's on CUDA (bfloat16 operands, float32
    accumulation), float32 on the CPU (exact upcasts; no bfloat16 kernel
    there promises one rounding)."""
    return x.dtype if x.is_cuda else torch.float32


def _token_chunks(x, sh: _Shape) -> torch.Tensor:
    """x's first N * S tokens as (G, B, Hg, N, S, D): a view, whatever x's
    strides (a (B, T, H, D) tensor passed transposed included)."""
    return x[:, :, : sh.N * sh.S].unflatten(2, (sh.N, sh.S)).unflatten(1, (sh.G, sh.Hg)).transpose(0, 1)


# "auto": the windows are copied by one Triton launch per group on CUDA (kvcompress/ops/mlp/_window_copy.py),
# by torch elsewhere; "on": also under Triton's interpreter on the CPU (tests); "off": torch everywhere
WINDOW_KERNEL = "auto"


def _window_kernel(x: torch.Tensor, cd: torch.dtype) -> bool:
    """Whether ``_windows`` copies with the Triton kernel (WINDOW_KERNEL)."""
    if WINDOW_KERNEL == "off" or x.dtype != cd or torch.compiler.is_compiling():
        return False
    from ..._optional import has_triton
    if not has_triton():
        return False
    from .._triton.env import INTERPRET
    return x.is_cuda or (WINDOW_KERNEL == "on" and INTERPRET and x.device.type == "cpu")


def _windows(x, sh: _Shape, g: int, out: torch.Tensor, kernel: bool) -> None:
    """Group g's windows into the first L * D columns of ``out`` (M, K_a),
    K_a >= L * D: window i, chunk c is x's chunk i + c - P, copied exactly,
    reading x where it lies (no copy of x): one Triton launch with
    ``kernel`` (``_window_kernel``; it also writes the left pads' zeros), else
    C strided torch copies (the left pads' entries are not written: zero
    since ``_relu_buffers``)."""
    if kernel:
        from ._window_copy import copy_windows
        copy_windows(x[:, g * sh.Hg: (g + 1) * sh.Hg], out, W=sh.W, L=sh.L, S=sh.S, P=sh.P)
        return
    view = out[:, : sh.L * sh.D].view(sh.B, sh.Hg, sh.W, sh.C, sh.S, sh.D)
    xs = _token_chunks(x, sh)[g]                                             # [B, Hg, N, S, D]
    for c in range(sh.C):
        i0, r0, n = sh.rows(c)
        if n > 0:
            view[:, :, i0:, c].copy_(xs[:, :, r0: r0 + n])


def _relu_buffers(x, sh: _Shape, cd, const, kernel: bool):
    """One group's buffers in ``cd``, reused across groups: the windows (M,
    K_a), w1 augmented (K_a, F) when there is a per-head constant (else
    None), and the number of const's pieces. With const (G, Hg, F) float32
    (pe's and b1's share), K_a = L*D + the constant's columns rounded up to 8
    (cuBLAS's 16-byte alignment): window row of head i has ones in columns
    L*D + p*Hg + i for each of const's pieces p (``_const_pieces``), and
    one group's w1 augmented (K_a, F), whose rows there hold the pieces, so
    the GEMM adds const[g, i] in its float32 accumulator, to float32
    accuracy (b1 alone, exact in x's dtype, goes through the bias epilogue
    instead). Entries that ``_windows`` does not write (left pads where
    torch copies, unused columns) are zero."""
    LD = sh.L * sh.D
    npieces = 0 if const is None else (1 if cd == const.dtype else 3)
    ka = LD if const is None else LD + -(-npieces * sh.Hg // 8) * 8
    win = x.new_empty((sh.M, ka), dtype=cd)
    if sh.P > 0 and not kernel:                          # the torch copies leave the left pads unwritten
        win[:, :LD].zero_()
    if const is not None:                                # the ones and zeros of the extra columns: one copy
        win[:, LD:].view(sh.B, sh.Hg, sh.W, ka - LD).copy_(_ones_columns(sh.Hg, npieces, ka - LD, cd,
                                                                          x.device)[:, None])
    w1a = None if const is None else x.new_zeros((ka, sh.F), dtype=cd)
    return win, w1a, npieces


def _const_pieces(const, cd, npieces: int) -> torch.Tensor | None:
    """const (G, Hg, F) float32 as (G, npieces * Hg, F) in ``cd``, piece p of
    head i in row p * Hg + i: terms whose float32 sum is const (const
    itself for float32; for bfloat16 hi + mid + lo, 8 bits of mantissa
    each: all 24 of float32's, barring underflow), each rounded to nearest
    from the float32 residual of the ones before. Built for every group at
    once, in 2 * npieces - 1 calls (it took 10): the rows that
    ``_forward_relu`` copies into each group's augmented w1."""
    if const is None:
        return None
    G, Hg, F_ = const.shape
    out = const.new_empty((G, npieces * Hg, F_), dtype=cd)
    r = const
    for p, piece in enumerate(out.view(G, npieces, Hg, F_).unbind(1)):
        piece.copy_(r)                                   # rounded to nearest (exact for float32)
        if p + 1 < npieces:
            r = r - piece                                # float32: the residual, exact
    return out


_ONES: dict[tuple, torch.Tensor] = {}


def _ones_columns(hg: int, npieces: int, width: int, cd: torch.dtype, device: torch.device) -> torch.Tensor:
    """(hg, width) in ``cd``: row i has ones in columns p * hg + i for p <
    npieces, zeros elsewhere (the extra columns of a window row of head i,
    ``_relu_buffers``). Built once per (sizes, dtype, device): the former
    per-(piece, head) fills were 3 * hg torch calls of host time a forward
    (the gemm backend is host-bound at every record size, H200 runs 66-67);
    built afresh, not kept, during CUDA-graph capture (the capture's memory
    pool owns what it allocates)."""
    key = (hg, npieces, width, cd, device)
    ones = _ONES.get(key)
    if ones is None:
        ones = torch.zeros((hg, width), dtype=cd, device=device)
        ones[:, : npieces * hg] = torch.eye(hg, dtype=cd, device=device).repeat(1, npieces)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            bounded_put(_ONES, key, ones, 64)            # one entry per shape class in practice
    return ones


def _forward_relu(x, w1, b1, w2, b2, pe, sh: _Shape):
    """y (B, H, W, DO) in x's dtype and the hidden layer (G, M, F) in x's
    dtype. Per group g: its windows (exact copies of x's tokens, one
    group's buffer, reused) and one GEMM hidden[g] = windows @ w1[g] +
    const[g] with const = flat(pe[h]) @ w1[g] + b1[g] in the float32
    accumulator (``_relu_buffers``, ``_const_pieces``; b1 alone through
    the bias epilogue), one rounding; then, for every group at once, relu
    in place (it commutes with rounding and keeps NaN, which cuBLAS's relu
    epilogue, max(x, 0), need not) and y = hidden @ w2 + b2 in one batched
    GEMM (b2, exact in x's dtype, added in its float32 accumulator). The
    pre-activation is exact up to float32 accumulation, so relu's
    derivative, read from the hidden layer's sign, is what float32 gives:
    rounding x + pe to bfloat16 first (the seed's order) moves near-zero
    pre-activations across 0 and made the gradients' RMS error 13x larger
    (3.4e-2 against 2.6e-3 at the NSA shape, H200 run 52). x: (B, H, T,
    D), any strides."""
    dt, cd = x.dtype, _compute_dtype(x)
    G, M, F_, DO, LD = sh.G, sh.M, sh.F, sh.DO, sh.L * sh.D
    const = None if pe is None else _constant(w1, b1, pe, sh)                 # [G, Hg, F] float32
    kernel = _window_kernel(x, cd)                                             # decided once per call
    win, w1a, npieces = _relu_buffers(x, sh, cd, const, kernel)
    pieces = _const_pieces(const, cd, npieces)                                 # [G, npieces * Hg, F]
    w1_ = w1.to(cd)
    hidden = x.new_empty((G, M, F_), dtype=dt)
    h32 = None if cd == dt else x.new_empty((M, F_), dtype=cd)                # CPU: float32, then rounded once
    bias1 = b1.to(cd).unbind(0) if const is None and b1 is not None else None
    if w1a is not None:
        pieces = pieces.unbind(0)
        w1a_w, w1a_p = w1a[:LD], w1a[LD: LD + npieces * sh.Hg]              # w1's rows, const's pieces' rows
    with _float32_reductions(x.device):
        for g, (hg, w1g) in enumerate(zip(hidden.unbind(0), w1_.unbind(0))):
            _windows(x, sh, g, win, kernel)
            out = hg if h32 is None else h32
            if w1a is not None:
                w1a_w.copy_(w1g)
                w1a_p.copy_(pieces[g])
                torch.mm(win, w1a, out=out)
            elif bias1 is None:
                torch.mm(win, w1g, out=out)
            else:
                torch.addmm(bias1[g], win, w1g, out=out)
            if h32 is not None:
                hg.copy_(h32)
        del win, w1a, h32
        hidden.relu_()
        hc, w2_ = hidden.to(cd), w2.to(cd)
        y = torch.bmm(hc, w2_) if b2 is None else torch.baddbmm(b2.to(cd)[:, None], hc, w2_)
        del hc
    y = y.to(dt)
    if sh.B == 1:                  # group-major (G, Hg, W) rows are (H, W)
        return y.view(1, sh.H, sh.W, DO), hidden
    return y.view(G, sh.B, sh.Hg, sh.W, DO).transpose(0, 1).reshape(sh.B, sh.H, sh.W, DO), hidden


def _rows_view(xg, sh: _Shape):
    """xg (B, Hg, T, D)'s first N chunks as rows (B, Hg, N, S*D), a view,
    or None when its tokens are not rows of stride D."""
    try:
        return xg[:, :, : sh.N * sh.S].view(xg.shape[0], xg.shape[1], sh.N, sh.K)
    except RuntimeError:
        return None


def _group_rows(xg, sh: _Shape, cd: torch.dtype, buf, kernel: bool) -> torch.Tensor:
    """One group's tokens xg (B, Hg, T, D), which are not rows of stride D
    (``_rows_view`` gave None), as chunk rows (B, Hg, N, S*D) in ``cd``:
    copied into ``buf`` (B * Hg * N, S*D) (with ``kernel``, the Triton
    window kernel with L = S: torch's strided copy of a (B, T, H, D) x ran
    at a third of the bandwidth), or a new tensor (the CPU's float32
    upcast)."""
    if buf is None:
        return _rows_view(xg.to(cd, memory_format=torch.contiguous_format), sh)
    if kernel:
        from ._window_copy import copy_windows
        copy_windows(xg, buf, W=sh.N, L=sh.S, S=sh.S, P=0)
    else:
        buf.view(sh.B, sh.Hg, sh.N * sh.S, sh.D).copy_(xg[:, :, : sh.N * sh.S])
    return buf.view(sh.B, sh.Hg, sh.N, sh.K)


def _store_rows(rows32, dxg, v, sh: _Shape, kernel: bool) -> None:
    """One group's float32 chunk-row sums (B, Hg, N, S*D) rounded once into
    dxg (B, Hg, T, D)'s first N * S tokens, any strides: a copy into v, its
    chunk rows, when its tokens are rows of stride D (``_rows_view``), else
    the Triton kernel with ``kernel`` (``_window_kernel``), else torch's
    strided copy."""
    if v is not None:
        v.copy_(rows32)
    elif kernel:
        from ._window_copy import rows_to_tokens
        rows_to_tokens(rows32.view(-1, sh.K), dxg, N=sh.N, S=sh.S)
    else:
        dxg[:, :, : sh.N * sh.S].copy_(rows32.view(sh.B, sh.Hg, sh.N * sh.S, sh.D))


def _backward_relu(dy, x, w1, b1, w2, pe, hidden, sh: _Shape, need):
    """_backward's gradients for relu from the stored hidden layer (G, M, F)
    in x's dtype, one group at a time (the hidden layer's gradient exists
    for one group only): dh = dy @ w2[g]^T rounded once to x's dtype (the
    hidden layer's gradient, io-intermediates) and masked where hidden <= 0
    (the pre-activation's gradient, exact); dw2 = hidden^T @ dy one batched
    GEMM (rounded once); dx by C chunk GEMMs into one group's float32
    accumulator; dw1 per chunk into a float32 (S*D, F) buffer, plus pe's
    share, reading x's chunk rows (copied, one group's worth, when x's
    tokens are not rows of stride D); db1 and dpe from the gradient summed
    over windows in float32. x: (B, H, T, D), any strides.

    Host time: the per-group buffers are allocated once and their per-chunk
    views taken once, before the loop over groups, which then makes about
    5 + 3C calls of torch or Triton a group with x, w1 and pe needing
    gradients (and a view or two per call); it made about 100 calls a group,
    most of them views (H200 runs 66-67: the backend was host-bound at
    every record size)."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_pe = need
    dt, cd, acc = x.dtype, _compute_dtype(x), sh.acc
    kernel = _window_kernel(x, cd)                                            # decided once per call
    G, B, Hg, W, F_, C, K, N, M = sh.G, sh.B, sh.Hg, sh.W, sh.F, sh.C, sh.K, sh.N, sh.M
    nb = B * Hg
    dx = dw1 = db1 = dw2 = db2 = dpe = None
    # group-major rows (G, M, DO): dy itself when B = 1
    dyg = dy.view(G, M, sh.DO) if B == 1 else dy.view(B, G, Hg, W, sh.DO).transpose(0, 1).reshape(G, M, sh.DO)
    dyg = dyg.to(cd)
    if need_b2:
        db2 = dyg.sum(1, dtype=acc).to(dt)
    with _float32_reductions(x.device):
        if need_w2:
            dw2 = torch.bmm(hidden.to(cd).mT, dyg).to(dt)
        if not (need_x or need_w1 or need_b1 or need_pe):
            return dx, dw1, db1, dw2, db2, dpe
        w1c = w1.to(cd).view(G, C, K, F_)                                     # [G, C, K, F]
        pec = None if pe is None else pe.reshape(G, Hg, C, K)
        cs = dy.new_empty((G, Hg, F_), dtype=acc)                             # the gradient summed over windows
        dp = dy.new_empty((M, F_), dtype=cd)                                  # one group's dh, then dpre
        dp4 = dp.view(B, Hg, W, F_)
        spans = [(c, *sh.rows(c)) for c in reversed(range(C))]                # (c, i0, r0, n): the last chunk first
        # per group, lists from one call each instead of an index per use
        dyg_, w2t_, hid_, cs_ = dyg.unbind(0), w2.to(cd).mT.unbind(0), hidden.unbind(0), cs.unbind(0)
        if need_x:
            # in x's layout (a (B, T, H, D) x gets a gradient of its strides): autograd then takes it as x.grad
            # instead of copying it into one (a second x-sized buffer and a strided copy: 0.17 ms, run 54)
            dx = torch.empty_like(x)
            dx[:, :, N * sh.S:] = 0                                           # tokens no window reads
            dx_groups = dx.split(Hg, dim=1)
            dx_rows = _rows_view(dx, sh)
            dx_rows = [None] * G if dx_rows is None else dx_rows.split(Hg, dim=1)
            dx32 = dy.new_empty((B, Hg, N, K), dtype=acc)                     # one group's accumulator
            # the first GEMM writes, the others add; chunks before the last chunk's first source are written by
            # the others only (their rows are zeroed first)
            r0 = spans[0][2]
            lead = dx32[:, :, :r0] if r0 > 0 else None
            w1t = w1c.transpose(2, 3)[:, :, None].expand(G, C, nb, F_, K).unbind(0)   # [C, nb, F, K]: w1[g][c]^T
            dx_ops = [(k, c, dp.view(nb, W, F_)[:, i0:], dx32.view(nb, N, K)[:, r0: r0 + n])
                      for k, (c, i0, r0, n) in enumerate(spans) if n > 0]
        if need_w1:
            dw1 = w1.new_empty(w1.shape).view(G, C, K, F_)
            dw1_ = dw1.unbind(0)
            part = dy.new_empty((1, K, F_), dtype=acc)
            part0 = part[0]
            x_rows = _rows_view(x, sh)
            if x_rows is None:
                rows = None if cd != dt else x.new_empty((B * Hg * N, K))    # one group's tokens as chunk rows
                x_groups = x.split(Hg, dim=1)
            else:
                x_rows = x_rows.split(Hg, dim=1)
            pec_ = None if pec is None else pec.unbind(0)
            # per chunk c: dp's rows of each (batch row, head) pair, windows i0 ..
            dw_ops = [(c, r0, n, [dp4[b: b + 1, i, i0:] for b in range(B) for i in range(Hg)] if n > 0 else [])
                      for c, i0, r0, n in sorted(spans)]
        for g in range(G):
            torch.mm(dyg_[g], w2t_[g], out=dp)                                # dh, rounded once
            if cd != dt:
                dp.copy_(dp.to(dt))                                           # CPU: rounded as on CUDA
            hg = hid_[g]
            torch.ops.aten.threshold_backward.grad_input(dp, hg if cd == dt else hg.to(cd), 0, grad_input=dp)
            torch.sum(dp4, (0, 2), dtype=acc, out=cs_[g])
            if need_x:
                if lead is not None:
                    lead.zero_()
                w1g = w1t[g]
                for k, c, d, x_ in dx_ops:
                    _gemm(x_, d, w1g[c], accumulate=k > 0)
                _store_rows(dx32, dx_groups[g], dx_rows[g], sh, kernel)
            if need_w1:
                if x_rows is not None:                                        # [B, Hg, N, K]
                    xs = x_rows[g] if cd == dt else x_rows[g].to(cd)
                else:
                    xs = _group_rows(x_groups[g], sh, cd, rows, kernel)
                for c, r0, n, dps in dw_ops:
                    if not dps:          # no window reads a real chunk through block c (or no batch row)
                        part.zero_()
                    for j, m in enumerate(dps):
                        b, i = divmod(j, Hg)
                        _gemm(part, xs[b: b + 1, i, r0: r0 + n].mT, m, accumulate=j > 0)   # summed over pairs
                    if pec is None:
                        dw1_[g][c].copy_(part0)
                    elif kernel:   # window + pe: dw1[g] chunk c += sum_i pe[h, c]^T cs[h], exact
                        from ._window_copy import finish_dw1
                        finish_dw1(part0, pec_[g][:, c], cs_[g], dw1_[g][c])
                    else:
                        for i in range(Hg):
                            part0.addcmul_(pec[g, i, c].to(acc)[:, None], cs[g, i][None, :])
                        dw1_[g][c].copy_(part0)
                del xs
        del dp, dp4
        if need_x:
            del dx32, dx_ops, lead
        if need_w1:
            del dw_ops, part, part0
            dw1 = dw1.view(w1.shape)
        if need_b1:
            db1 = cs.sum(1).to(dt)
        if need_pe:              # dpe[h] = w1[g] @ cs[h]
            dpe32 = dy.new_empty((G, Hg, C * K), dtype=acc)
            _gemm_mixed(dpe32, cs, w1.to(cd).mT, False)
            dpe = dpe32.view(sh.H, sh.L, sh.D).to(dt)
    return dx, dw1, db1, dw2, db2, dpe


# --------------------------------------------------------------------------- autograd and registration


class _MlpGemm(torch.autograd.Function):
    """y = mlp(x, w1, b1, w2, b2, pe) by the chunked GEMMs; the backward is
    explicit, with the forward's chunk structure (module docstring). Saves
    x's chunkable tokens (a view of x, or the copy the forward made), the
    weights, pe and the float32 pre-activation. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, pe, sh, act):
        if act == "relu":
            xt = x                                                  # read where it lies, forward and backward
            y, kept = _forward_relu(x, w1, b1, w2, b2, pe, sh)
        else:
            xt = _chunkable(x, sh)
            need_pre = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5))
            y, kept = _forward(xt, w1, b1, w2, b2, pe, sh, act, keep_pre=need_pre)
        ctx.sh, ctx.act = sh, act
        ctx.save_for_backward(xt, w1, b1, w2, pe, kept)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xt, w1, b1, w2, pe, kept = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:6])
        back = _backward_relu if ctx.act == "relu" else _backward
        args = (dy.contiguous(), xt, w1, b1, w2, pe, kept, ctx.sh)
        return (*(back(*args, need) if ctx.act == "relu" else back(*args, ctx.act, need)), None, None)


@register("mlp", "gemm", devices=("cpu", "cuda"), dtypes=DTYPES, priority=20, supports=supports_call,
          auto_devices=("cuda",), precision="io-intermediates", lean=False, prefer=prefer_call)
def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Per-window two-layer MLP by chunked GEMMs (arguments already validated
    by ``kvcompress.functional.mlp``, which also checks ``supports_call``).

    x: (B, H, T, D) bfloat16/float32, any strides (copied once only when its
    tokens are not rows of stride D); w1: (G, L*D, F); b1: (G, F) or None;
    w2: (G, F, D_out); b2: (G, D_out) or None; pe: (H, L, D) or None;
    activation: "relu" (default), "gelu" (exact erf form) or "silu";
    block_size L, stride S with S dividing L; padding "valid" or "left";
    cu_seqlens: must be None (packed input is not supported). Returns
    (B, H, W, D_out) in x's dtype, contiguous. Differentiable in x, w1, b1,
    w2, b2 and pe (once).

    Raises ValueError for packed input, a stride not dividing block_size, or
    an unknown activation (reached only when called directly: the registry
    declines the first two).
    """
    if cu_seqlens is not None:
        raise ValueError("mlp (backend 'gemm'): cu_seqlens must be None (packed input is not supported; "
                         "use backend='triton' or 'torch')")
    if block_size % stride != 0:
        raise ValueError(f"mlp (backend 'gemm'): stride must divide block_size, got block_size={block_size}, "
                         f"stride={stride}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    sh = _Shape(x, w1, w2, block_size, stride, padding)
    tensors = (x, w1, b1, w2, b2, pe)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _MlpGemm.apply(x, w1, b1, w2, b2, pe, sh, activation)
    if activation == "relu":
        return _forward_relu(x, w1, b1, w2, b2, pe, sh)[0]
    return _forward(_chunkable(x, sh), w1, b1, w2, b2, pe, sh, activation, keep_pre=False)[0]


mlp.__kvcompress_domain__ = DOMAIN

__all__ = ["ACTIVATIONS", "AUTO_MIN_GROUP_FLOPS", "DOMAIN", "DTYPES", "group_flops", "mlp", "prefer_call",
           "preactivation_bytes", "supports_call", "workspace_bytes"]
