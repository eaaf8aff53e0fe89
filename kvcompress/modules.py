"""``nn.Module`` front ends over ``kvcompress.functional``.

Two families:

- Drop-in versions of the seed's compress networks
  (``native-sparse-attention-pytorch`` 0.2.3, ``compress_networks.py``):
  ``ConvLinearCompress``, ``AttentionPool``, ``GroupedMLP`` and
  ``SingleProjection`` take windows ``kv`` of shape (b, h, w, n, d) and hold
  the seed's submodules, so parameter names, shapes, initialisation (and
  the random numbers it draws) are the seed's: a seed ``state_dict`` loads
  with ``strict=True`` and ours loads into the seed's. Their forward does
  not redo the math: it flattens kv to a token sequence x (b, h, w*n, d),
  reads the weights as *views* of the module's parameters in the layout
  of a functional kind (so autograd reaches the parameters), and calls that
  kind with block_size = stride = the window length and ``padding="valid"``.
  Every quirk of the seed is kept and documented on its class.
- ``Compressor``: one module owning the weights of one kind, for callers
  who start from keys or values x (B, H, T, D).
"""

from __future__ import annotations

import math
import numbers

import torch
from einops.layers.torch import EinMix, Rearrange
from torch import nn

from . import backends as _backends
from . import functional as kf
from . import kinds as _kinds
from ._validate import ACTIVATIONS, FLOAT_DTYPES, check_activation, check_choice, check_int, check_window_args

__all__ = ["AttentionPool", "Compressor", "ConvLinearCompress", "GroupedMLP", "SingleProjection"]

KINDS = _kinds.KINDS


def _check_pos_int(fn: str, name: str, v) -> int:
    """An int >= 1 (any numbers.Integral but bool): TypeError if not an integer, ValueError if < 1."""
    return check_int(fn, name, v, lo=1)


def _check_backend(fn: str, kind: str, backend) -> str:
    """"auto" or a backend registered for ``kind``: TypeError for a non-str,
    ValueError naming the choices for an unknown name."""
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a str, 'auto' or a backend name, got {type(backend).__name__}")
    if backend == "auto":
        return backend
    names = [b.name for b in _backends.backends(kind)]
    if backend not in names:
        raise ValueError(f"{fn}: backend must be 'auto' or one of {names} (the backends of {kind}), got {backend!r}")
    return backend


def _check_kv(fn: str, kv, param: torch.Tensor, *, heads: int | None = None, dim_head: int | None = None,
              window: int | None = None) -> tuple[int, int, int, int, int]:
    """kv must be a (b, h, w, n, d) tensor of the parameters' dtype and
    device, with h == heads, d == dim_head and n == window where those are given."""
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"{fn}: kv must be a torch.Tensor of shape (b, h, w, n, d), got {type(kv).__name__}")
    if kv.dim() != 5:
        raise ValueError(f"{fn}: kv must have 5 dims (b, h, w, n, d), got shape {tuple(kv.shape)}")
    if kv.dtype != param.dtype:
        raise TypeError(f"{fn}: kv must have the parameters' dtype {param.dtype}, got {kv.dtype}")
    if kv.device != param.device:
        raise ValueError(f"{fn}: kv must be on the parameters' device {param.device}, got {kv.device}")
    b, h, w, n, d = kv.shape
    if heads is not None and h != heads:
        raise ValueError(f"{fn}: kv must have h = heads = {heads} heads, got shape {tuple(kv.shape)}")
    if dim_head is not None and d != dim_head:
        raise ValueError(f"{fn}: kv must have d = dim_head = {dim_head}, got shape {tuple(kv.shape)}")
    if window is not None and n != window:
        raise ValueError(f"{fn}: kv must have n = compress_window_size = {window} tokens per window, "
                         f"got shape {tuple(kv.shape)}")
    return b, h, w, n, d


def _tokens(kv: torch.Tensor) -> torch.Tensor:
    """(b, h, w, n, d) windows -> (b, h, w*n, d) tokens: the seed's ``(w n)`` axis."""
    b, h, w, n, d = kv.shape
    return kv.reshape(b, h, w * n, d)                    # [B, H, T, D]


