"""What is benchmarked: the configurations, and the cost model (flops and
bytes) every measured time is divided by.

A configuration is a harness ``Case`` (kvcompress/testing/cases.py: every field
the property suite draws, fixed here) plus a device and a direction. The
kind's record (kvcompress/kinds.py) says which parameters exist and their
shapes, its flops per window and the settings it is benchmarked in
(``bench``: the fields that differ from the NSA setting), so a new kind
needs no line here.

The NSA setting (arXiv 2502.11089, its experiments: block L = 32, stride S = 16;
GQA with H = 4 KV heads; head dims 128 and 192) in the seed's windowing
(``padding="left"``: ZeroPad L - S, then Unfold) with its intra-block
position embedding ``pe``, and keys laid out (B, T, H, D) as a projection
produces them (``layout="bthd"``: the (B, H, T, D) argument is a transposed
view, as the seed's ``split_heads`` gives it).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.testing.cases import Case
from kvcompress.testing.records import KINDS, RECORDS

DIRECTIONS = ("fwd", "fwd+bwd")
SIZES = ("quick", "default", "record", "full")

NSA = dict(B=1, H=4, block_size=32, stride=16)

# (D, T) shapes, most informative first: a run cut short by --kvbench-deadline
# or by the compile budget loses the least useful ones.
GPU_SHAPES = {
    "quick": [(128, 8192)],
    "default": [(128, 131072), (128, 8192), (192, 131072), (192, 8192)],
    # the benchmark record in docs/bench/ (issue 14 item 5): every kind at three lengths and both head dims
    "record": [(128, 131072), (128, 65536), (128, 8192), (192, 131072), (192, 65536), (192, 8192)],
    "full": [(D, T) for D in (128, 192) for T in (131072, 65536, 32768, 16384, 8192)],
}
CPU_SHAPES = {
    "quick": [(64, 2048)],
    "default": [(64, 8192), (64, 2048)],
    "record": [(64, 8192), (128, 8192), (64, 2048), (128, 2048)],
    "full": [(64, T) for T in (8192, 4096, 2048)],
}
# Where the loop reference is timed (the floor of readability): it runs
# Python loops over windows, positions and features, so only this small.
READABILITY_SHAPE = (8, 64)


class _OfCase:
    """What a configuration reads off its ``case``: the kind, and the key
    under which configurations share their inputs."""

    @property
    def kind(self) -> str:
        return self.case.kind

    @property
    def shape_key(self) -> Case:
        """Configurations sharing this key share their inputs."""
        return self.case


@dataclass(frozen=True)
class BenchConfig(_OfCase):
    """One benchmarked configuration.

    case: the harness Case (kind, dtype, B, H, G, T, D, L, S, padding, pe,
    D_out, F, biases, activation, layout, seed). device: "cpu" or "cuda".
    direction: "fwd" (under torch.no_grad) or "fwd+bwd" (forward, then the
    gradients of x, pe and every parameter for a random cotangent).
    role: "nsa" (the NSA setting), "nonoverlap" (S == L, no pe: where
    fla's non-overlapping mean_pooling is comparable) or "readability"
    (tiny, where the loop reference is timed).
    """

    case: Case
    device: str
    direction: str
    role: str = "nsa"     # configurations of one case share their inputs (both directions)

    @property
    def group(self) -> str:
        """pytest-benchmark group: the entrants compared with each other."""
        c = self.case
        extra = {"nonoverlap": ", S == L (non-overlapping), no pe", "readability": ", readability floor"}
        return (f"{c.kind} {self.direction} B={c.B} H={c.H} T={c.T} D={c.D} L={c.L} S={c.S} G={c.G} {c.dtype} "
                f"{self.device}{extra.get(self.role, '')}")

    @property
    def id(self) -> str:
        c = self.case
        return f"{c.kind}-{self.direction}-D{c.D}-T{c.T}-L{c.L}S{c.S}-{c.dtype}"

    def info(self) -> dict:
        """The configuration as plain data for the benchmark JSON."""
        c = self.case
        return dict(kind=c.kind, direction=self.direction, device=self.device, role=self.role, dtype=c.dtype,
                    B=c.B, H=c.H, T=c.T, D=c.D, L=c.L, S=c.S, G=c.G, W=c.W, D_out=RECORDS[c.kind].d_out(c),
                    F=c.F if RECORDS[c.kind].has_hidden else None, padding=c.padding, pe=c.use_pe,
                    layout=c.layout, group=self.group)


def nsa_case(kind: str, dtype: str, D: int, T: int, setting: int = 0, **overrides) -> Case:
    """The Case of ``kind`` in the NSA setting with head dim D and T tokens,
    changed by the kind's benchmark setting number ``setting`` (its record's
    ``bench``) and then by ``overrides``.

    D_out = D; mlp: F = L * D (GroupedMLP's and the seed default MLP's
    expand_factor 1), relu, both biases; linear: bias (ConvLinearCompress
    has one); gated_pool: DeepSeek-V4's settings, bias on.
    """
    rec = RECORDS[kind]
    H = NSA["H"]
    bench = dict(rec.kind.bench[setting])
    G = H if bench.pop("G") == "H" else 1
    fields = dict(kind=kind, dtype=dtype, T=T, D=D, G=G, padding="left", use_pe=True, layout="bthd", seed=1234,
                  **NSA)
    fields.update(bench)
    if rec.has_dout:
        fields["D_out"] = D
    if rec.has_bias:
        fields["bias"] = True
    if rec.has_hidden:
        fields.update(F=fields["block_size"] * D, bias2=True, activation="relu")
    fields.update(overrides)
    return Case(**fields)


def config_sets(device: str, dtype: str, sizes: str, kinds=KINDS) -> list[BenchConfig]:
    """Every configuration to run, in run order (shape, kind, direction).

    device: "cpu" or "cuda"; dtype: a harness dtype name; sizes: one of
    SIZES; kinds: the kinds to include. Raises ValueError on an unknown
    size set or kind.
    """
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {SIZES}, got {sizes!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; kinds are {KINDS}")
    shapes = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[sizes]
    L = NSA["block_size"]
    out = []
    for i, (D, T) in enumerate(shapes):
        for kind in kinds:
            for setting in range(len(RECORDS[kind].kind.bench)):
                for direction in DIRECTIONS:
                    out.append(BenchConfig(nsa_case(kind, dtype, D, T, setting), device, direction))
        if "mean_pool" in kinds and i < 2:
            # fla's mean_pooling cuts the sequence into disjoint chunks: the only
            # like-for-like comparison is S == L, where left padding adds nothing.
            for direction in DIRECTIONS:
                case = nsa_case("mean_pool", dtype, D, T, stride=L, use_pe=False)
                out.append(BenchConfig(case, device, direction, role="nonoverlap"))
    if device == "cpu":
        D, T = READABILITY_SHAPE
        for kind in kinds:
            out.append(BenchConfig(nsa_case(kind, dtype, D, T), device, "fwd", role="readability"))
    return out


def param_elements(case: Case) -> int:
    """Number of parameter elements of the case (pe excluded)."""
    total = 0
    for spec in RECORDS[case.kind].params:
        if spec.enabled is None or spec.enabled(case):
            n = 1
            for s in spec.shape(case):
                n *= s
            total += n
    return total


def flops_per_window(case: Case) -> int:
    """Flops of the compression of one window of one head (a multiply-add
    counts 2; pe additions, biases, activations and the softmax's
    exp/max/sum are not counted: implementations fold or fuse them)."""
    rec = RECORDS[case.kind]
    return rec.kind.flops({"L": case.L, "S": case.S, "D": case.D, "D_out": rec.d_out(case), "F": case.F})


def cost(case: Case, direction: str, itemsize: int) -> tuple[int, int]:
    """(flops, bytes) of one call: the compression's flops and the minimum
    memory traffic (each input read once, each output written once).

    fwd: bytes = (x + pe + params + y) elements * itemsize.
    fwd+bwd: the forward, then the backward reads x, pe, params and the
    cotangent (y's size) and writes dx, dpe, dparams:
    bytes = (3 (x + pe + params) + 2 y) * itemsize. Backward flops are
    twice the forward's (one product for the input gradient, one for the
    parameter gradient; mean_pool, without parameters, once).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    c = case
    D_out = RECORDS[c.kind].d_out(c)
    x = c.B * c.H * c.T * c.D
    pe = c.H * c.L * c.D if c.use_pe else 0
    p = param_elements(c)
    y = c.B * c.H * c.W * D_out
    fwd_flops = c.B * c.H * c.W * flops_per_window(c)
    if direction == "fwd":
        return fwd_flops, (x + pe + p + y) * itemsize
    factor = 3 if RECORDS[c.kind].kind.has_weights else 2
    return factor * fwd_flops, (3 * (x + pe + p) + 2 * y) * itemsize


