"""Error inputs as data (PyTorch OpInfo's ``error_inputs`` is the model).

Every public entry point is an ``EntryPoint``: a valid call per kind,
written as a dict of named arguments, and a way to make the call from such
a dict. Every known bad input is an ``ErrorInput``: the argument it
corrupts, how (a function that edits the valid arguments in place), the
exception type and a fragment of the message (a regex). An error input
applies to every entry point that takes its argument (and to the kinds and
entry points it names, if it names some), so one table serves
``kvcompress.functional``, ``Compressor``, the seed's drop-in modules and
``kvcompress.streaming`` (``step`` and ``StreamingCompressor``).

``cases()`` lists every applicable (entry point, kind, error input);
``tests/test_error_inputs.py`` checks each one before any backend runs
(the tripwire of ``kvcompress.testing.impls``), and fuzzes the same entry
points with arbitrary malformed arguments.

The rule the table encodes (docs/semantics.md, "Errors"): TypeError for a
value of the wrong type (a non-integer where an integer is required, bool
and float included; a non-tensor; a non-str choice; a wrong dtype),
ValueError for a value of the right type that is out of range or of the
wrong rank, shape or device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .cases import Case, make_inputs
from .records import KINDS, RECORDS

__all__ = ["ENTRY_POINTS", "ERROR_INPUTS", "EntryPoint", "ErrorInput", "cases", "table"]


# ---------------------------------------------------------------------------
# entry points: a valid call per kind, as named arguments


@dataclass(frozen=True)
class EntryPoint:
    """A public entry point.

    name: its display name. kinds: the kinds it serves. valid(kind) -> a
    fresh dict of valid named arguments (what the error inputs corrupt).
    call(kind, args): makes the call. spelling: this entry point's name for
    an argument where it differs from the table's (cu_seqlens is
    streaming's cu_new); error messages use this spelling.
    """

    name: str
    kinds: tuple[str, ...]
    valid: Callable[[str], dict]
    call: Callable[[str, dict], object]
    spelling: tuple[tuple[str, str], ...] = ()

    def spell(self, arg: str) -> str:
        return dict(self.spelling).get(arg, arg)

    def argument_names(self, kind: str) -> list[str]:
        """Every argument an error message may name (this entry point's spelling)."""
        return [self.spell(a) for a in self.valid(kind)] + ["kind", "state", "x", "kv"]


def _case(kind: str) -> Case:
    # seqlens (4, 5), L = 4, S = 2: one window per sequence with padding "valid"
    return Case(kind=kind, dtype="float32", B=1, H=4, G=2, T=9, D=3, block_size=4, stride=2, D_out=5, F=6,
                use_pe=True, bias=True, bias2=True, seqlens=(4, 5))


def _tensors(kind: str) -> dict:
    case = _case(kind)
    rec = RECORDS[kind]
    inputs = make_inputs(case, rec)
    out = dict(x=inputs.x, cu_seqlens=inputs.cu_seqlens)
    if rec.kind.pe:
        out["pe"] = inputs.pe
    out.update({p.name: inputs.params[p.name] for p in rec.params})
    return out


def _param_names(kind: str) -> list[str]:
    return [p.name for p in RECORDS[kind].params]


def _functional_valid(kind: str) -> dict:
    a = _tensors(kind)
    a.update(block_size=4, stride=2, padding="valid", total_windows=None, backend="auto")
    a.update(RECORDS[kind].kind.defaults)
    return a


def _functional_call(kind: str, a: dict):
    import kvcompress.functional as kf
    a = dict(a)
    x, params = a.pop("x"), [a.pop(n) for n in _param_names(kind)]
    return getattr(kf, kind)(x, *params, **a)


def _module_valid(kind: str) -> dict:
    t = _tensors(kind)
    a = dict(kind=kind, heads=4, dim_head=3, block_size=4, stride=2, padding="valid", groups=2, pos_emb=True,
             backend="auto", dtype=torch.float32, activation="relu", x=t["x"], cu_seqlens=t["cu_seqlens"])
    rec = RECORDS[kind]
    a.update(dim_out=5 if rec.has_dout else None, hidden=6 if rec.has_hidden else None, pos_emb=rec.kind.pe)
    if rec.has_bias:
        a["bias"] = True
    a.update({k: v for k, v in rec.kind.defaults.items() if k != "activation"})
    a.update({p.name: t[p.name] for p in rec.params if p.per_token})
    return a


def _module_call(kind: str, a: dict):
    from kvcompress.modules import Compressor
    a = dict(a)
    x, cu = a.pop("x"), a.pop("cu_seqlens")
    more = [a.pop(p.name) for p in RECORDS[kind].params if p.per_token]
    return Compressor(a.pop("kind"), **a)(x, *more, cu_seqlens=cu)


def _stream_valid(kind: str) -> dict:
    t = _tensors(kind)
    rec = RECORDS[kind]
    # the state keeps a kind's per-token inputs side by side: dim = n_inputs * D
    a = dict(kind=kind, num_streams=2, heads=4, dim=3 * len(rec.kind.inputs), block_size=4, stride=2,
             padding="valid", state=None, x=t["x"], cu_seqlens=t["cu_seqlens"], backend="auto")
    if rec.kind.pe:
        a["pe"] = t["pe"]
    a.update({n: t[n] for n in _param_names(kind)})
    a.update(rec.kind.defaults)
    return a


def _stream_parts(kind: str, a: dict):
    """(kind, state, x, cu_new, params, keywords) of a step from the named arguments."""
    import kvcompress.streaming as ks
    a = dict(a)
    state = a.pop("state")
    window = {k: a.pop(k) for k in ("block_size", "stride", "padding")}
    sizes = [a.pop(k) for k in ("num_streams", "heads", "dim")]
    if state is None:
        state = ks.init_state(*sizes, **window, dtype=torch.float32)
    elif callable(state):           # an error input's state, built from a valid one
        state = state(ks.init_state(*sizes, **window, dtype=torch.float32))
    params = [a.pop(n) for n in _param_names(kind)]
    return a.pop("kind"), state, a.pop("x"), a.pop("cu_seqlens"), params, a


def _stream_call(kind: str, a: dict):
    import kvcompress.streaming as ks
    k, state, x, cu, params, kw = _stream_parts(kind, a)
    return ks.step(k, state, x, cu, *params, **kw)


def _wrapper_call(kind: str, a: dict):
    import kvcompress.streaming as ks
    k, state, x, cu, params, kw = _stream_parts(kind, a)
    n_more = sum(p.per_token for p in RECORDS[kind].params)   # gated_pool's z: given to each step
    return ks.StreamingCompressor(k, *params[n_more:], state=state, **kw).step(x, cu, *params[:n_more])


SEED_MODULES = {"ConvLinearCompress": "linear", "SingleProjection": "linear", "AttentionPool": "attention_pool",
                "GroupedMLP": "mlp"}


def _seed_entry(cls_name: str) -> EntryPoint:
    def valid(kind):
        a = dict(dim_head=3, compress_window_size=4, backend="auto",
                 kv=torch.randn(2, 2, 3, 4, 3, generator=torch.Generator().manual_seed(0)))
        if cls_name != "AttentionPool":
            a["heads"] = 2
        if cls_name == "GroupedMLP":
            a["expand_factor"] = 1.0
        return a

    def call(kind, a):
        from kvcompress import modules
        a = dict(a)
        kv = a.pop("kv")
        return getattr(modules, cls_name)(**a)(kv)

    return EntryPoint(cls_name, (SEED_MODULES[cls_name],), valid, call)


def _num_windows_call(kind: str, a: dict):
    from kvcompress import num_windows
    return num_windows(**a)


def _compressed_cu_seqlens_call(kind: str, a: dict):
    from kvcompress import compressed_cu_seqlens
    return compressed_cu_seqlens(**a)


ANY_KIND = ("*",)   # the entry point does not depend on the kind

ENTRY_POINTS = (
    EntryPoint("functional", KINDS, _functional_valid, _functional_call),
    EntryPoint("num_windows", ANY_KIND, lambda kind: dict(n=9, block_size=4, stride=2, padding="valid"),
               _num_windows_call),
    EntryPoint("compressed_cu_seqlens", ANY_KIND,
               lambda kind: dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), block_size=4, stride=2,
                                 padding="valid"), _compressed_cu_seqlens_call),
    EntryPoint("Compressor", KINDS, _module_valid, _module_call),
    EntryPoint("step", KINDS, _stream_valid, _stream_call, spelling=(("cu_seqlens", "cu_new"),)),
    EntryPoint("StreamingCompressor", KINDS, _stream_valid, _wrapper_call, spelling=(("cu_seqlens", "cu_new"),)),
    *(_seed_entry(name) for name in SEED_MODULES),
)


