"""One record per compressor kind: what every layer reads instead of
switching on the kind's name (PyTorch's OpInfo, kept small; fla's
``OpConfig``).

A record says what the kind takes and gives:

- ``inputs``: its per-token tensors, each (B, H, T, D), windowed alike
  (every kind has ``x``; ``gated_pool`` also its gate scores ``z``);
- ``params``: its parameters after the inputs, in signature order, each a
  shape over the fixed letters (G groups, L block size, D head dim, D_out
  output dim, F hidden units), whether it may be None, its fan-in (the
  number of terms a value is summed with: initialisation and the suite's
  draws scale by 1/sqrt(fan_in)) and its initial value in ``Compressor``;
- ``options``: its keyword-only non-tensor arguments (mlp's
  ``activation``, gated_pool's ``split``) with defaults and choices;
- ``pe``: whether it takes the position embedding pe (H, L, D);
- ``pad_fill``: per input, the token value that acts as a left pad (0 for
  x; gated_pool's scores -inf: a pad has weight 0), which streaming stores
  for the pads a fresh stream holds;
- ``d_out``: D_out from the other dims where the kind fixes it (None: a
  parameter's shape gives it), and ``check``: the constraints between
  arguments that shapes alone cannot say;
- ``flops``: the flops of one window of one head (a multiply-add counts
  2; biases, activations and a softmax's exp/max/sum are not counted), and
  ``bench``: the settings it is benchmarked in, each the fields that differ
  from NSA's (benchmarks/configs.py; "G": "H" or "1").

``kvcompress.functional`` validates every call from the record;
``Compressor``, ``streaming``, the backends registry, the property suite
(kvcompress/testing), the benchmarks and the GPU scripts read it. The
suite finds the rest of a kind by its name: ``kvcompress_reference.<kind>``,
``kvcompress.testing.windows.<kind>`` (the vectorized oracle) and the
tolerance model's entry for it.

A record is data only: this module imports nothing but the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

PADDINGS = ("valid", "left")
ACTIVATIONS = ("relu", "gelu", "silu")
# SPEC 3c; each backend declares the class it meets (kvcompress.backends.register)
PRECISION_CLASSES = ("strict", "io-intermediates")
DIM_LETTERS = ("G", "L", "D", "D_out", "F")


@dataclass(frozen=True)
class Param:
    """One tensor parameter of a kind.

    name: as in the kind's signature. shape: a tuple of dim names
    (``DIM_LETTERS``, or "L*D" for a flattened window). optional: may be
    None (a bias). fan_in: a dim name or product ("L*D", "F", "1") whose
    value scales initialisation and the suite's draws by 1/sqrt(fan_in).
    init: how ``Compressor.reset_parameters`` starts it: "uniform"
    (nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))), "mean" (1/L: a
    weighted pool that starts as the mean) or "zeros".
    """

    name: str
    shape: tuple[str, ...]
    optional: bool = False
    fan_in: str = "1"
    init: str = "uniform"


@dataclass(frozen=True)
class Option:
    """A keyword-only non-tensor argument: its default and its choices
    (a tuple of str), or None for a bool."""

    name: str
    default: object
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Kind:
    """The record of one kind (see the module docstring)."""

    name: str
    formula: str
    params: tuple[Param, ...] = ()
    options: tuple[Option, ...] = ()
    inputs: tuple[str, ...] = ("x",)
    pe: bool = True
    d_out: Callable[[dict, dict], int] | None = None
    check: Callable[[str, dict, dict], None] | None = None
    pad_fill: tuple[float, ...] = (0.0,)
    flops: Callable[[dict], int] = lambda d: 2 * d["L"] * d["D"]
    bench: tuple[dict, ...] = ({"G": "H"},)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def defaults(self) -> dict:
        """{option name: default}."""
        return {o.name: o.default for o in self.options}

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The positional tensors of the signature: inputs then parameters."""
        return self.inputs + self.param_names

    @property
    def has_weights(self) -> bool:
        return bool(self.params)

    @property
    def free_dims(self) -> tuple[str, ...]:
        """Dims that only a parameter's shape gives (linear's D_out, mlp's F)."""
        seen = {d for p in self.params for d in p.shape}
        fixed = {"G", "L", "D", "L*D"} | ({"D_out"} if self.d_out is not None else set())
        return tuple(d for d in DIM_LETTERS if d in seen and d not in fixed)

    def dim(self, expr: str, dims: dict) -> int:
        """The value of a dim name or product ("L*D") under ``dims``."""
        # a list, not a generator: torch.compile (dynamo) traces math.prod of a list only
        return math.prod([int(dims[d]) if not d.isdigit() else int(d) for d in expr.split("*")])

    def shape(self, param: Param, dims: dict) -> tuple[int, ...]:
        """A parameter's shape under ``dims`` ({letter: int})."""
        return tuple(self.dim(d, dims) for d in param.shape)