# ----------------------------------------------------------------------------- decoding

# One decoding step (benchmarks/test_bench_decode.py): (D, prefix P, stream
# counts N). Every stream holds P - 1 tokens and receives token P - 1, which
# completes window P / S - 1 (the full pass's last window over P tokens); the
# recompression peer compresses all N prefixes of P tokens. The step's work
# does not depend on P, the recompression's grows with it.
GPU_DECODE = {
    "quick": [(128, 4096, (64,))],
    "default": [(128, 4096, (1, 8, 64, 256))],
    "record": [(128, 4096, (1, 8, 64, 256))],
    "full": [(128, 4096, (1, 8, 64, 256)), (128, 16384, (1, 8, 64, 256))],
}
CPU_DECODE = {
    "quick": [(32, 256, (8,))],
    "default": [(64, 512, (1, 8))],
    "record": [(64, 512, (1, 8))],
    "full": [(64, 512, (1, 8, 64))],
}


@dataclass(frozen=True)
class DecodeConfig(_OfCase):
    """One decoding configuration: N streams of one kind in the NSA setting.

    case: the harness Case whose batch rows are the N streams (B = N) and
    whose T = P tokens are each stream's prefix and the decoded token:
    streams hold tokens 0..P-2, the timed step gives them token P - 1,
    which completes window P / S - 1 of every stream (P a multiple of S,
    P >= L). device: "cpu" or "cuda".
    """

    case: Case
    device: str

    def __post_init__(self):
        c = self.case
        if c.padding != "left" or c.T % c.S or c.T < c.L:
            raise ValueError(f"DecodeConfig: the decoded token P - 1 must complete a window: padding 'left', "
                             f"P a multiple of S and P >= L, got {c!r}")

    @property
    def N(self) -> int:
        return self.case.B

    @property
    def prefix(self) -> int:
        return self.case.T

    @property
    def group(self) -> str:
        c = self.case
        return (f"decode {c.kind} N={c.B} H={c.H} D={c.D} L={c.L} S={c.S} G={c.G} prefix={c.T} {c.dtype} "
                f"{self.device}")

    @property
    def id(self) -> str:
        c = self.case
        return f"{c.kind}-N{c.B}-D{c.D}-P{c.T}-{c.dtype}"

    def info(self) -> dict:
        """The configuration as plain data for the benchmark JSON."""
        c = self.case
        rec = RECORDS[c.kind]
        return dict(suite="decode", kind=c.kind, device=self.device, dtype=c.dtype, N=c.B, prefix=c.T, H=c.H,
                    D=c.D, L=c.L, S=c.S, G=c.G, D_out=rec.d_out(c), F=c.F if rec.has_hidden else None,
                    padding=c.padding, pe=c.use_pe, layout=c.layout, group=self.group)


def decode_case(kind: str, dtype: str, D: int, N: int, prefix: int) -> Case:
    """The Case of N streams of ``kind`` decoding in the NSA setting: the
    kind's first benchmark setting (weight groups, bias, mlp's F = L * D,
    layout) at L = 32, S = 16, padding "left", gated_pool without split
    (D_out = D), B = N rows of T = prefix tokens."""
    return nsa_case(kind, dtype, D, prefix, B=N, block_size=NSA["block_size"], stride=NSA["stride"],
                    padding="left", split=False)


def decode_sets(device: str, dtype: str, sizes: str, kinds=KINDS) -> list[DecodeConfig]:
    """Every decoding configuration to run, in run order (shape, stream
    count, kind). Raises ValueError on an unknown size set or kind."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {SIZES}, got {sizes!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; kinds are {KINDS}")
    shapes = (GPU_DECODE if device == "cuda" else CPU_DECODE)[sizes]
    return [DecodeConfig(decode_case(kind, dtype, D, N, prefix), device)
            for D, prefix, streams in shapes for N in streams for kind in kinds]