# ---------------------------------------------------------------------------
# error inputs


@dataclass(frozen=True)
class ErrorInput:
    """One bad input.

    arg: the argument corrupted (the table's spelling), named by the
    message. corrupt(args): edits a dict of valid arguments in place. exc:
    the exception type. match: a regex the message must contain; ``{arg}``
    in it stands for the entry point's spelling of arg. kinds, entries: where
    it applies (None: wherever the argument is taken).
    """

    what: str
    arg: str
    corrupt: Callable[[dict], None]
    exc: type[Exception]
    match: str
    kinds: tuple[str, ...] | None = None
    entries: tuple[str, ...] | None = None

    def applies(self, entry: EntryPoint, kind: str, valid: dict) -> bool:
        return (self.arg in valid and (self.kinds is None or kind in self.kinds)
                and (self.entries is None or entry.name in self.entries))

    def pattern(self, entry: EntryPoint) -> str:
        return self.match.replace("{arg}", re.escape(entry.spell(self.arg)))


def _set(arg: str, value):
    """Corrupt ``arg`` to ``value`` (a function of the valid value when callable)."""
    def corrupt(a):
        a[arg] = value(a[arg]) if callable(value) else value
    return corrupt


def _other_float(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype != torch.float64 else t.float()


def _decreasing(cu: torch.Tensor) -> torch.Tensor:
    bad = cu.clone()
    bad[1] = cu[-1] + 1                   # [0, 10, 9]: decreasing, still from 0 to T
    return bad


def _ints(arg: str, *, lo: int, what: str, entries=None, kinds=None) -> list[ErrorInput]:
    """The integer rule for one integer argument: below lo, float, bool, None, str."""
    common = dict(entries=entries, kinds=kinds)
    return [
        ErrorInput(f"{arg} {lo - 1}", arg, _set(arg, lo - 1), ValueError, f"{arg} must be an int {what}", **common),
        ErrorInput(f"{arg} float", arg, _set(arg, float(lo + 3)), TypeError, f"{arg} must be an int", **common),
        ErrorInput(f"{arg} bool", arg, _set(arg, True), TypeError, f"{arg} must be an int", **common),
        ErrorInput(f"{arg} None", arg, _set(arg, None), TypeError, f"{arg} must be an int", **common),
        ErrorInput(f"{arg} str", arg, _set(arg, str(lo + 3)), TypeError, f"{arg} must be an int", **common),
    ]


def _choice(arg: str, bad: str, **kw) -> list[ErrorInput]:
    return [ErrorInput(f"{arg} unknown", arg, _set(arg, bad), ValueError, f"{arg} must be (one of|'auto' or one of)",
                       **kw),
            ErrorInput(f"{arg} not a str", arg, _set(arg, 3), TypeError, f"{arg} must be a str", **kw)]


X_ERRORS = [
    ErrorInput("x not a tensor", "x", _set("x", lambda x: x.numpy()), TypeError, "x must be a torch.Tensor"),
    ErrorInput("x 3-D", "x", _set("x", lambda x: x[0]), ValueError, "x must have"),
    ErrorInput("x integer", "x", _set("x", lambda x: x.long()), TypeError, "x must have .*dtype"),
    # functional checks pe (x's dtype, x's device) before anything else names x; gated_pool's z is
    # checked against x (it must have x's dtype and shape)
    ErrorInput("x another float dtype", "x", _set("x", _other_float), TypeError, "(x|pe|z) must have .*dtype"),
    ErrorInput("x on another device", "x", _set("x", lambda x: x.to("meta")), ValueError,
               "must be on (x's|the parameters'|the state's) device"),
    ErrorInput("x batch 2 with packed sequences", "x", _set("x", lambda x: x.expand(2, -1, -1, -1)), ValueError,
               r"batch 1|x must have shape \(1,"),
    ErrorInput("x other heads", "x", _set("x", lambda x: x[:, :2]), ValueError, r"(pe|x|z) must have shape"),
    ErrorInput("x other length than cu_seqlens", "x", _set("x", lambda x: x[:, :, :8]), ValueError,
               r"from 0 to T(_new)?=8|z must have shape \(1, H=4, T_new"),
]

WINDOW_ERRORS = [
    *_ints("block_size", lo=1, what=">= 1"),
    ErrorInput("stride 0", "stride", _set("stride", 0), ValueError, r"stride must be an int with 1 <= stride <= "
               r"block_size=4, got 0"),
    ErrorInput("stride > block_size", "stride", _set("stride", 5), ValueError, "1 <= stride <= block_size=4, got 5"),
    ErrorInput("stride float", "stride", _set("stride", 2.0), TypeError, "stride must be an int"),
    ErrorInput("stride bool", "stride", _set("stride", True), TypeError, "stride must be an int"),
    ErrorInput("stride None", "stride", _set("stride", None), TypeError, "stride must be an int"),
    *_choice("padding", "same"),
]

PE_ERRORS = [
    ErrorInput("pe shape", "pe", _set("pe", lambda p: p[:, :2]), ValueError, r"pe must have shape \(4, 4, 3\)"),
    ErrorInput("pe 0-d", "pe", _set("pe", lambda p: p[0, 0, 0]), ValueError, "pe must have shape"),
    ErrorInput("pe dtype", "pe", _set("pe", _other_float), TypeError, "pe must have x's dtype"),
    ErrorInput("pe device", "pe", _set("pe", lambda p: p.to("meta")), ValueError, "pe must be on x's device"),
    ErrorInput("pe not a tensor", "pe", _set("pe", lambda p: p.tolist()), TypeError, "pe must be a torch.Tensor"),
]

# compressed_cu_seqlens runs on the device and reads no value: only the type, dtype and shape are its errors
_READS_CU = ("functional", "Compressor", "step", "StreamingCompressor")
CU_ERRORS = [
    ErrorInput("cu_seqlens float", "cu_seqlens", _set("cu_seqlens", lambda c: c.float()), TypeError,
               "{arg} must have dtype int32 or int64"),
    ErrorInput("cu_seqlens list", "cu_seqlens", _set("cu_seqlens", lambda c: c.tolist()), TypeError,
               "{arg} must be a torch.Tensor"),
    ErrorInput("cu_seqlens 2-D", "cu_seqlens", _set("cu_seqlens", lambda c: c[None]), ValueError,
               "{arg} must (be 1-D|have shape)"),
    ErrorInput("cu_seqlens device", "cu_seqlens", _set("cu_seqlens", lambda c: c.to("meta")), ValueError,
               "{arg} must be on x's device", entries=_READS_CU),
    ErrorInput("cu_seqlens not from 0", "cu_seqlens", _set("cu_seqlens", lambda c: c + 1), ValueError,
               "{arg} must be non-decreasing from 0 to T", entries=_READS_CU),
    ErrorInput("cu_seqlens decreasing", "cu_seqlens", _set("cu_seqlens", _decreasing), ValueError,
               "{arg} must be non-decreasing from 0 to T", entries=_READS_CU),
    ErrorInput("cu_seqlens short", "cu_seqlens", _set("cu_seqlens", lambda c: c[:-1]), ValueError,
               "{arg} must (be non-decreasing from 0 to T|have shape)", entries=_READS_CU),
    ErrorInput("cu_seqlens empty", "cu_seqlens", _set("cu_seqlens", lambda c: c[:0]), ValueError,
               "{arg} must (be 1-D with N\\+1 >= 1 entries|have shape)"),
    # issue 16, item 2: num_windows checked nothing
    *_ints("n", lo=0, what=">= 0", entries=("num_windows",)),
]


def _with_total(cu_value, total):
    def corrupt(a):
        a["cu_seqlens"] = cu_value(a["cu_seqlens"])
        a["total_windows"] = total
    return corrupt


TOTAL_WINDOWS_ERRORS = [
    ErrorInput("total_windows float", "total_windows", _set("total_windows", 2.0), TypeError,
               "total_windows must be None or an int"),
    ErrorInput("total_windows bool", "total_windows", _set("total_windows", True), TypeError,
               "total_windows must be None or an int"),
    ErrorInput("total_windows -1", "total_windows", _set("total_windows", -1), ValueError,
               "total_windows must be >= 0"),
    ErrorInput("total_windows wrong", "total_windows", _set("total_windows", np.int64(3)), ValueError,
               "total_windows=3, but cu_seqlens gives 2 windows"),
    ErrorInput("total_windows without cu_seqlens", "total_windows", _with_total(lambda c: None, 2), ValueError,
               "total_windows is the packed output size and needs cu_seqlens"),
    # issue 16, item 3: trusted values are still read on the CPU
    ErrorInput("total_windows with decreasing cu_seqlens", "cu_seqlens", _with_total(_decreasing, 2), ValueError,
               "cu_seqlens must be non-decreasing from 0 to T=9", entries=("functional",)),
    ErrorInput("total_windows with cu_seqlens short of T", "cu_seqlens",
               _with_total(lambda c: torch.tensor([0, 4, 8], dtype=c.dtype), 2), ValueError,
               "cu_seqlens must be non-decreasing from 0 to T=9", entries=("functional",)),
]

CHOICE_ERRORS = [
    *_choice("backend", "cuda-magic"),
    *_choice("activation", "tanh", kinds=("mlp",)),
    *_choice("kind", "max_pool"),
]


def _with_split_stride(stride):
    def corrupt(a):
        a["split"], a["stride"] = True, stride
    return corrupt


def _param(kind, name, what, value, exc, match):
    """A parameter tensor of ``kind``, where the caller passes it (not Compressor, whose bias is a bool)."""
    return ErrorInput(f"{name} {what}", name, _set(name, value), exc, match, kinds=(kind,),
                      entries=("functional", "step", "StreamingCompressor"))


PARAM_ERRORS = [
    _param("weighted_pool", "weight", "shape", lambda w: w[:, :3], ValueError, r"weight must have shape \(2, 4\)"),
    _param("weighted_pool", "weight", "G does not divide H", lambda w: w[:1].expand(3, -1), ValueError,
           "must divide H=4, got G=3"),
    _param("weighted_pool", "weight", "dtype", lambda w: w.half(), TypeError, "weight must have x's dtype"),
    _param("weighted_pool", "weight", "device", lambda w: w.to("meta"), ValueError, "weight must be on x's device"),
    _param("weighted_pool", "weight", "0-d", lambda w: w[0, 0], ValueError, "weight must have a first dim"),
    _param("weighted_pool", "weight", "None", None, TypeError, "weight must be a torch.Tensor"),
    _param("linear", "weight", "D", lambda w: w[:, :, :2], ValueError, r"weight must have shape \(2, 4, 3, \?\)"),
    _param("linear", "weight", "3-D", lambda w: w[0], ValueError, "weight must have shape"),
    _param("linear", "weight", "0-d", lambda w: w[0, 0, 0, 0], ValueError, "weight must have a first dim"),
    _param("linear", "weight", "list", lambda w: w.tolist(), TypeError, "weight must be a torch.Tensor"),
    _param("linear", "bias", "shape", lambda b: b[:, :4], ValueError, r"bias must have shape \(2, 5\)"),
    _param("linear", "bias", "dtype", _other_float, TypeError, "bias must have x's dtype"),
    _param("linear", "bias", "device", lambda b: b.to("meta"), ValueError, "bias must be on x's device"),
    _param("mlp", "w1", "shape", lambda w: w[:, :-1], ValueError, r"w1 must have shape \(2, 12, \?\)"),
    _param("mlp", "w1", "groups", lambda w: torch.zeros(3, 12, 6), ValueError, r"w1.shape\[0\] is the number"),
    _param("mlp", "b1", "shape", lambda b: b[:, :-1], ValueError, r"b1 must have shape \(2, 6\)"),
    _param("mlp", "w2", "shape", lambda w: w[:, :-1], ValueError, r"w2 must have shape \(2, 6, \?\)"),
    _param("mlp", "w2", "dtype", _other_float, TypeError, "w2 must have x's dtype"),
    _param("mlp", "w2", "not a tensor", lambda w: w.numpy(), TypeError, "w2 must be a torch.Tensor"),
    _param("mlp", "b2", "shape", lambda b: b[:, :-1], ValueError, r"b2 must have shape \(2, 5\)"),
    _param("attention_pool", "weight", "shape", lambda w: w[:, :, :2], ValueError,
           r"weight must have shape \(2, 3, 3\)"),
    _param("attention_pool", "weight", "groups", lambda w: torch.zeros(8, 3, 3), ValueError,
           "must divide H=4, got G=8"),
    _param("attention_pool", "weight", "0-d", lambda w: w[0, 0, 0], ValueError, "weight must have a first dim"),
    _param("attention_pool", "weight", "device", lambda w: w.to("meta"), ValueError, "weight must be on x's device"),
    _param("gated_pool", "z", "shape", lambda z: z[..., :2], ValueError, "z must have shape"),
    _param("gated_pool", "z", "dtype", _other_float, TypeError, "z must have (x's|the state's) dtype"),
    _param("gated_pool", "z", "not a tensor", lambda z: z.numpy(), TypeError, "z must be a torch.Tensor"),
    _param("gated_pool", "bias", "shape", lambda b: b[:, :3], ValueError, r"bias must have shape \(2, 4, 3\)"),
    _param("gated_pool", "bias", "groups", lambda b: torch.zeros(3, 4, 3), ValueError, "must divide H=4, got G=3"),
]

GATED_ERRORS = [
    ErrorInput("split not a bool", "split", _set("split", 1), TypeError, "split must be a bool",
               kinds=("gated_pool",)),
    # L = 4, S = 2: C = 2 chunks of D / 2 features, and D = 3
    ErrorInput("split with C not dividing D", "split", _set("split", True), ValueError,
               "split needs C = block_size / stride = 2 to divide the head dim D=3", kinds=("gated_pool",)),
    ErrorInput("split with S not dividing L", "split", _with_split_stride(3), ValueError,
               "split needs stride to divide block_size", kinds=("gated_pool",)),
    ErrorInput("pos_emb on gated_pool", "pos_emb", _set("pos_emb", True), ValueError,
               "gated_pool takes no position embedding", kinds=("gated_pool",), entries=("Compressor",)),
]

_MODULE = ("Compressor",)
_NOT_MLP = ("mean_pool", "weighted_pool", "linear", "attention_pool", "gated_pool")
MODULE_ERRORS = [
    *_ints("heads", lo=1, what=">= 1", entries=_MODULE + ("step", "StreamingCompressor")),
    *_ints("dim_head", lo=1, what=">= 1", entries=_MODULE),
    *_ints("groups", lo=1, what=">= 1", entries=_MODULE),
    ErrorInput("groups not dividing heads", "groups", _set("groups", 3), ValueError,
               "groups must divide heads=4, got groups=3", entries=_MODULE),
    ErrorInput("dim_out 0", "dim_out", _set("dim_out", 0), ValueError, "dim_out must be an int >= 1",
               entries=_MODULE),
    ErrorInput("dim_out float", "dim_out", _set("dim_out", 5.0), TypeError, "dim_out must be an int >= 1",
               entries=_MODULE),
    ErrorInput("dim_out on a pooling kind", "dim_out", _set("dim_out", 5), ValueError,
               "dim_out applies to linear and mlp", entries=_MODULE,
               kinds=("mean_pool", "weighted_pool", "attention_pool", "gated_pool")),
    ErrorInput("hidden 0", "hidden", _set("hidden", 0), ValueError, "hidden must be an int >= 1", entries=_MODULE,
               kinds=("mlp",)),
    ErrorInput("hidden float", "hidden", _set("hidden", 6.0), TypeError, "hidden must be an int >= 1",
               entries=_MODULE, kinds=("mlp",)),
    ErrorInput("hidden on another kind", "hidden", _set("hidden", 6), ValueError, "hidden applies to mlp only",
               entries=_MODULE, kinds=_NOT_MLP),
    ErrorInput("activation on another kind", "activation", _set("activation", "gelu"), ValueError,
               "activation applies to mlp only", entries=_MODULE, kinds=_NOT_MLP),
    ErrorInput("activation not a str on another kind", "activation", _set("activation", None), TypeError,
               "activation must be a str", entries=_MODULE, kinds=_NOT_MLP),
    ErrorInput("bias not a bool", "bias", _set("bias", 1), TypeError, "bias must be a bool", entries=_MODULE),
    ErrorInput("pos_emb not a bool", "pos_emb", _set("pos_emb", "yes"), TypeError, "pos_emb must be a bool",
               entries=_MODULE),
    ErrorInput("dtype not a float dtype", "dtype", _set("dtype", torch.int32), TypeError,
               "dtype must be None or one of", entries=_MODULE),
]

_STREAM = ("step", "StreamingCompressor")
STREAM_ERRORS = [
    *_ints("num_streams", lo=0, what=">= 0", entries=_STREAM),
    *_ints("dim", lo=1, what=">= 1", entries=_STREAM),
    ErrorInput("state not a StreamState", "state", _set("state", lambda s: lambda st: st.state_dict()), TypeError,
               "state must be a StreamState", entries=_STREAM),
    ErrorInput("state counters inconsistent", "state", _set("state", lambda s: lambda st: type(st)(
        st.pending, st.n_tokens, st.n_windows + 1, st.block_size, st.stride, st.padding)), ValueError,
        "state is inconsistent", entries=("step",)),
]

_SEED = tuple(SEED_MODULES)
_SEED_WITH_HEADS = ("ConvLinearCompress", "SingleProjection", "GroupedMLP")
SEED_ERRORS = [
    ErrorInput("kv not a tensor", "kv", _set("kv", lambda kv: kv.numpy()), TypeError, "kv must be a torch.Tensor"),
    ErrorInput("kv 4-D", "kv", _set("kv", lambda kv: kv[0]), ValueError, "kv must have 5 dims"),
    ErrorInput("kv dtype", "kv", _set("kv", _other_float), TypeError, "kv must have the parameters' dtype"),
    # issue 16, item 5: named kv (it named the functional weight)
    ErrorInput("kv device", "kv", _set("kv", lambda kv: kv.to("meta")), ValueError,
               "kv must be on the parameters' device"),
    ErrorInput("kv head dim", "kv", _set("kv", lambda kv: kv[..., :2]), ValueError, "d = dim_head = 3"),
    ErrorInput("kv heads", "kv", _set("kv", lambda kv: kv[:, :1]), ValueError, "h = heads = 2",
               entries=_SEED_WITH_HEADS),
    ErrorInput("kv window length", "kv", _set("kv", lambda kv: kv[:, :, :, :3]), ValueError,
               "n = compress_window_size = 4", entries=("GroupedMLP",)),
    *_ints("compress_window_size", lo=1, what=">= 1", entries=_SEED),
    *_ints("dim_head", lo=1, what=">= 1", entries=_SEED),
    *_ints("heads", lo=1, what=">= 1", entries=_SEED_WITH_HEADS),
    # issue 16, item 4: a str was repeated into a 33...3-unit hidden layer
    ErrorInput("expand_factor str", "expand_factor", _set("expand_factor", "3"), TypeError,
               "expand_factor must be a real number", entries=("GroupedMLP",)),
    ErrorInput("expand_factor bool", "expand_factor", _set("expand_factor", True), TypeError,
               "expand_factor must be a real number", entries=("GroupedMLP",)),
    ErrorInput("expand_factor None", "expand_factor", _set("expand_factor", None), TypeError,
               "expand_factor must be a real number", entries=("GroupedMLP",)),
    ErrorInput("expand_factor NaN", "expand_factor", _set("expand_factor", float("nan")), ValueError,
               "expand_factor must be a finite number", entries=("GroupedMLP",)),
    ErrorInput("expand_factor inf", "expand_factor", _set("expand_factor", float("inf")), ValueError,
               "expand_factor must be a finite number", entries=("GroupedMLP",)),
    ErrorInput("expand_factor too small", "expand_factor", _set("expand_factor", 0.01), ValueError,
               "hidden units", entries=("GroupedMLP",)),
]

ERROR_INPUTS: tuple[ErrorInput, ...] = tuple(
    X_ERRORS + WINDOW_ERRORS + PE_ERRORS + CU_ERRORS + TOTAL_WINDOWS_ERRORS + CHOICE_ERRORS + PARAM_ERRORS
    + GATED_ERRORS + MODULE_ERRORS + STREAM_ERRORS + SEED_ERRORS)


def cases() -> list[tuple[EntryPoint, str, ErrorInput]]:
    """Every (entry point, kind, error input) that applies."""
    out = []
    for entry in ENTRY_POINTS:
        for kind in entry.kinds:
            valid = entry.valid(kind)
            out += [(entry, kind, e) for e in ERROR_INPUTS if e.applies(entry, kind, valid)]
    return out


def run(entry: EntryPoint, kind: str, error: ErrorInput):
    """Make the corrupted call; returns what it returned (it should raise)."""
    args = entry.valid(kind)
    error.corrupt(args)
    return entry.call(kind, args)


def table() -> str:
    """The table as markdown: what each bad input gets, by argument."""
    lines = ["| argument | bad input | exception | message contains | where |", "| --- | --- | --- | --- | --- |"]
    for e in ERROR_INPUTS:
        where = ", ".join(e.entries or ("every entry point taking it",))
        if e.kinds:
            where += f" ({', '.join(e.kinds)})"
        lines.append(f"| {e.arg} | {e.what} | {e.exc.__name__} | `{e.match}` | {where} |")
    return "\n".join(lines)
