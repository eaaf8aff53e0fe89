"""``assert_matches_reference``: one check of one call against the loop
reference, within the suite's tolerance model, in the spirit of
``torch.testing.assert_close``. For a project that wants a single assertion
in its own tests rather than the whole property suite."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .cases import Case, Inputs
from .convert import DTYPES, round_to, to_numpy
from .records import RECORDS
from .tolerance import compare, forward_bound

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def check_output_form(impl, case, got: torch.Tensor, dtype: str, key: str) -> None:
    """The properties' first check of an output: shape (B, H, W, D_out),
    dtype and device. A failure is also counted under ``key`` in the report
    (kvcompress/testing/report.py), so the mutation self-test sees it."""
    from . import report

    want = (case.B, case.H, case.W, RECORDS[impl.kind].d_out(case))
    if tuple(got.shape) != want or got.dtype != DTYPES[dtype] or got.device.type != impl.device:
        report.observe(key, failed=True)
    assert tuple(got.shape) == want, f"{impl.id}: output shape {tuple(got.shape)}, expected (B, H, W, D_out) = " \
                                     f"{want}\n  {case!r}"
    assert got.dtype == DTYPES[dtype], f"{impl.id}: output dtype {got.dtype}, expected {DTYPES[dtype]}\n  {case!r}"
    assert got.device.type == impl.device, f"{impl.id}: output on {got.device}, input on {impl.device}"


def _case_and_inputs(kind, x, params, *, block_size, stride, padding, pe, cu_seqlens, options):
    if kind not in RECORDS:
        raise ValueError(f"assert_matches_reference: kind must be one of {tuple(RECORDS)}, got {kind!r}")
    rec = RECORDS[kind]
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"assert_matches_reference: x must be a 4-D tensor (B, H, T, D), got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    if x.dtype not in _DTYPE_NAMES:
        raise TypeError(f"assert_matches_reference: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if len(params) != len(rec.params):
        names = ", ".join(p.name for p in rec.params) or "none"
        raise TypeError(f"assert_matches_reference: {kind} takes the parameters ({names}) after x, "
                        f"got {len(params)}")
    p = dict(zip((s.name for s in rec.params), params))
    if pe is not None and not rec.kind.pe:
        raise ValueError(f"assert_matches_reference: {kind} takes no pe")
    unknown = sorted(set(options) - set(rec.kind.option_names))
    if unknown:
        raise TypeError(f"assert_matches_reference: {kind} takes the options "
                        f"({', '.join(rec.kind.option_names) or 'none'}), got {unknown}")
    B, H, T, D = x.shape
    seqlens = None
    if cu_seqlens is not None:
        cu = cu_seqlens.detach().cpu().long().tolist()
        seqlens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    # G: the leading dim of the first given parameter that has one (gated_pool's z is per token: its bias)
    grouped = next((p[s.name] for s in rec.kind.params if s.shape[:1] == ("G",) and p[s.name] is not None), None)
    fields = dict(kind=kind, dtype=_DTYPE_NAMES[x.dtype], B=B, H=H, G=grouped.shape[0] if grouped is not None else 1,
                  T=T, D=D, block_size=block_size, stride=stride, padding=padding, seqlens=seqlens,
                  cu_dtype="int64" if cu_seqlens is None or cu_seqlens.dtype == torch.int64 else "int32",
                  use_pe=pe is not None)
    if kind == "linear":
        fields.update(D_out=p["weight"].shape[-1], bias=p["bias"] is not None)
    elif kind == "mlp":
        fields.update(D_out=p["w2"].shape[-1], F=p["w1"].shape[-1], bias=p["b1"] is not None,
                      bias2=p["b2"] is not None)
    fields.update(rec.kind.defaults, **options)          # the kind's options (Case fields of the same names)
    case = Case(**fields)
    inputs = Inputs(x64=to_numpy(x), params64={k: to_numpy(v) for k, v in p.items()}, pe64=to_numpy(pe),
                    x=x, params=p, pe=pe, cu_seqlens=cu_seqlens,
                    cu64=None if cu_seqlens is None else cu_seqlens.detach().cpu().long().numpy())
    return case, inputs


def assert_matches_reference(kind: str, actual: torch.Tensor | Callable, x: torch.Tensor, *params,
                             block_size: int, stride: int, padding: str = "valid", pe: torch.Tensor | None = None,
                             cu_seqlens: torch.Tensor | None = None, check_grad: bool = False, seed: int = 0,
                             precision: str = "io-intermediates", **options) -> None:
    """Assert that one call of an implementation of ``kind`` equals the loop
    reference within the tolerance model (docs/semantics.md, "Tolerance").

    kind: one of ``kvcompress.kinds.KINDS``.
    actual: the implementation's output (B, H, W, D_out), or the
    implementation itself (a callable with the reference signature), which
    is then called on the inputs (needed for ``check_grad``).
    x: (B, H, T, D) float16/bfloat16/float32/float64, any device and strides;
    params: the kind's parameters in the reference's order (weighted_pool:
    weight (G, L); linear: weight (G, L, D, D_out), bias (G, D_out) or None;
    mlp: w1 (G, L*D, F), b1, w2 (G, F, D_out), b2; attention_pool: weight
    (G, D, D)), in x's dtype. block_size, stride, padding, pe (H, L, D) or
    None (gated_pool takes none; its parameters are z (B, H, T, D) and bias
    (G, L, D_out) or None), cu_seqlens (N+1,) or None: as in the reference.
    options: the kind's options by name, as in the reference (mlp's
    ``activation``, gated_pool's ``split``; ``kvcompress.kinds``), each
    defaulting to the kind's default.
    check_grad: also compare the gradients with respect to x, every
    parameter and pe with the exact float64 gradients for a random cotangent
    (drawn from ``seed``), within the backward tolerance model.
    precision: the precision class the implementation is held to (SPEC 3c:
    "io-intermediates", the loosest the contract allows, or "strict").

    Raises AssertionError naming the worst element, its error, its bound and
    the two values; ValueError when the inputs are ill-conditioned for the
    tolerance model (e.g. attention logits so large that the float32
    accumulation the contract allows may move the softmax arbitrarily: no
    bound says anything there) or malformed.
    """
    case, inputs = _case_and_inputs(kind, x, params, block_size=block_size, stride=stride, padding=padding,
                                    pe=pe, cu_seqlens=cu_seqlens, options=options)
    rec = RECORDS[kind]
    b = forward_bound(case, inputs, precision)
    if not b.well_conditioned:
        raise ValueError(f"assert_matches_reference: these {kind} inputs are ill-conditioned in {case.dtype} "
                         "(an overflowing magnitude, or attention logits beyond the model's range): the "
                         "tolerance model bounds nothing here")
    expected = rec.call_reference(case, inputs)
    if callable(actual) and not isinstance(actual, torch.Tensor):
        fn = actual
        leaves = {"x": x.detach().requires_grad_(check_grad)}
        for name, t in inputs.params.items():
            if t is not None:
                leaves[name] = t.detach().requires_grad_(check_grad)
        if pe is not None:
            leaves["pe"] = pe.detach().requires_grad_(check_grad)
        args = [leaves.get(s.name) for s in rec.params]
        with torch.enable_grad():
            out = fn(leaves["x"], *args, **rec.kwargs(case, leaves.get("pe"), cu_seqlens))   # pe only if it takes pe
    else:
        if check_grad:
            raise ValueError("assert_matches_reference: check_grad needs the implementation (a callable), "
                             "not its output")
        fn, out, leaves = None, actual, None
    want = (case.B, case.H, case.W, rec.d_out(case))
    if tuple(out.shape) != want:
        raise AssertionError(f"{kind}: output shape {tuple(out.shape)}, expected (B, H, W, D_out) = {want}")
    if out.dtype != x.dtype:
        raise AssertionError(f"{kind}: output dtype {out.dtype}, expected x's dtype {x.dtype}")
    got = to_numpy(out)
    ok, ratio, idx, err = compare(got, expected, b.bound)
    if not ok:
        raise AssertionError(f"{kind} differs from the reference in {case.dtype}: |error| {err:.3g} at (b, h, w, c) "
                             f"= {idx} is {ratio:.3g} times its bound {b.bound[idx]:.3g} (got {got[idx]!r}, "
                             f"expected {expected[idx]!r})\n  {case!r}")
    if not check_grad:
        return
    from .gradients import exact_and_bounds

    g64 = round_to(np.random.default_rng(seed).standard_normal(want), case.dtype)
    gb = exact_and_bounds(case, inputs, g64, precision)
    if not gb.well_conditioned:
        raise ValueError(f"assert_matches_reference: the gradients of these {kind} inputs are ill-conditioned "
                         f"in {case.dtype}: the backward tolerance model bounds nothing here")
    if out.numel() == 0 and not out.requires_grad:
        return
    if not out.requires_grad:
        raise AssertionError(f"{kind}: check_grad=True, but the output does not require grad")
    g = torch.from_numpy(g64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True)
    for (name, leaf), got_g in zip(leaves.items(), grads):
        got64 = np.zeros(leaf.shape) if got_g is None else to_numpy(got_g)
        ok, ratio, idx, err = compare(got64, gb.exact[name], gb.bound[name])
        if not ok:
            raise AssertionError(f"{kind}: gradient of {name} in {case.dtype}: |error| {err:.3g} at {idx} is "
                                 f"{ratio:.3g} times its bound {gb.bound[name][idx]:.3g} (got {got64[idx]!r}, exact "
                                 f"{gb.exact[name][idx]!r})\n  {case!r}")
