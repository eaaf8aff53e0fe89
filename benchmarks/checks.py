"""The correctness gate: nothing is timed before its result is checked.

An entrant is called once on the timing arguments themselves (argument set
0, the exact configuration, T included: the same grid and the same tuned
kernel that will be timed), and slices of that one result are compared
with the exact answer under the project's tolerance model:

- forward, head: the first HEAD_WINDOWS windows. They read only the first
  tokens of x, so the exact answer comes from that slice
  (kvcompress/testing/windows.py, the vectorized NumPy formulation that
  tests/test_reference.py proves equal to the loop reference) and the
  bound from kvcompress/testing/tolerance.py.
- forward, tail: the last TAIL_WINDOWS windows, from the tokens they read
  (they are the valid windows of that slice).
- gradients (fwd+bwd): the backward of the same call with a cotangent that
  is zero except on the first windows (and, for large per-window
  gradients, the first head only: see ``grad_scope``), then again with one
  zero except on the last windows. Every gradient (x, pe, each parameter)
  is then that of one slice alone, compared with
  kvcompress/testing/gradients.py (exact float64 gradients and their derived
  bounds); every gradient element outside the slice must be exactly 0
  (each of its contributions is 0 times a finite value). The last windows
  are there for the parameter gradients: a kernel that reduces them over
  the windows in parts (split-K) and loses a later part is right on the
  first windows alone (tests/mutants/mlp.py's w1_grad_first_split_only).

Two windows overlap (L - S tokens) and the first one holds the left
padding, so the head checks see overlap and padding; the tail checks see
the end of the sequence.

A decoding step (benchmarks/test_bench_decode.py) emits one window per
stream: ``Checker.last_window`` compares it with the exact last window of
every batch row (stream) in the same way, and ``same_bits`` holds a backend
that promises batch invariance to the bits of its own full pass.

The head checks depend on the configuration but not on T
(benchmarks/inputs.py draws the head of x, pe and the parameters
independently of T), so their exact answers are computed once per
configuration and cached.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcompress.testing.cases import Inputs
from kvcompress.testing.convert import round_to, to_numpy
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.records import RECORDS
from kvcompress.testing.slices import token_range, window_slice
from kvcompress.testing.tolerance import compare, forward_bound

HEAD_WINDOWS = 2
TAIL_WINDOWS = 2
GRAD_WINDOWS = 2
# kvcompress/testing/gradients.py materializes every per-window local gradient
# in float64 (the mlp's w1 term is windows x heads x L*D x F): past this
# many elements the gradient check narrows to one head, then one window.
MAX_GRAD_ELEMENTS = 1 << 24


# A peer (the seed's modules, DeepSeek-V4's compressor, fla) promises neither precision class: the seed computes
# in the input dtype, window sums included. Its gate asks that it compute the same function: the RMS error of
# each checked output and gradient at most PEER_RMS_ULPS units of the dtype's rounding (u = 2**-8 bfloat16,
# 2**-11 float16, 2**-24 float32) times the RMS of the exact values. A wrong window, position embedding or
# weight layout errs by O(1); the seed's bfloat16 arithmetic measured 1.4e-3 to 3.7e-3 at the NSA shape
# (H200 runs 47, 56), below 16 u = 6.3e-2 by far.
PEER_RMS_ULPS = 16


def _unit(dtype: str) -> float:
    return {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}[dtype]


def rms_ratio(got64, exact, dtype: str) -> float:
    """RMS(got - exact) / (PEER_RMS_ULPS u RMS(exact)), u the unit roundoff of
    ``dtype``; inf where got has a non-finite element. float64 NumPy arrays
    or torch tensors (both of one kind, any device), of one shape."""
    finite = got64.isfinite().all() if isinstance(got64, torch.Tensor) else np.isfinite(got64).all()
    if not bool(finite):
        return float("inf")
    n = got64.numel() if isinstance(got64, torch.Tensor) else got64.size
    if not n:
        return 0.0
    scale = float((exact ** 2).mean()) ** 0.5
    err = float(((got64 - exact) ** 2).mean()) ** 0.5
    return err / max(PEER_RMS_ULPS * _unit(dtype) * scale, np.finfo(np.float64).tiny)


def _peer_check(got64: np.ndarray, exact: np.ndarray, dtype: str, what: str) -> float:
    """A peer's check: ``rms_ratio``, returned when at most 1, else
    CheckFailed naming ``what`` ("<who> is wrong on ...")."""
    ratio = rms_ratio(got64, exact, dtype)
    if not ratio <= 1:
        raise CheckFailed(f"{what}: its RMS error is {ratio:.3g} times {PEER_RMS_ULPS} units of {dtype} relative to "
                          f"the exact values' RMS (a peer's check); not timed")
    return ratio


class CheckFailed(AssertionError):
    """An entrant's result is outside the tolerance model: it is not timed."""