class ConvLinearCompress(nn.Module):
    """The seed's ``ConvLinearCompress``: a grouped ``Conv1d`` (one group per
    head) with kernel and stride ``compress_window_size``, i.e. the kind
    ``linear`` with G = heads and block_size = stride = compress_window_size.

    Args:
        heads (int >= 1): h of the input.
        dim_head (int >= 1): d of the input (and of the output).
        compress_window_size (int >= 1): the conv's kernel and stride, L.
        backend (keyword-only, default "auto"): the ``linear`` backend.

    Parameters (the seed's): ``conv.weight`` (h*d, d, L), ``conv.bias``
    (h*d,), ``nn.Conv1d``'s initialisation. ``conv.weight[g*d + o, i, j]``
    is the functional ``weight[g, j, i, o]``.

    forward(kv): kv (b, h, w, n, d) of the parameters' dtype -> (b, h,
    floor(w*n / L), d).

    Quirk (kept): the seed convolves over the flattened ``(w n)`` token
    axis, so when n != compress_window_size its windows are L consecutive
    tokens of that axis and cross the boundaries of the input's windows; the
    output has floor(w*n / L) tokens, and trailing tokens that do not fill a
    window are dropped. It equals a per-window linear map only when
    n == compress_window_size.

    Where the seed's conv raises because there are fewer than L tokens
    (w*n < L, including w = 0 or n = 0), this module returns an empty
    (b, h, 0, d) tensor instead. Errors: the constructor raises TypeError
    for a non-integer size (bool and float included) or a non-str backend,
    ValueError for a size < 1 or an unknown backend. forward raises
    TypeError if kv is not a tensor or has another dtype than the
    parameters; ValueError if kv is not 5-D, h != heads, d != dim_head (the
    seed raises there too) or kv is on another device than the parameters.
    """

    def __init__(self, heads, dim_head, compress_window_size, *, backend="auto"):
        super().__init__()
        fn = type(self).__name__
        heads, dim_head, compress_window_size = (_check_pos_int(fn, name, v) for name, v in (
            ("heads", heads), ("dim_head", dim_head), ("compress_window_size", compress_window_size)))
        self.heads, self.dim_head, self.compress_window_size = heads, dim_head, compress_window_size
        self.backend = _check_backend(fn, "linear", backend)
        self.conv = nn.Conv1d(heads * dim_head, heads * dim_head, compress_window_size, stride=compress_window_size,
                              groups=heads)

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        _check_kv(type(self).__name__, kv, self.conv.weight, heads=self.heads, dim_head=self.dim_head)
        H, D, L = self.heads, self.dim_head, self.compress_window_size
        weight = self.conv.weight.view(H, D, D, L).permute(0, 3, 2, 1)   # [G=H, L, D_in, D_out], a view
        bias = self.conv.bias.view(H, D)                                  # [G, D_out]
        return kf.linear(_tokens(kv), weight, bias, block_size=L, stride=L, padding="valid",
                         backend=self.backend)                            # [b, h, floor(w*n / L), d]


class AttentionPool(nn.Module):
    """The seed's ``AttentionPool`` (Enformer's attention pooling): logits
    kv @ W.T with one (d, d) matrix shared by all heads, softmax over the n
    positions of each window, per feature; i.e. the kind ``attention_pool``
    with G = 1, weight = W.T and block_size = stride = n.

    Args:
        dim_head (int >= 1): d of the input.
        compress_window_size (int >= 1): accepted and unused (see the quirk).
        backend (keyword-only, default "auto"): the ``attention_pool`` backend.

    Parameters (the seed's): ``to_attn_logits.weight`` (d, d), initialised
    to the identity (nn.Linear's random initialisation is drawn first and
    then overwritten, as in the seed, so the random stream matches).

    forward(kv): kv (b, h, w, n, d), any h, of the parameters' dtype ->
    (b, h, w, d).

    Quirk (kept): compress_window_size plays no part; the window length is
    whatever n the input has, so any n works and two modules that differ
    only in compress_window_size compute the same function.
    n = 0 gives zeros (an empty sum, like the seed); the weight then gets no
    gradient (None) where the seed's gets zeros. Errors: the constructor as
    ConvLinearCompress's; forward raises TypeError if kv is not a tensor or
    has another dtype than the weight; ValueError if kv is not 5-D,
    d != dim_head or kv is on another device than the weight.
    """

    def __init__(self, dim_head, compress_window_size, *, backend="auto"):
        super().__init__()
        fn = type(self).__name__
        dim_head = _check_pos_int(fn, "dim_head", dim_head)
        compress_window_size = _check_pos_int(fn, "compress_window_size", compress_window_size)
        self.dim_head, self.compress_window_size = dim_head, compress_window_size
        self.backend = _check_backend(fn, "attention_pool", backend)
        self.to_attn_logits = nn.Linear(dim_head, dim_head, bias=False)
        with torch.no_grad():
            self.to_attn_logits.weight.copy_(torch.eye(dim_head))

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        _, _, _, n, _ = _check_kv(type(self).__name__, kv, self.to_attn_logits.weight, dim_head=self.dim_head)
        if n == 0:
            return kv.sum(dim=3)                                          # [b, h, w, d] zeros: an empty sum
        weight = self.to_attn_logits.weight.t().unsqueeze(0)              # [G=1, D, D]: Z = X @ W.T, a view
        return kf.attention_pool(_tokens(kv), weight, block_size=n, stride=n, padding="valid",
                                 backend=self.backend)                    # [b, h, w, d]


