"""Who is timed: every registered kvcompress backend, and the peers a user
would pick instead, each made ready for one configuration.

- ``kvcompress/<backend>``: ``kvcompress.functional.<kind>(..., backend=...)``
  for every entry of ``kvcompress.backends.backends(kind)`` (a new backend is
  benchmarked without a line here), called as the kind's record says.
- ``seed`` / ``seed+compile``: the seed's own pipeline
  (native-sparse-attention-pytorch 0.2.3): ``split_compress_window`` taken
  from a ``SparseAttention`` instance (Rearrange, ZeroPad2d(L - S), Unfold,
  Rearrange), its intra-block positions added with ``einx.add`` as the seed
  does, then its compress network: ``ConvLinearCompress`` (linear),
  ``GroupedMLP`` (mlp), ``AttentionPool`` (attention_pool); mean_pool and
  weighted_pool have no seed module, so the seed's windows are reduced by a
  plain torch mean / einsum. Eager, and under ``torch.compile`` (the whole
  pipeline, dynamic=False: one compile per shape).
- ``deepseek-v4`` / ``deepseek-v4+compile`` (gated_pool): an eager torch
  transcription of DeepSeek-V4's compressor pooling (``inference/model.py``,
  ``Compressor``: scores plus ``ape``, its overlap transform for ratio 4,
  softmax over the window positions in float32, weighted sum), eager and
  under ``torch.compile``; our bias mapped to its ``ape`` (SPEC 3b).
- ``fla``: fla-core's ``mean_pooling`` (CUDA only). Its chunks do not
  overlap and it takes no pe: it is compared only where S == L without pe.
- ``reference``: the loop reference (reference/), on CPU at the
  readability size: the floor of readability.

Decoding (benchmarks/test_bench_decode.py; ``decode_entrants``): one step
of N streams, each handed a prefix of P - 1 tokens and given token P - 1.

- ``<backend>``: ``kvcompress.decode.decode_step(..., backend=...)`` for
  every registered backend, eager, on a ``DecodeCache`` filled with
  ``DecodeCache.add``; ``<backend>+graph``: the same step captured once in
  a CUDA graph and replayed (CUDA only).
- ``recompress``: ``kvcompress.functional.<kind>`` (default backend) over
  all N prefixes of P tokens: what a step replaces when nothing is cached.
- ``streaming``: ``kvcompress.streaming.step`` (default backend) with the
  same one token per stream, its state advancing; timed S steps at a time
  (exactly one of every S steps completes a window).

A peer that is not installed is skipped with the reason, never replaced.
Each peer receives the same values as kvcompress (our parameters mapped to
its modules' layouts) and passes the same correctness gate.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import kvcompress.decode as kd
import kvcompress.functional as kf
import kvcompress.streaming as ks
from kvcompress import backends as kb
from kvcompress.testing.cases import Inputs
from kvcompress.testing.convert import to_numpy
from kvcompress.testing.records import RECORDS

from .checks import CheckFailed


class NotApplicable(Exception):
    """The entrant cannot run this configuration (the message says why)."""


@dataclass
class Prepared:
    """An entrant ready for one configuration.

    forward(i): the output (B, H, W, D_out) on argument set i (a tensor, or
    an ndarray for the reference). leaves[i]: the tensors a fwd+bwd call
    differentiates (x, pe, parameters). to_ours(grads): those gradients as
    {"x", "pe", parameter names of the record} in the record's layouts.
    n_sets: how many argument sets forward rotates through.
    """

    forward: Callable[[int], object]
    leaves: list
    to_ours: Callable[[list], dict]
    n_sets: int


class Entrant:
    """Base: ``name`` (test id), ``family`` ("kvcompress" or "peer"), ``label``,
    ``precision``: the class its result is gated by (benchmarks/checks.py)."""

    name = ""
    family = "peer"
    compiled = False

    def label(self, cfg) -> str:
        return self.name

    def precision(self, cfg) -> str:
        """The gate's class: a registered backend's precision class (SPEC 3c);
        "peer" for a peer, which promises neither class (the seed's modules
        compute in the input dtype, their window sums included) and is held
        to the RMS check of ``checks.PEER_RMS`` instead; the entrants that
        run kvcompress's default backend, whichever it is, take the looser
        of our classes."""
        return "peer" if self.family == "peer" else "io-intermediates"

    def skip_reason(self, cfg) -> str | None:
        return None

    def prepare(self, cfg, sets, grad: bool) -> Prepared:
        raise NotImplementedError


def _leaf(t, grad):
    return None if t is None else t.detach().requires_grad_(grad)


def _backend_skip_reason(cfg, name: str) -> str | None:
    """Why backend ``name`` of cfg's kind is not benchmarked in cfg, or None."""
    b = kb.get(cfg.kind, name)
    auto = b.devices if b.auto_devices is None else b.auto_devices
    dtype = getattr(torch, cfg.case.dtype)
    if not b.available():
        return f"backend {name!r} is not available here"
    if cfg.device not in b.devices:
        return f"backend {name!r} runs on {b.devices}, not {cfg.device}"
    if cfg.device not in auto:
        return (f"backend {name!r} runs on {cfg.device} only for tests (e.g. Triton's interpreter), "
                f"not for speed: not benchmarked there")
    if dtype not in b.dtypes:
        return f"backend {name!r} does not take {cfg.case.dtype}"
    return None