def _check_split(fn: str, dims: dict, options: dict) -> None:
    """gated_pool with split: C = L / S chunks, each reading D / C features."""
    if not isinstance(options["split"], bool):
        raise TypeError(f"{fn}: split must be a bool, got {type(options['split']).__name__}")
    if options["split"]:
        L, S, D = dims["L"], dims["S"], dims["D"]
        if L % S != 0:
            raise ValueError(f"{fn}: split needs stride to divide block_size (C = L / S chunks), got "
                             f"block_size={L}, stride={S}")
        if D % (L // S) != 0:
            raise ValueError(f"{fn}: split needs C = block_size / stride = {L // S} to divide the head dim D={D} "
                             f"(x's D; Compressor's dim_head)")


KINDS_BY_NAME: dict[str, Kind] = {k.name: k for k in (
    # bench "G": the seed module each kind is compared with: ConvLinearCompress
    # and GroupedMLP hold one weight set per head, AttentionPool one shared;
    # weighted_pool follows the per-head networks; DeepSeek-V4 shares its ape
    Kind("mean_pool", "y = (1/L) * sum_j X[j]", d_out=lambda d, o: d["D"],
         flops=lambda d: d["L"] * d["D"], bench=({"G": "1"},)),
    Kind("weighted_pool", "y = sum_j weight[g, j] * X[j]",
         params=(Param("weight", ("G", "L"), fan_in="L", init="mean"),),
         d_out=lambda d, o: d["D"]),
    Kind("linear", "y = sum_j X[j] @ weight[g, j] + bias[g]  (NSA eq. 7)",
         params=(Param("weight", ("G", "L", "D", "D_out"), fan_in="L*D"),
                 Param("bias", ("G", "D_out"), optional=True, fan_in="L*D")),
         flops=lambda d: 2 * d["L"] * d["D"] * d["D_out"]),
    Kind("mlp", "y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g], flat(X) token-major (the seed's (n d))",
         params=(Param("w1", ("G", "L*D", "F"), fan_in="L*D"),
                 Param("b1", ("G", "F"), optional=True, fan_in="L*D"),
                 Param("w2", ("G", "F", "D_out"), fan_in="F"),
                 Param("b2", ("G", "D_out"), optional=True, fan_in="F")),
         options=(Option("activation", "relu", ACTIVATIONS),),
         flops=lambda d: 2 * d["L"] * d["D"] * d["F"] + 2 * d["F"] * d["D_out"]),
    Kind("attention_pool", "Z = X @ weight[g]; y[c] = sum_j softmax_j(Z[:, c])[j] * X[j, c]",
         params=(Param("weight", ("G", "D", "D"), fan_in="D", init="zeros"),),
         d_out=lambda d, o: d["D"],
         flops=lambda d: 2 * d["L"] * d["D"] * d["D"] + 2 * d["L"] * d["D"],   # logits X @ W, weighted sum
         bench=({"G": "1"},)),
    Kind("gated_pool", "s = z + bias[g] (pads -inf); y[f] = sum_j softmax_j(s[:, f])[j] * x[j, f], with split "
         "position j reading features [c D_out, (c+1) D_out), c = j // S  (DeepSeek-V4's compressor)",
         params=(Param("bias", ("G", "L", "D_out"), optional=True, fan_in="1", init="zeros"),),
         options=(Option("split", False),),
         inputs=("x", "z"), pe=False, pad_fill=(0.0, float("-inf")),
         d_out=lambda d, o: d["D"] // (d["L"] // d["S"]) if o["split"] else d["D"],
         check=_check_split,
         flops=lambda d: 2 * d["L"] * d["D_out"],
         # DeepSeek-V4's two compressors: CSA (ratio 4, overlapping, split) and HCA (ratio 128)
         bench=({"G": "1", "block_size": 8, "stride": 4, "padding": "left", "split": True, "use_pe": False,
                 "layout": "contiguous"},
                {"G": "1", "block_size": 128, "stride": 128, "padding": "valid", "split": False, "use_pe": False,
                 "layout": "contiguous"})),
)}
KINDS: tuple[str, ...] = tuple(KINDS_BY_NAME)


def get(kind: str) -> Kind:
    """The record of ``kind``; ValueError naming the kinds if there is none."""
    try:
        return KINDS_BY_NAME[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}") from None