class GroupedMLP(nn.Module):
    """The seed's ``GroupedMLP``: per head, a two-layer ReLU MLP on the
    window flattened token-major (the seed's ``(n d)``); i.e. the kind
    ``mlp`` with G = heads, F = int(n*d*expand_factor), activation "relu"
    and block_size = stride = compress_window_size.

    Args:
        dim_head (int >= 1): d of the input (and of the output).
        compress_window_size (int >= 1): n, the window length.
        heads (int >= 1): h of the input.
        expand_factor (number, default 1.): F = int(n * d * expand_factor),
            which must be >= 1 (the seed fails to build with F < 1).
        backend (keyword-only, default "auto"): the ``mlp`` backend.
        memory (keyword-only, "auto" or "lean", default "auto"):
            ``kvcompress.functional.mlp``'s memory mode ("lean": never store
            the hidden layer for the backward).

    Parameters (the seed's einops ``EinMix`` layers, their initialisation):
    ``net.0.weight`` (h, n*d, F) = w1, ``net.0.bias`` (1, h, 1, F) = b1,
    ``net.2.weight`` (h, F, d) = w2, ``net.2.bias`` (1, h, 1, d) = b2;
    ``net.1`` is the ReLU.

    forward(kv): kv (b, h, w, n, d) of the parameters' dtype -> (b, h, w, d).

    Errors: the constructor raises TypeError for a non-integer size (bool
    and float included) or an expand_factor that is not a real number (a
    str, a bool, None), ValueError for sizes < 1 or an expand_factor giving
    F < 1 (NaN and inf included), and for a memory other than "auto" or
    "lean" (TypeError for a non-str). forward raises TypeError if kv is not a
    tensor or has another dtype than the parameters; ValueError if kv is not
    5-D, h != heads, d != dim_head or n != compress_window_size (the seed
    raises for each of these), or kv is on another device.
    """

    def __init__(self, dim_head, compress_window_size, heads, expand_factor=1., *, backend="auto", memory="auto"):
        super().__init__()
        fn = type(self).__name__
        self.memory = check_choice(fn, "memory", memory, ("auto", "lean"))
        dim_head, compress_window_size, heads = (_check_pos_int(fn, name, v) for name, v in (
            ("dim_head", dim_head), ("compress_window_size", compress_window_size), ("heads", heads)))
        dim = dim_head * compress_window_size
        # a real number: a str would be repeated (int("3" * 11) = 33...3), a bool taken for 0 or 1
        if not isinstance(expand_factor, numbers.Real) or isinstance(expand_factor, bool):
            raise TypeError(f"{fn}: expand_factor must be a real number (int or float, not bool), got "
                            f"{type(expand_factor).__name__} {expand_factor!r}")
        try:
            hidden = int(dim * expand_factor)             # the seed's F
        except (ValueError, OverflowError):              # NaN, inf
            hidden = None
        if hidden is None or not 1 <= hidden < 2 ** 62:   # beyond, no tensor can be that large (int64 sizes)
            raise ValueError(f"{fn}: expand_factor must be a finite number with int(compress_window_size * dim_head "
                             f"* expand_factor) >= 1 hidden units (and < 2**62), got {expand_factor!r}")
        self.dim_head, self.compress_window_size, self.heads = dim_head, compress_window_size, heads
        self.backend = _check_backend(fn, "mlp", backend)
        self.dim_hidden = hidden
        self.net = nn.Sequential(
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=dim, o=self.dim_hidden),
            nn.ReLU(),
            EinMix("b h w i -> b h w o", weight_shape="h i o", bias_shape="h o", h=heads, i=self.dim_hidden,
                   o=dim_head),
        )

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        first, last = self.net[0], self.net[2]
        _check_kv(type(self).__name__, kv, first.weight, heads=self.heads, dim_head=self.dim_head,
                  window=self.compress_window_size)
        H, L = self.heads, self.compress_window_size
        b1 = first.bias.view(H, self.dim_hidden)                          # [G, F], a view of (1, H, 1, F)
        b2 = last.bias.view(H, self.dim_head)                             # [G, D_out]
        return kf.mlp(_tokens(kv), first.weight, b1, last.weight, b2, activation="relu", block_size=L, stride=L,
                      padding="valid", backend=self.backend, memory=self.memory)  # [b, h, w, d]