# ----------------------------------------------------------------------------- kvcompress


class Backend(Entrant):
    """A registered kvcompress backend, through the public function."""

    family = "kvcompress"

    def __init__(self, backend: str):
        self.name = backend

    def label(self, cfg) -> str:
        return f"kvcompress.functional.{cfg.kind}(backend={self.name!r})"

    def precision(self, cfg) -> str:
        return kb.get(cfg.kind, self.name).precision

    def skip_reason(self, cfg) -> str | None:
        return _backend_skip_reason(cfg, self.name)

    def prepare(self, cfg, sets, grad):
        rec, case = RECORDS[cfg.kind], cfg.case
        fn = functools.partial(getattr(kf, cfg.kind), backend=self.name)
        per_set, leaves = [], []
        for i in range(sets.n):
            params = {k: _leaf(v, grad) for k, v in sets.params[i].items()}
            inp = Inputs(x64=None, params64=None, pe64=None, x=_leaf(sets.x[i], grad), params=params,
                         pe=_leaf(sets.pe[i], grad), cu_seqlens=None, cu64=None)
            per_set.append(inp)
            leaves.append([inp.x] + ([inp.pe] if inp.pe is not None else []) + [v for v in params.values()
                                                                                  if v is not None])
        names = ["x"] + (["pe"] if case.use_pe else []) + [k for k, v in sets.params[0].items() if v is not None]
        b = kb.get(cfg.kind, self.name)
        first = per_set[0]
        if not b.accepts(first.x, *rec.args(first), **case.window_kwargs(), pe=first.pe, cu_seqlens=None,
                         **rec.extra_kwargs(case)):
            raise NotApplicable(f"backend {self.name!r} does not support this configuration")
        return Prepared(forward=lambda i: rec.call(fn, case, per_set[i]), leaves=leaves,
                        to_ours=lambda grads: dict(zip(names, grads)), n_sets=sets.n)


# ----------------------------------------------------------------------------- the seed


class _WindowMean(nn.Module):
    """mean_pool on the seed's windows: a plain torch mean (no seed module exists)."""

    def forward(self, win):                          # [B, H, W, L, D]
        return win.mean(dim=-2)                      # [B, H, W, D]


class _WindowWeightedSum(nn.Module):
    """weighted_pool on the seed's windows: a plain einsum (no seed module exists)."""

    def __init__(self, heads: int, block: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, block))   # [H, L]

    def forward(self, win):                          # [B, H, W, L, D]
        return torch.einsum("bhwnd,hn->bhwd", win, self.weight)


@dataclass(frozen=True)
class SeedSpec:
    """How one kind maps onto the seed: the module, what it requires of the
    Case, and the parameter maps (ours -> module state; module gradients
    -> ours)."""

    label: str
    build: Callable
    requires: Callable          # Case -> reason it does not apply, or None
    to_module: Callable         # (Case, our params) -> {module parameter name: tensor}
    to_ours: Callable           # (Case, {module name: grad}) -> {our name: grad}


def _seed_modules():
    return importlib.import_module("native_sparse_attention_pytorch.compress_networks")