def head_tokens(case) -> int:
    """Tokens of x that the head checks (forward and gradients) read."""
    return token_range(case, 0, max(1, min(HEAD_WINDOWS, case.W)))[1]


def grad_scope(case) -> tuple[int, int]:
    """(windows, heads) carrying the gradient check's cotangent: GRAD_WINDOWS
    windows of every head, narrowed to the first head and then to one window
    while the harness's per-window gradient arrays exceed MAX_GRAD_ELEMENTS."""
    rec = RECORDS[case.kind]
    D_out = rec.d_out(case)
    per_window = case.L * case.D * (case.F if rec.has_hidden else max(case.D, D_out))
    W = min(GRAD_WINDOWS, case.W)
    for heads, n in ((case.H, W), (1, W), (1, 1)):
        if case.B * heads * n * per_window <= MAX_GRAD_ELEMENTS:
            break
    return min(n, case.W), heads


def _slice(case, sets, first, last, heads=None):
    """The Case and Inputs of the tokens that windows first..last-1 read
    (of the first ``heads`` heads and their weight groups, if given), and
    where those tokens lie in x."""
    ws = window_slice(case, sets.x[0], sets.params[0], sets.pe[0], first=first, last=last,
                      heads=None if heads is None else range(heads))
    return ws.case, ws.inputs, ws.tokens


def _expected(sub, inputs):
    rec = RECORDS[sub.kind]
    return rec.vectorized(sub, inputs.x64, [inputs.params64[p.name] for p in rec.params], inputs.pe64)


def _bound(sub, inputs, precision):
    """The forward bound of class ``precision``, or None for a peer (its RMS check needs the exact values only)."""
    return None if precision == "peer" else forward_bound(sub, inputs, precision)


def _to64(y) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return to_numpy(y)
    return np.asarray(y, dtype=np.float64)