class SingleProjection(nn.Module):
    """The seed's ``SingleProjection``: one linear map per window, without
    bias. Two different networks, as in the seed:

    - heads == 1: ``compress = Sequential(Rearrange('b h w n d -> b h w
      (n d)'), nn.Linear(n*d, d, bias=False))``: the window flattened
      token-major times one (d, n*d) matrix; the kind ``linear`` with
      G = 1 and weight[0, j, i, o] = W[o, j*d + i]. Quirk (kept): that one
      projection serves every head, so kv may have any h.
    - heads > 1: ``compress = EinMix('b h w n i -> b h w o', weight_shape=
      'h i o')``, weight (h, d, d): y = sum over positions j of kv[j] @
      weight[h]. Quirk (kept): one (d, d) projection is shared by all
      positions of a window and the results are summed, so the output does
      not depend on the order of the positions, n need not equal
      compress_window_size, and n = 0 gives zeros (the weight then gets no
      gradient, None, where the seed's gets zeros). It is the kind
      ``linear`` with G = heads, block_size = stride = n and weight[h, j] =
      W[h] for every j (an expanded view).

    Args:
        dim_head (int >= 1): d of the input (and of the output).
        compress_window_size (int >= 1): n (heads == 1) or unused (heads > 1).
        heads (int >= 1, default 1).
        backend (keyword-only, default "auto"): the ``linear`` backend.

    Parameters: ``compress.1.weight`` (d, n*d) (nn.Linear's initialisation)
    if heads == 1, else ``compress.weight`` (h, d, d) (EinMix's).

    forward(kv): kv (b, h, w, n, d) of the parameter's dtype -> (b, h, w, d).
    Errors: the constructor as ConvLinearCompress's. forward raises
    TypeError if kv is not a tensor or has another dtype than the weight;
    ValueError if kv is not 5-D or d != dim_head, and for heads == 1 if
    n != compress_window_size, for heads > 1 if h != heads (the seed raises
    for each of these), or kv is on another device than the weight.
    """

    def __init__(self, dim_head, compress_window_size, heads=1, *, backend="auto"):
        super().__init__()
        fn = type(self).__name__
        dim_head, compress_window_size, heads = (_check_pos_int(fn, name, v) for name, v in (
            ("dim_head", dim_head), ("compress_window_size", compress_window_size), ("heads", heads)))
        self.dim_head, self.compress_window_size, self.heads = dim_head, compress_window_size, heads
        self.backend = _check_backend(fn, "linear", backend)
        self.is_grouped = heads > 1
        if not self.is_grouped:
            self.compress = nn.Sequential(Rearrange("b h w n d -> b h w (n d)"),
                                          nn.Linear(dim_head * compress_window_size, dim_head, bias=False))
        else:
            self.compress = EinMix("b h w n i -> b h w o", weight_shape="h i o", h=heads, i=dim_head, o=dim_head)

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        fn, D = type(self).__name__, self.dim_head
        if not self.is_grouped:
            W = self.compress[1].weight                                   # [D_out, n*D]
            _check_kv(fn, kv, W, dim_head=D, window=self.compress_window_size)
            L = self.compress_window_size
            weight = W.view(D, L, D).permute(1, 2, 0).unsqueeze(0)        # [G=1, L, D_in, D_out], a view
        else:
            W = self.compress.weight                                      # [H, D_in, D_out]
            _, _, _, L, _ = _check_kv(fn, kv, W, heads=self.heads, dim_head=D)
            if L == 0:
                return kv.sum(dim=3)                                      # [b, h, w, d] zeros: an empty sum
            weight = W.unsqueeze(1).expand(self.heads, L, D, D)           # [G=H, L, D_in, D_out], shared over j
        return kf.linear(_tokens(kv), weight, None, block_size=L, stride=L, padding="valid",
                         backend=self.backend)                            # [b, h, w, d]