def _per_head(c):
    return None if c.G == c.H else f"the seed's module holds one weight set per head (G = H = {c.H}), got G = {c.G}"


def _linear_requires(c):
    if c.D_out != c.D or not c.bias:
        return "ConvLinearCompress maps D -> D with a bias"
    return _per_head(c)


def _mlp_requires(c):
    if c.D_out != c.D or not (c.bias and c.bias2) or c.activation != "relu":
        return "GroupedMLP maps L*D -> F -> D with relu and both biases"
    return _per_head(c)


SEED = {
    "mean_pool": SeedSpec(
        "seed windows (split_compress_window + einx.add pe) + torch mean",
        lambda c: _WindowMean(), lambda c: None, lambda c, p: {}, lambda c, g: {}),
    "weighted_pool": SeedSpec(
        "seed windows (split_compress_window + einx.add pe) + torch einsum",
        lambda c: _WindowWeightedSum(c.H, c.L), _per_head,
        lambda c, p: {"weight": p["weight"]}, lambda c, g: {"weight": g["weight"]}),
    "linear": SeedSpec(
        "seed split_compress_window + einx.add pe + ConvLinearCompress",
        lambda c: _seed_modules().ConvLinearCompress(c.H, c.D, c.L), _linear_requires,
        # conv weight [h*D_out + o, d, j] = weight[h, j, d, o]
        lambda c, p: {"conv.weight": p["weight"].permute(0, 3, 2, 1).reshape(c.H * c.D_out, c.D, c.L),
                      "conv.bias": p["bias"].reshape(c.H * c.D_out)},
        lambda c, g: {"weight": g["conv.weight"].view(c.H, c.D_out, c.D, c.L).permute(0, 3, 2, 1),
                      "bias": g["conv.bias"].view(c.H, c.D_out)}),
    "mlp": SeedSpec(
        "seed split_compress_window + einx.add pe + GroupedMLP",
        lambda c: _seed_modules().GroupedMLP(c.D, c.L, c.H, expand_factor=c.F / (c.L * c.D)), _mlp_requires,
        lambda c, p: {"net.0.weight": p["w1"], "net.0.bias": p["b1"].view(1, c.H, 1, c.F),
                      "net.2.weight": p["w2"], "net.2.bias": p["b2"].view(1, c.H, 1, c.D_out)},
        lambda c, g: {"w1": g["net.0.weight"], "b1": g["net.0.bias"].view(c.H, c.F),
                      "w2": g["net.2.weight"], "b2": g["net.2.bias"].view(c.H, c.D_out)}),
    "attention_pool": SeedSpec(
        "seed split_compress_window + einx.add pe + AttentionPool",
        lambda c: _seed_modules().AttentionPool(c.D, c.L),
        lambda c: None if c.G == 1 else f"AttentionPool shares one weight across heads (G = 1), got G = {c.G}",
        # nn.Linear computes X @ W.T: our weight (Z = X @ weight) is its transpose
        lambda c, p: {"to_attn_logits.weight": p["weight"][0].T},
        lambda c, g: {"weight": g["to_attn_logits.weight"].T.unsqueeze(0)}),
}


@functools.lru_cache(maxsize=8)
def _seed_split(H: int, D: int, L: int, S: int) -> nn.Module:
    """The seed's own ``split_compress_window`` for these sizes."""
    from native_sparse_attention_pytorch import SparseAttention

    sa = SparseAttention(dim=D, dim_head=D, heads=H, kv_heads=H, sliding_window_size=S, compress_block_size=L,
                         compress_block_sliding_stride=S, selection_block_size=S, num_selected_blocks=1,
                         compress_mlp=nn.Identity())
    return sa.split_compress_window


def _seed_windows(split, x, pe):
    import einx

    win = split(x)                                           # [B, H, W, L, D]
    return win if pe is None else einx.add("b h w n d, h n d", win, pe)