class Checker:
    """The gate, with its exact answers cached (see the module docstring)."""

    def __init__(self):
        self._head: dict = {}
        self._tail: dict = {}
        self._grads: dict = {}
        self._last: dict = {}
        self._full: dict = {}

    def _head_forward(self, case, sets, precision="strict"):
        key = (case.replace(T=0), precision)
        if key not in self._head:
            n = min(HEAD_WINDOWS, case.W)
            sub, inputs, _ = _slice(case, sets, 0, n)
            self._head[key] = (n, _expected(sub, inputs), _bound(sub, inputs, precision), sub)
        return self._head[key]

    def _tail_forward(self, case, sets, precision="strict"):
        if case.W < HEAD_WINDOWS + TAIL_WINDOWS:
            return None                     # the head check already covers every window
        key = (case, precision)
        if key not in self._tail:
            first = case.W - TAIL_WINDOWS
            sub, inputs, _ = _slice(case, sets, first, case.W)
            if not any(k[0] == case for k in self._tail):
                self._tail.clear()          # one T at a time keeps memory bounded
            self._tail[key] = (first, _expected(sub, inputs), _bound(sub, inputs, precision), sub)
        return self._tail[key]

    def gate_class(self, case, sets, precision: str, grad: bool, last: bool = False) -> str:
        """The class the gate holds an entrant of class ``precision`` to on
        ``case``: that class, or "peer" (the RMS check) where one of its
        bounds for the checked windows is ill-conditioned (the first and last
        windows; with ``grad`` their gradients; with ``last`` the last
        window of every row, which a decoding step emits).

        The worst-case model says nothing where a logit's error Delta may
        exceed 1/8 (kvcompress/testing/tolerance.py): the property suite then
        draws another case, but the gate must check the very call it times.
        attention_pool's io-intermediates bound counts the logits and x + pe
        stored in the dtype (2 u_o per unit of logit magnitude A), so with
        the benchmark's inputs (x and pe N(0, 1), W N(0, 1/D)) A reaches 16
        and Delta 1/8 on the first windows at D = 128 (reproduced on the CPU;
        the strict class's Delta is about 1000 times smaller, well conditioned).
        The RMS check still fails an O(1) error (a wrong window, position or
        layout) by far; the property suite is the precise proof."""
        if precision in ("peer", "strict"):
            return precision
        bounds = [self._head_forward(case, sets, precision)[2]]
        tail = self._tail_forward(case, sets, precision)
        if tail is not None:
            bounds.append(tail[2])
        if last:
            bounds.append(self._last_forward(case, sets, precision)[1])
        ok = all(b.well_conditioned for b in bounds)
        if ok and grad:
            ok = all(self._grad(case, sets, part, precision)[-1].well_conditioned for part in self.grad_parts(case))
        return precision if ok else "peer"

    def _last_forward(self, case, sets, precision="strict"):
        key = (case, precision)
        if key not in self._last:
            sub, inputs, _ = _slice(case, sets, case.W - 1, case.W)
            if not any(k[0] == case for k in self._last):
                self._last.clear()          # one configuration at a time keeps memory bounded
            self._last[key] = (_expected(sub, inputs), _bound(sub, inputs, precision), sub)
        return self._last[key]

    def forward(self, case, sets, y, who: str, precision: str = "strict") -> float:
        """Compare the first and last windows of ``y`` (B, H, W, D_out; a
        tensor in the input's dtype, or an ndarray from the reference: the
        entrant's output on argument set 0) with the exact answer, under the
        bound of class ``precision`` ("strict", "io-intermediates"), or the
        RMS check of a "peer". Returns the worst error / bound; raises
        CheckFailed."""
        if tuple(y.shape) != (case.B, case.H, case.W, sets.d_out):
            raise CheckFailed(f"{who}: output shape {tuple(y.shape)}, expected (B, H, W, D_out) = "
                              f"{(case.B, case.H, case.W, sets.d_out)}; not timed")
        if isinstance(y, torch.Tensor) and y.dtype != sets.dtype:   # another dtype writes other bytes
            raise CheckFailed(f"{who}: output dtype {y.dtype}, expected the input's {sets.dtype}; not timed")
        n, expected, bound, sub = self._head_forward(case, sets, precision)
        parts = [("first", 0, n, expected, bound, sub)]
        tail = self._tail_forward(case, sets, precision)
        if tail is not None:
            first, texp, tbound, tsub = tail
            parts.append(("last", first, case.W, texp, tbound, tsub))
        worst = 0.0
        for where, w0, w1, exp, b, sub in parts:
            if b is None:                   # a peer: the RMS check
                worst = max(worst, _peer_check(_to64(y[:, :, w0:w1]), exp, case.dtype,
                                               f"{who} is wrong on the {where} windows of {case!r}"))
                continue
            if not b.well_conditioned:
                raise CheckFailed(f"{who}: the check of the {where} windows is ill-conditioned under the tolerance "
                                  f"model ({sub!r}): choose another seed for this configuration")
            ok, ratio, idx, err = compare(_to64(y[:, :, w0:w1]), exp, b.bound)
            worst = max(worst, ratio)
            if not ok:
                raise CheckFailed(
                    f"{who} is wrong on the {where} windows of {case!r}: |error| {err:.3g} at (b, h, w, c) = "
                    f"{idx} (w counted from window {w0}) is {ratio:.3g} times its bound {b.bound[idx]:.3g}; "
                    f"not timed")
        return worst

    def last_window(self, case, sets, y, who: str, precision: str = "strict") -> float:
        """Compare ``y`` (B, H, D_out), a tensor in the input's dtype: one
        token per batch row, with the exact last window W - 1 of every row
        of argument set 0 (what a decoding step emits when it delivers a
        row's last token). Returns the worst error / bound; raises
        CheckFailed."""
        if tuple(y.shape) != (case.B, case.H, sets.d_out):
            raise CheckFailed(f"{who}: output shape {tuple(y.shape)}, expected one window per stream (N, H, D_out) "
                              f"= {(case.B, case.H, sets.d_out)}; not timed")
        if y.dtype != sets.dtype:
            raise CheckFailed(f"{who}: output dtype {y.dtype}, expected the input's {sets.dtype}; not timed")
        expected, b, sub = self._last_forward(case, sets, precision)
        if b is None:
            return _peer_check(_to64(y[:, :, None]), expected, case.dtype,
                               f"{who} is wrong on the last window of {case!r}")
        if not b.well_conditioned:
            raise CheckFailed(f"{who}: the check of the last window is ill-conditioned under the tolerance model "
                              f"({sub!r}): choose another seed for this configuration")
        ok, ratio, idx, err = compare(_to64(y[:, :, None]), expected, b.bound)
        if not ok:
            raise CheckFailed(f"{who} is wrong on the last window of {case!r}: |error| {err:.3g} at (stream, h, w, c) "
                              f"= {idx} is {ratio:.3g} times its bound {b.bound[idx]:.3g}; not timed")
        return ratio

    def same_bits(self, case, sets, y, backend: str, who: str) -> None:
        """``y`` (B, H, D_out) must equal, bit for bit, the last window of
        every row of ``backend``'s full pass over argument set 0 (the promise
        of a batch-invariant backend: a window's bits do not depend on what
        else is in the call). Raises CheckFailed."""
        import kvcompress.functional as kf

        key = (case, backend)
        if key not in self._full:
            rec = RECORDS[case.kind]
            inp = Inputs(x64=None, params64=None, pe64=None, x=sets.x[0], params=sets.params[0], pe=sets.pe[0],
                         cu_seqlens=None, cu64=None)
            with torch.no_grad():
                full = rec.call(getattr(kf, case.kind), case, inp, backend=backend)
            self._full.clear()
            self._full[key] = full[:, :, -1].clone()                                 # [B, H, D_out]
        full = self._full[key]
        if tuple(y.shape) != tuple(full.shape) or not torch.equal(y, full):
            bad = torch.nonzero(y != full) if y.shape == full.shape else None
            where = (f"{len(bad)} elements, the first at (stream, h, c) = {tuple(bad[0].tolist())}: "
                     f"{y[tuple(bad[0])].item()!r} != {full[tuple(bad[0])].item()!r}") if bad is not None and len(bad) \
                else f"shape {tuple(y.shape)} != {tuple(full.shape)}"
            raise CheckFailed(f"{who}: backend {backend!r} promises batch invariance, but the step's tokens differ "
                              f"from its full pass's last windows ({where}); not timed")

    def grad_parts(self, case) -> list[str]:
        """The gradient checks of ``case``, in order: "first" and, when the
        last windows are others, "last"."""
        n, _ = grad_scope(case)
        return ["first", "last"] if case.W > n else ["first"]

    def _grad(self, case, sets, part: str, precision: str = "strict"):
        """(first window, windows, heads, token range, cotangent, GradBounds)
        of the gradient check ``part``; the first windows' depend on the
        configuration only, the last windows' on T too."""
        if part not in ("first", "last"):
            raise ValueError(f"part must be 'first' or 'last', got {part!r}")
        n, heads = grad_scope(case)
        key = case.replace(T=0) if part == "first" else case
        cache = self._grads.setdefault(part, {})
        if key not in cache:
            w0 = 0 if part == "first" else case.W - n
            sub, inputs, tokens = _slice(case, sets, w0, w0 + n, heads)
            rng = np.random.default_rng(case.seed + (7 if part == "first" else 8))
            g64 = round_to(rng.standard_normal((case.B, heads, n, sets.d_out)), case.dtype)
            cache.clear()                   # the exact mlp gradients are large: keep one configuration's
            cache[key] = (w0, n, heads, tokens, g64, {}, (sub, inputs))
        w0, n, heads, tokens, g64, by_class, (sub, inputs) = cache[key]
        cls = "strict" if precision == "peer" else precision          # a peer reads only the exact values
        if cls not in by_class:
            by_class[cls] = exact_and_bounds(sub, inputs, g64, cls)
        return w0, n, heads, tokens, g64, by_class[cls]

    def cotangent(self, case, sets, part: str = "first") -> torch.Tensor:
        """(B, H, W, D_out) in the case's dtype: zero except on the windows and
        heads of ``grad_scope(case)``, the first ones or the last ones."""
        w0, n, heads, _, g64, _ = self._grad(case, sets, part)
        g = torch.zeros((case.B, case.H, case.W, sets.d_out), dtype=sets.dtype, device=sets.device)
        g[:, :heads, w0:w0 + n] = torch.from_numpy(g64).to(sets.dtype).to(sets.device)
        return g

    def gradients(self, case, sets, grads: dict, who: str, part: str = "first", precision: str = "strict") -> float:
        """Compare gradients of sum(y * cotangent(case, sets, part)) (name ->
        tensor in the record's layout: "x", "pe" and each parameter) with the
        exact ones, under the bounds of class ``precision`` or a peer's RMS
        check. Returns the worst error / bound; raises CheckFailed."""
        w0, n, heads, (t0, t1), _, gb = self._grad(case, sets, part, precision)
        where = f"the {part} windows ({w0}..{w0 + n - 1})"
        if not gb.well_conditioned:
            raise CheckFailed(f"{who}: the gradient check of {where} is ill-conditioned under the tolerance model "
                              f"({case!r})")
        if set(grads) != set(gb.exact):
            raise CheckFailed(f"{who}: gradients of {sorted(grads)}, expected {sorted(gb.exact)}")
        groups = case.G if heads == case.H else 1
        per_token = {"x"} | {p.name for p in RECORDS[case.kind].params if p.per_token}
        worst = 0.0
        for name, got in grads.items():
            if got is None:
                raise CheckFailed(f"{who}: no gradient for {name}; not timed")
            region = ((slice(None), slice(0, heads), slice(t0, t1)) if name in per_token
                      else {"pe": (slice(0, heads),)}.get(name, (slice(0, groups),)))
            outside = got.detach().clone()
            outside[region] = 0
            if torch.count_nonzero(outside).item():
                raise CheckFailed(f"{who}: the gradient of {name} is nonzero outside {region}, where every "
                                  f"contribution has a zero cotangent ({where}); not timed")
            got64 = to_numpy(got[region])
            exact, bound = gb.exact[name], gb.bound[name]
            if got64.shape != exact.shape:
                raise CheckFailed(f"{who}: gradient of {name} has shape {got64.shape} in the checked region, "
                                  f"expected {exact.shape}")
            if precision == "peer":
                worst = max(worst, _peer_check(got64, exact, case.dtype,
                                               f"{who}: the gradient of {name} is wrong on {where} ({case!r})"))
                continue
            err = np.where(np.isfinite(got64), np.abs(got64 - exact), np.inf)
            ratio = err / bound
            if ratio.size:
                i = np.unravel_index(np.argmax(ratio), ratio.shape)
                worst = max(worst, float(ratio[i]))
                if ratio[i] > 1:
                    raise CheckFailed(f"{who}: the gradient of {name} is wrong on {where}: |error| {err[i]:.3g} at "
                                      f"{i} is {ratio[i]:.3g} times its bound {bound[i]:.3g} ({case!r}); not timed")
        return worst