class Compressor(nn.Module):
    """One compressor kind with its own weights, on keys or values
    x (B, H, T, D): ``forward(x, cu_seqlens=None)`` is
    ``kvcompress.functional.<kind>(x, <parameters>, block_size=..., stride=...,
    padding=..., pe=self.pe, cu_seqlens=cu_seqlens, backend=...)``.
    A kind with more per-token inputs takes them after x:
    ``forward(x, z, cu_seqlens=None)`` for gated_pool.

    Everything kind-specific comes from the kind's record (kvcompress/kinds.py).

    Args:
        kind: one of ``kvcompress.kinds.KINDS`` ("mean_pool",
            "weighted_pool", "linear", "mlp", "attention_pool", ...).
        heads (int >= 1): H of the input (KV heads).
        dim_head (int >= 1): D of the input.
        block_size (int >= 1): L, tokens per window.
        stride (int, 1 <= stride <= block_size): S.
        padding: "valid" (default) or "left" (see kvcompress.functional).
        groups (int >= 1 dividing heads, default 1): G, weight sets; head h
            uses set h // (heads // groups). No effect on mean_pool (no weights).
        dim_out (int >= 1 or None): D_out of the kinds whose parameters
            give it (linear, mlp; default dim_head). Other kinds output the
            D_out they fix (dim_head; gated_pool with split dim_head / C):
            None or that value only.
        hidden (int >= 1 or None): F of mlp (default block_size * dim_head,
            the seed's expand_factor 1). Other kinds: None only.
        activation: "relu" (default), "gelu" or "silu", for mlp. Other
            kinds: "relu" (the default) only.
        bias (bool, default True): the optional parameters (linear's bias,
            mlp's b1 and b2, gated_pool's position bias). No effect on the
            kinds without one.
        pos_emb (bool, default False): a learnable intra-block position
            embedding ``pe`` (H, L, D) added to every window position
            (not for gated_pool, whose bias takes its place).
        backend: "auto" (default) or a backend registered for the kind.
        device, dtype: of the parameters (dtype a floating dtype).
        **options: the kind's other options (gated_pool's ``split``,
            default False).

    Parameters, named like the functional arguments (absent ones are not
    attributes; a disabled bias or pe is None):
        weighted_pool: weight (G, L).    linear: weight (G, L, D, D_out),
        bias (G, D_out).    mlp: w1 (G, L*D, F), b1 (G, F), w2 (G, F,
        D_out), b2 (G, D_out).    attention_pool: weight (G, D, D).
        gated_pool: bias (G, L, D_out).
        Any kind that takes pe, with pos_emb: pe (H, L, D).

    Initialisation (``reset_parameters``, from each parameter's ``init``):
        weighted_pool: weight = 1/L, so it starts as mean_pool.
        attention_pool: weight = 0: every logit is 0, the softmax is
            uniform and it starts as mean_pool (a stable start: no
            position is preferred before training says so). gated_pool:
            bias = 0 (the gate scores alone decide at start).
        linear: weight and bias ~ U(-1/sqrt(L*D), 1/sqrt(L*D)), nn.Linear's
            rule with fan_in = L*D.
        mlp: w1, b1 ~ U(-1/sqrt(L*D), 1/sqrt(L*D)); w2, b2 ~ U(-1/sqrt(F),
            1/sqrt(F)) (nn.Linear's rule per layer).
        pe = 0 (like the seed's intra-block positions): no effect at start.

    forward(x, *inputs, cu_seqlens=None): x (B, H, T, D) with H == heads and
    D == dim_head, of the parameters' dtype and device; the kind's other
    inputs of x's shape; cu_seqlens as in kvcompress.functional. Returns
    (B, H, W, D_out) in x's dtype.

    Errors (the rule of kvcompress.functional): the constructor raises
    TypeError naming the argument for a size that is not an integer (bool
    and float included), a kind, padding, activation or backend that is not
    a str, a non-bool bias or pos_emb, an option the kind does not take, or
    a non-float dtype; ValueError for an unknown kind, a size < 1, a stride
    outside [1, block_size], an unknown padding/activation/backend, groups
    not dividing heads, dim_out, hidden, activation or pos_emb given (other
    than their defaults) to a kind that does not use it, or the kind's own
    constraints (gated_pool's split: stride divides block_size, C divides
    dim_head). forward raises ValueError for an x of the wrong rank, heads
    or head dim, or on another device than the parameters; TypeError for a
    non-tensor x or one of another dtype than the parameters, or a wrong
    number of inputs; and whatever kvcompress.functional raises (e.g. bad
    cu_seqlens).
    """

    def __init__(self, kind, *, heads, dim_head, block_size, stride, padding="valid", groups=1, dim_out=None,
                 hidden=None, activation="relu", bias=True, pos_emb=False, backend="auto", device=None,
                 dtype=None, **options):
        super().__init__()
        fn = "Compressor"
        check_choice(fn, "kind", kind, KINDS)
        rec = _kinds.get(kind)
        heads = _check_pos_int(fn, "heads", heads)
        dim_head = _check_pos_int(fn, "dim_head", dim_head)
        block_size, stride = check_window_args(fn, block_size, stride, padding)
        groups = _check_pos_int(fn, "groups", groups)
        if heads % groups != 0:
            raise ValueError(f"{fn}: groups must divide heads={heads}, got groups={groups}")
        if dim_out is not None:
            dim_out = _check_pos_int(fn, "dim_out", dim_out)
        unknown = sorted(set(options) - set(rec.option_names) - {"activation"})
        if unknown:
            raise TypeError(f"{fn}: {kind} takes no option {unknown} (its options: {list(rec.option_names)})")
        opts = {**rec.defaults, **options}
        if "activation" in rec.option_names:
            check_activation(fn, activation)
            opts["activation"] = activation
        else:
            check_choice(fn, "activation", activation, ACTIVATIONS)
            if activation != "relu":
                raise ValueError(f"{fn}: activation applies to {_kinds_with_option('activation')} only (one of "
                                 f"{ACTIVATIONS}), got activation={activation!r} for {kind}")
        for o in rec.options:
            if o.choices is not None:
                check_choice(fn, o.name, opts[o.name], o.choices)
            elif not isinstance(opts[o.name], bool):
                raise TypeError(f"{fn}: {o.name} must be a bool, got {type(opts[o.name]).__name__}")
        dims = {"G": groups, "L": block_size, "S": stride, "D": dim_head}
        if rec.check is not None:
            rec.check(fn, dims, opts)
        if "D_out" in rec.free_dims:
            dims["D_out"] = dim_head if dim_out is None else dim_out
        else:
            fixed = rec.d_out(dims, opts) if rec.d_out is not None else dim_head
            if dim_out is not None and dim_out != fixed:
                raise ValueError(f"{fn}: dim_out applies to {_kinds_with_free('D_out')}; {kind} outputs "
                                 f"dim_head={dim_head}" + ("" if fixed == dim_head else f" / C = {fixed}")
                                 + f", got dim_out={dim_out!r}")
            dims["D_out"] = fixed
        if "F" in rec.free_dims:
            dims["F"] = block_size * dim_head if hidden is None else _check_pos_int(fn, "hidden", hidden)
        elif hidden is not None:
            raise ValueError(f"{fn}: hidden applies to {_kinds_with_free('F')} only, got hidden={hidden!r} for "
                             f"{kind}")
        if not isinstance(bias, bool):
            raise TypeError(f"{fn}: bias must be a bool, got {type(bias).__name__}")
        if not isinstance(pos_emb, bool):
            raise TypeError(f"{fn}: pos_emb must be a bool, got {type(pos_emb).__name__}")
        if pos_emb and not rec.pe:
            raise ValueError(f"{fn}: {kind} takes no position embedding, got pos_emb=True")
        backend = _check_backend(fn, kind, backend)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: dtype must be None or one of {FLOAT_DTYPES}, got {dtype!r}")

        self.kind, self.heads, self.dim_head, self.dim_out = kind, heads, dim_head, dims["D_out"]
        self.block_size, self.stride, self.padding, self.groups = block_size, stride, padding, groups
        self.hidden = dims.get("F")
        self.activation = activation
        self.options = {k: v for k, v in opts.items() if k != "activation"}
        self.has_bias = bias and any(p.optional for p in rec.params)
        self.pos_emb, self.backend = pos_emb, backend
        self._dims = dims          # plain ints: the module pickles (the record holds functions; looked up by name)

        fk = dict(device=device, dtype=dtype)
        for p in rec.params:
            # a disabled one is registered as None, nn.Linear's convention for bias
            on = bias or not p.optional
            self.register_parameter(p.name, nn.Parameter(torch.empty(rec.shape(p, dims), **fk)) if on else None)
        self.register_parameter("pe", nn.Parameter(torch.empty(heads, block_size, dim_head, **fk))
                                if pos_emb else None)
        self.reset_parameters()

    @property
    def _record(self) -> _kinds.Kind:
        return _kinds.get(self.kind)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as the class docstring says."""
        rec, dims = self._record, self._dims
        with torch.no_grad():
            for p in rec.params:
                t = getattr(self, p.name)
                if t is None:
                    continue
                if p.init == "mean":
                    t.fill_(1.0 / self.block_size)
                elif p.init == "zeros":
                    t.zero_()
                else:
                    bound = 1.0 / math.sqrt(rec.dim(p.fan_in, dims))
                    t.uniform_(-bound, bound)
            if self.pe is not None:
                self.pe.zero_()

    def forward(self, x: torch.Tensor, *inputs, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, T, D) [, the kind's other inputs] -> (B, H, W, D_out); see the class docstring."""
        fn = "Compressor"
        rec = self._record
        n_more = len(rec.inputs) - 1
        if len(inputs) == n_more + 1 and cu_seqlens is None:   # forward(x, cu_seqlens) positionally
            *inputs, cu_seqlens = inputs
        if len(inputs) != n_more:
            raise TypeError(f"{fn}: {self.kind} takes the inputs {rec.inputs}, got {1 + len(inputs)} tensors")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: x must be a torch.Tensor of shape (B, H, T, D), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.heads or x.shape[3] != self.dim_head:
            raise ValueError(f"{fn}: x must have shape (B, H={self.heads}, T, D={self.dim_head}), "
                             f"got {tuple(x.shape)}")
        p = next(self.parameters(), None)
        if p is not None and x.dtype != p.dtype:
            raise TypeError(f"{fn}: x must have the parameters' dtype {p.dtype}, got {x.dtype}")
        if p is not None and x.device != p.device:
            raise ValueError(f"{fn}: x must be on the parameters' device {p.device}, got {x.device}")
        kw = dict(block_size=self.block_size, stride=self.stride, padding=self.padding, cu_seqlens=cu_seqlens,
                  backend=self.backend, **self.options)
        if rec.pe:
            kw["pe"] = self.pe
        if "activation" in rec.option_names:
            kw["activation"] = self.activation
        params = [getattr(self, q.name) for q in rec.params]
        return getattr(kf, self.kind)(x, *inputs, *params, **kw)

    def extra_repr(self) -> str:
        rec = self._record
        parts = [repr(self.kind), f"heads={self.heads}", f"dim_head={self.dim_head}",
                 f"block_size={self.block_size}", f"stride={self.stride}", f"padding={self.padding!r}"]
        if rec.has_weights:
            parts.append(f"groups={self.groups}")
        if "D_out" in rec.free_dims:
            parts.append(f"dim_out={self.dim_out}")
        if "F" in rec.free_dims:
            parts.append(f"hidden={self.hidden}")
        if "activation" in rec.option_names:
            parts.append(f"activation={self.activation!r}")
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        if any(p.optional for p in rec.params):
            parts.append(f"bias={self.has_bias}")
        if rec.pe:
            parts.append(f"pos_emb={self.pos_emb}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _kinds_with_free(dim: str) -> str:
    names = [k for k in KINDS if dim in _kinds.get(k).free_dims]
    return " and ".join(names) if len(names) <= 2 else ", ".join(names)


def _kinds_with_option(option: str) -> str:
    names = [k for k in KINDS if option in _kinds.get(k).option_names]
    return " and ".join(names)