class Seed(Entrant):
    """The seed's pipeline, eager or compiled."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "seed+compile" if compiled else "seed"

    def label(self, cfg) -> str:
        return SEED[cfg.kind].label + (" under torch.compile" if self.compiled else "")

    def skip_reason(self, cfg) -> str | None:
        try:
            importlib.import_module("native_sparse_attention_pytorch")
            importlib.import_module("einx")
        except ImportError as e:
            return f"native-sparse-attention-pytorch is not installed ({e}): the seed's pipeline is not measured"
        c = cfg.case
        if self.compiled and cfg.device == "cpu" and cfg.direction == "fwd+bwd" and torch.get_num_threads() > 1:
            # inductor's C++ backward of pad + unfold corrupts memory (segfault, abort) with more than one
            # thread (torch 2.13.0+cpu; minimal repro in docs/benchmarks.md): it would kill the whole run
            return ("torch.compile (inductor, CPU) crashes the process in the backward of the seed's pad + unfold "
                    "with more than one thread (docs/benchmarks.md): not measured in fwd+bwd on CPU")
        if c.padding != "left":
            return "the seed's windows are left-padded (ZeroPad L - S): compared only with padding='left'"
        if c.T % c.S:
            return "the seed truncates T to a multiple of S: compared only where S divides T"
        if cfg.kind not in SEED:
            return f"the seed has no module for {cfg.kind}"
        return SEED[cfg.kind].requires(c)

    def prepare(self, cfg, sets, grad):
        spec, c = SEED[cfg.kind], cfg.case
        split = _seed_split(c.H, c.D, c.L, c.S)
        mods, xs, pes, leaves = [], [], [], []
        for i in range(sets.n):
            with torch.device("meta"):
                m = spec.build(c)
            m = m.to_empty(device=sets.device).to(sets.dtype)
            with torch.no_grad():
                m.load_state_dict({k: v.contiguous() for k, v in spec.to_module(c, sets.params[i]).items()})
            m.requires_grad_(grad)
            mods.append(m)
            xs.append(_leaf(sets.x[i], grad))
            pes.append(_leaf(sets.pe[i], grad))
            leaves.append([xs[i]] + ([pes[i]] if pes[i] is not None else []) + list(m.parameters()))
        names = [n for n, _ in mods[0].named_parameters()]
        n_lead = 2 if c.use_pe else 1

        def to_ours(grads):
            out = {"x": grads[0]}
            if c.use_pe:
                out["pe"] = grads[1]
            out.update(spec.to_ours(c, dict(zip(names, grads[n_lead:]))))
            return out

        if not self.compiled:
            return Prepared(forward=lambda i: mods[i](_seed_windows(split, xs[i], pes[i])), leaves=leaves,
                            to_ours=to_ours, n_sets=sets.n)
        # A parameter-less stand-in holds the structure: were it one of the
        # sets' modules, Dynamo would guard on its own parameters and
        # recompile for every other set.
        with torch.device("meta"):
            template = spec.build(c).to(sets.dtype)
        params = [dict(m.named_parameters()) for m in mods]

        def pipeline(x, pe, p):
            return torch.func.functional_call(template, p, (_seed_windows(split, x, pe),))

        # Dynamo caches compiled code per code object, and ``pipeline`` is one
        # code object for every configuration: start from an empty cache so
        # that this shape gets its own compile and never hits the cache limit.
        torch._dynamo.reset()
        compiled = torch.compile(pipeline, dynamic=False)
        return Prepared(forward=lambda i: compiled(xs[i], pes[i], params[i]), leaves=leaves, to_ours=to_ours,
                        n_sets=sets.n)


# ----------------------------------------------------------------------------- DeepSeek-V4


def deepseek_v4_pool(x, z, ape, *, ratio: int, overlap: bool):
    """DeepSeek-V4's compressor pooling, transcribed in torch from its
    description (SPEC 3b; its ``inference/model.py``, ``Compressor``):
    tokens in groups of ``ratio``, scores z + ape, with ``overlap`` (ratio 4)
    each group also sees the previous group's first half of the features
    (the first group sees -inf scores and zero values there), softmax over
    the group's positions in float32, weighted sum of the values.

    x, z: (B, H, T, Dx) (one compressor per (B, H) row; Dx = 2d with overlap,
    else d); ape: (ratio, Dx). Returns (B, H, T // ratio, d) in x's dtype.
    """
    B, H, T, Dx = x.shape
    n = T // ratio
    kv = x[:, :, :n * ratio].unflatten(2, (n, ratio)).float()              # [B, H, n, R, Dx]
    score = z[:, :, :n * ratio].unflatten(2, (n, ratio)).float() + ape.float()
    if overlap:
        d = Dx // 2
        prev_kv = torch.cat([kv.new_zeros(B, H, 1, ratio, d), kv[:, :, :-1, :, :d]], dim=2)
        prev_s = torch.cat([score.new_full((B, H, 1, ratio, d), float("-inf")), score[:, :, :-1, :, :d]], dim=2)
        kv = torch.cat([prev_kv, kv[..., d:]], dim=3)                         # [B, H, n, 2R, d]
        score = torch.cat([prev_s, score[..., d:]], dim=3)
    return (score.softmax(dim=3) * kv).sum(dim=3).to(x.dtype)               # [B, H, n, d]


class DeepSeekV4(Entrant):
    """gated_pool's peer: DeepSeek-V4's own pooling (transcribed), eager or compiled."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "deepseek-v4+compile" if compiled else "deepseek-v4"

    def label(self, cfg) -> str:
        return "DeepSeek-V4 Compressor pooling (torch transcription)" + (" under torch.compile" if self.compiled
                                                                         else "")

    def skip_reason(self, cfg) -> str | None:
        c = cfg.case
        if cfg.kind != "gated_pool":
            return "DeepSeek-V4's pooling is gated_pool's peer only"
        if c.G != 1 or not c.bias:
            return "DeepSeek-V4 shares one ape across heads: compared with G = 1 and a bias"
        csa = c.split and c.L == 2 * c.S and c.padding == "left"
        hca = not c.split and c.L == c.S
        if not (csa or hca):
            return "DeepSeek-V4 compresses with ratio R as L = 2R, S = R, left, split (CSA) or L = S = R (HCA)"
        return None

    def prepare(self, cfg, sets, grad):
        c = cfg.case
        R, overlap = c.S, c.split
        xs, zs, apes, leaves = [], [], [], []
        for i in range(sets.n):
            b = sets.params[i]["bias"][0]                                    # [L, D_out]
            # SPEC 3b: bias[j, f] = ape[j mod R, (j // R) d + f]
            ape = b.view(2, R, -1).permute(1, 0, 2).reshape(R, -1) if overlap else b
            xs.append(_leaf(sets.x[i], grad))
            zs.append(_leaf(sets.params[i]["z"], grad))
            apes.append(_leaf(ape.contiguous(), grad))
            leaves.append([xs[i], zs[i], apes[i]])

        def to_ours(grads):
            dx, dz, dape = grads
            db = dape.view(R, 2, -1).permute(1, 0, 2).reshape(2 * R, -1) if overlap else dape
            return {"x": dx, "z": dz, "bias": db[None]}

        fn = functools.partial(deepseek_v4_pool, ratio=R, overlap=overlap)
        if self.compiled:
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        return Prepared(forward=lambda i: fn(xs[i], zs[i], apes[i]), leaves=leaves, to_ours=to_ours,
                        n_sets=sets.n)


# ----------------------------------------------------------------------------- fla


def _fla_mean_pooling():
    for mod in ("fla.ops.utils.pooling", "fla.ops.utils"):
        try:
            return importlib.import_module(mod).mean_pooling
        except (ImportError, AttributeError):
            continue
    return None


class Fla(Entrant):
    """fla-core's mean_pooling: non-overlapping chunks, (B, T, H, D) input."""

    name = "fla"

    def label(self, cfg) -> str:
        return "fla.ops.utils.mean_pooling (chunks do not overlap: compared at S == L, no pe)"

    def skip_reason(self, cfg) -> str | None:
        c = cfg.case
        if cfg.kind != "mean_pool":
            return "fla has a mean_pooling only"
        if c.S != c.L or c.use_pe:
            return "fla's chunks do not overlap and take no pe: compared only at S == L without pe"
        if c.T % c.L:
            return "fla keeps a partial last chunk: compared only where L divides T"
        if cfg.device != "cuda":
            return "fla's mean_pooling is a Triton kernel for CUDA: not run on cpu"
        try:
            importlib.import_module("fla")
        except ImportError as e:
            return f"fla-core is not installed ({e}; pip install fla-core): not measured"
        if _fla_mean_pooling() is None:
            return "the installed fla has no mean_pooling in fla.ops.utils"
        return None

    def prepare(self, cfg, sets, grad):
        pool, L = _fla_mean_pooling(), cfg.case.L
        xs = [_leaf(x, grad) for x in sets.x]
        # fla takes (B, T, H, D): x is a view of exactly that storage (layout "bthd")
        return Prepared(forward=lambda i: pool(xs[i].transpose(1, 2), chunk_size=L).transpose(1, 2),
                        leaves=[[x] for x in xs], to_ours=lambda grads: {"x": grads[0]}, n_sets=sets.n)


# ----------------------------------------------------------------------------- the loop reference


class Reference(Entrant):
    """The loop reference (NumPy, float64 loops): the floor of readability."""

    name = "reference"

    def label(self, cfg) -> str:
        return f"reference.{cfg.kind} (NumPy, Python loops)"

    def precision(self, cfg) -> str:
        return "strict"

    def skip_reason(self, cfg) -> str | None:
        if cfg.direction != "fwd":
            return "the reference has no backward"
        if cfg.device != "cpu":
            return "the reference runs on the CPU"
        return None

    def prepare(self, cfg, sets, grad):
        rec, case = RECORDS[cfg.kind], cfg.case
        inp = Inputs(x64=to_numpy(sets.x[0]), params64={k: to_numpy(v) for k, v in sets.params[0].items()},
                     pe64=to_numpy(sets.pe[0]), x=None, params=None, pe=None, cu_seqlens=None, cu64=None)
        return Prepared(forward=lambda i: rec.call_reference(case, inp), leaves=[[]], to_ours=dict, n_sets=1)


# ----------------------------------------------------------------------------- decoding


@dataclass
class DecodePrepared:
    """A decoding entrant ready for one configuration.

    first(): the gated call, made once before anything is timed: the step
    that delivers token P - 1 to every stream, returning (y (N, H, D_out),
    emitted (N,) bool, or None where the entrant reports no mask), or for
    the recompression (its (N, H, W, D_out) output, None). call(): one
    timed call, ``steps`` decoding steps (us/step = time per call / steps).
    probe(): optional, run after the gate: more facts for the report
    (CUDA: whether the eager step is free of host synchronisation).
    info: what the entrant reports beside its time. close(): frees what
    it holds (a CUDA graph and its memory pool).
    """

    first: Callable[[], tuple]
    call: Callable[[], object]
    steps: int = 1
    info: dict = field(default_factory=dict)
    probe: Callable[[], dict] | None = None
    close: Callable[[], None] = lambda: None


class _Streams:
    """The N streams of a decoding configuration, from argument set 0: batch
    row k of x (and of gated_pool's z) is stream k's P tokens."""

    def __init__(self, cfg, sets):
        c = cfg.case
        rec = RECORDS[c.kind]
        self.case = c
        p = sets.params[0]
        self.inputs = [sets.x[0]] + [p[s.name] for s in rec.params if s.per_token]      # each [N, H, P, D]
        self.params = [p[s.name] for s in rec.params if not s.per_token]
        self.options = rec.extra_kwargs(c)
        self.pe = sets.pe[0]
        self.kw = dict(self.options, **({"pe": self.pe} if rec.kind.pe else {}))
        self.device = self.inputs[0].device

    def token(self, t: int) -> list:
        """Token t of every stream, one (N, H, D) view per per-token input."""
        return [v[:, :, t] for v in self.inputs]

    def cache(self) -> kd.DecodeCache:
        """A DecodeCache of the N streams, each handed its first P - 1 tokens
        (their last L - 1 as the tail, tensors only: no host read)."""
        c, n = self.case, self.case.T - 1
        cache = kd.DecodeCache(c.kind, c.B, c.H, c.D, block_size=c.L, stride=c.S, padding=c.padding,
                               dtype=self.inputs[0].dtype, device=self.device)
        cache.add(torch.arange(c.B, device=self.device), *[v[:, :, n - (c.L - 1):n] for v in self.inputs],
                  n_tokens=torch.full((c.B,), n, dtype=torch.int64, device=self.device))
        return cache

    def step(self, cache, tokens, backend: str):
        return kd.decode_step(self.case.kind, cache, *tokens, *self.params, backend=backend, **self.kw)


def _sync_free(fn: Callable[[], object]) -> bool | str:
    """True if ``fn`` runs under torch.cuda.set_sync_debug_mode("error"),
    else the first line of the error (a host synchronisation)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


class DecodeStep(Entrant):
    """``kvcompress.decode.decode_step`` with one registered backend: eager,
    or captured in a CUDA graph and replayed."""

    family = "kvcompress"
    output = "step"

    def __init__(self, backend: str, graph: bool = False):
        self.backend, self.graph = backend, graph
        self.name = f"{backend}+graph" if graph else backend

    def precision(self, cfg) -> str:
        return kb.get(cfg.kind, self.backend).precision

    def label(self, cfg) -> str:
        return (f"kvcompress.decode.decode_step(backend={self.backend!r})"
                + (" captured in a CUDA graph, replayed" if self.graph else ", eager"))

    def bit_exact(self, cfg) -> bool:
        """Whether the step promises the bits of the backend's full pass."""
        return kb.get(cfg.kind, self.backend).batch_invariant

    def skip_reason(self, cfg) -> str | None:
        if self.graph and cfg.device != "cuda":
            return f"CUDA graphs need a CUDA device: the replayed step is not run on {cfg.device}"
        return _backend_skip_reason(cfg, self.backend)

    def prepare(self, cfg, sets) -> DecodePrepared:
        st, c = _Streams(cfg, sets), cfg.case
        wins = [v[:, :, :c.L] for v in st.inputs]                  # the step's call: one window per stream
        if not kb.get(c.kind, self.backend).accepts(wins[0], *wins[1:], *st.params, block_size=c.L, stride=c.S,
                                                     padding="valid", pe=st.pe, cu_seqlens=None, **st.options):
            raise NotApplicable(f"backend {self.backend!r} does not support this configuration")
        if self.graph:
            return self._graph(st)
        cache, tokens = st.cache(), st.token(c.T - 1)

        def call():
            return st.step(cache, tokens, self.backend)

        probe = (lambda: {"sync_free": _sync_free(call)}) if cfg.device == "cuda" else None
        return DecodePrepared(first=call, call=call, probe=probe)

    def _graph(self, st) -> DecodePrepared:
        # scripts/decode_bench.py's capture, the PyTorch recipe: warm up (Triton's
        # compile and autotuning, cuBLAS's workspace) on a side stream and a scratch
        # cache, capture one step on the streams' cache (recorded, not run: the
        # cache still holds P - 1 tokens), replay. A twin cache takes the eager step.
        cache, twin, scratch = st.cache(), st.cache(), st.cache()
        tokens = [t.clone() for t in st.token(st.case.T - 1)]     # the graph's static inputs, [N, H, D] each
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                st.step(scratch, tokens, self.backend)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, emitted = st.step(cache, tokens, self.backend)     # static outputs, rewritten by each replay
        info = {}

        def first():
            graph.replay()
            ye, ee = st.step(twin, tokens, self.backend)
            torch.cuda.synchronize()
            differ = [n for n, a, b in [("y", y, ye), ("emitted", emitted, ee)]
                    + [(n, getattr(cache, n), getattr(twin, n)) for n in ("ring", "n_tokens", "n_windows")]
                    if not torch.equal(a, b)]
            if differ:
                raise CheckFailed(f"{self.name}: the replayed step's {', '.join(differ)} differ from the eager step's "
                                  f"on a twin cache; not timed")
            info["graph_equals_eager"] = True
            return y.clone(), emitted.clone()

        return DecodePrepared(first=first, call=graph.replay, info=info, close=graph.reset)


class Recompress(Entrant):
    """The baseline: ``kvcompress.functional`` over all N prefixes of P tokens
    (default backend), the windows a step would otherwise recompute."""

    name = "recompress"

    def precision(self, cfg) -> str:      # kvcompress's default backend: the looser of our classes
        return "io-intermediates"
    output = "windows"

    def label(self, cfg) -> str:
        return (f"kvcompress.functional.{cfg.kind} (default backend) over all N prefixes of P = {cfg.prefix} "
                f"tokens")

    def prepare(self, cfg, sets) -> DecodePrepared:
        rec, case = RECORDS[cfg.kind], cfg.case
        fn = getattr(kf, cfg.kind)
        per_set = [Inputs(x64=None, params64=None, pe64=None, x=sets.x[i], params=sets.params[i], pe=sets.pe[i],
                          cu_seqlens=None, cu64=None) for i in range(sets.n)]
        first = per_set[0]
        kw = dict(case.window_kwargs(), pe=first.pe, cu_seqlens=None, **rec.extra_kwargs(case))
        picked = next((b.name for b in kb.backends(cfg.kind) if b.accepts_auto(first.x, *rec.args(first), **kw)),
                      None)
        prepared = Prepared(forward=lambda i: rec.call(fn, case, per_set[i]), leaves=[[]] * sets.n, to_ours=dict,
                            n_sets=sets.n)
        return DecodePrepared(first=lambda: (prepared.forward(0), None), call=call_loop(prepared, sets, False),
                              info={"backend": picked, "n_sets": sets.n})


class Streaming(Entrant):
    """``kvcompress.streaming.step`` (default backend) with the same one token
    per stream: the general streaming API, which reads its counters on the
    host and allocates a new state every step."""

    name = "streaming"

    def precision(self, cfg) -> str:      # kvcompress's default backend: the looser of our classes
        return "io-intermediates"
    output = "step"

    def label(self, cfg) -> str:
        return (f"kvcompress.streaming.step (default backend), one token per stream and step, timed "
                f"{cfg.case.S} steps at a time (one of them completes a window)")

    def prepare(self, cfg, sets) -> DecodePrepared:
        st, c = _Streams(cfg, sets), cfg.case
        N, H, D, n = c.B, c.H, c.D, c.T - 1
        state = ks.init_state(N, H, len(st.inputs) * D, block_size=c.L, stride=c.S, padding=c.padding,
                              dtype=sets.dtype, device=st.device, kind=c.kind)
        # the prefixes, packed stream after stream (the prefill a server would stream in)
        packed = [v[:, :, :n].transpose(0, 1).reshape(1, H, N * n, D) for v in st.inputs]
        state = ks.step(c.kind, state, packed[0], torch.arange(N + 1, device=st.device) * n, *packed[1:],
                        *st.params, **st.kw).state
        del packed
        one = torch.arange(N + 1, device=st.device)                        # one token per stream
        tokens = [v[:, :, n].transpose(0, 1).unsqueeze(0) for v in st.inputs]   # [1, H, N, D] each, packed
        held = [state]

        def step():
            out = ks.step(c.kind, held[0], tokens[0], one, *tokens[1:], *st.params, **st.kw)
            held[0] = out.state
            return out

        def first():
            out = step()
            if out.cu_y.tolist() != list(range(N + 1)):
                raise CheckFailed(f"{self.name}: token P - 1 must complete one window of every stream, got the "
                                  f"offsets {out.cu_y.tolist()[:16]}; not timed")
            return out.y[0].transpose(0, 1), None                           # [N, H, D_out]

        def call():
            for _ in range(c.S):
                step()

        return DecodePrepared(first=first, call=call, steps=c.S)


def decode_entrants(cfg) -> list[Entrant]:
    """Everything timed in one decoding configuration: the step with every
    registered backend, eager then replayed, then the two peers."""
    names = [b.name for b in kb.backends(cfg.kind)]
    return [DecodeStep(n) for n in names] + [DecodeStep(n, graph=True) for n in names] + [Recompress(), Streaming()]


# -----------------------------------------------------------------------------


def entrants_for(cfg) -> list[Entrant]:
    """Everything timed in one configuration, kvcompress backends first."""
    out: list[Entrant] = [Backend(b.name) for b in kb.backends(cfg.kind)]
    peers = [DeepSeekV4(False), DeepSeekV4(True)] if cfg.kind == "gated_pool" else [Seed(False), Seed(True)]
    if cfg.role == "readability":
        return out + [peers[0], Reference()]
    out += peers
    if cfg.role == "nonoverlap":
        out.append(Fla())
    return out


def call_loop(prepared: Prepared, sets, grad: bool) -> Callable[[], object]:
    """One benchmarked call: the next argument set, forward (under no_grad)
    or forward and the gradients of every leaf for that set's cotangent."""
    order = itertools.cycle(range(prepared.n_sets))
    if grad:
        def call():
            i = next(order)
            return torch.autograd.grad(prepared.forward(i), prepared.leaves[i], sets.g[i])
    else:
        def call():
            i = next(order)
            with torch.no_grad():
                return prepared.forward(i)
    return call
