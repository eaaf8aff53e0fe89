"""The RMS quality check: a statistical test beside the worst-case bound.

The bound of kvcompress/testing/tolerance.py holds for every correct kernel
on every input, so it must allow the worst case of a float32 accumulation,
gamma_n times the magnitude on absolute values. For a long sum (linear's
L*D, the MLP's two layers) that is several ulps of a half-precision output,
and far more for the MLP, whose hidden layer on absolute values is ~sqrt(L*D)
times the real one: room in which a kernel that accumulates in half
precision, or stores an intermediate in the input dtype, hides. A correct
kernel's rounding errors do not line up in the worst case on real data, so
its root-mean-square error over an output is, to a small factor, that of
any other float32 computation of it. The check measures one: the issue's
baseline, "float32 accumulation, output rounded once", is the torch backend
(strict, SPEC 3c) run on the inputs upcast to float32 (float64 for float64),
its output y32 rounded to the dtype as the kernel's store rounds. With y the
exact output, a = y32 - y the baseline's accumulation error and
e = fl(y32) - y its error:

    RMS(got - y) <= TIE * RMS(e) + ORDER * RMS(a) + 2 u_a RMS(M) + tiny_o

- TIE * RMS(e): the output's own rounding. For y^ = y + a' rounded to
  nearest, |fl(y^) - y| <= |fl(y) - y| + 2 |a'| (the roundings of y and
  y^ differ only across a midpoint), so a kernel whose accumulation error
  is as small as the baseline's stays within RMS(e) + 4 RMS(a).
- ORDER * RMS(a): another summation order (blocked, sequential, split-K) of
  the same float32 sums; orders differ by a few times in error size.
- 2 u_a RMS(M): two float32 roundings on the magnitude M (on absolute
  values), for outputs the baseline happens to get exactly (a fused
  multiply-add computes x w + b with one rounding where torch makes two).

In float16/bfloat16 the output's rounding dominates every term for a correct
kernel, while half-precision accumulation of n terms costs ~sqrt(n / 3) u_o
times the partial sums: many times 2 RMS(e) (tests/test_quality.py). In
float32 the same check catches tf32 products. An intermediate rounded once
to the dtype (an io-intermediates kernel) costs about as much as the
output's own rounding, so this check does not tell the classes apart: the
strict class's per-element bound does. It applies to kernels of class
``strict`` in float32, float16 and bfloat16 (float64's "exact" output is
itself a float64 computation), forward outputs only; the gradients are held
to their worst-case bound.

NumPy arrays (the suite) or torch tensors on any device (``_xp.namespace``).
"""

from __future__ import annotations

import numpy as np

from . import _xp
from .tolerance import _units, output_roundings

TIE = 2.0      # times RMS(e): the output's own rounding, ties and all
ORDER = 18.0   # times RMS(a): 2 (1 + 8), another summation order up to 8 times the baseline's error


def applies(dtype: str, precision: str) -> bool:
    """Whether the check applies to a kernel of class ``precision`` in
    ``dtype``: strict kernels, every dtype but float64 (whose "exact" output
    is itself a float64 computation, as rounded as the kernel's)."""
    return precision == "strict" and dtype != "float64"


def _round(xp, y, dtype):
    """y (float64) rounded to ``dtype`` as the kernel's store rounds (to
    nearest; truncated for bfloat16 under Triton's CPU interpreter), as
    float64."""
    import torch
    t = torch.as_tensor(y)
    if output_roundings(dtype) == 2:   # the interpreter's bf16 store truncates a float32
        t = t.to(torch.float32)
        t = (t.view(torch.int32) & ~0xFFFF).view(torch.float32).double()
    else:
        t = t.to(getattr(torch, dtype)).double()
    return t.numpy() if xp.name == "numpy" else t


def baseline(case, inputs):
    """The torch backend's output (B, H, W, D_out) on ``inputs`` (the
    harness's Inputs: torch tensors in the case's dtype) upcast to float32
    (float64 for float64), unrounded, as a float64 array or tensor like
    ``inputs.x64``."""
    import torch

    import kvcompress.functional as kf

    from .records import RECORDS
    acc = torch.float64 if case.dtype == "float64" else torch.float32
    f = getattr(kf, case.kind)

    def cast(t):
        return t.to(acc) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def fn(*args, **kw):
        return f(*map(cast, args), **{k: cast(v) for k, v in kw.items()}, backend="torch")
    with torch.no_grad():
        y = RECORDS[case.kind].call(fn, case, inputs).double()
    xp = _xp.namespace(inputs.x64)
    return y.cpu().numpy() if xp.name == "numpy" else y.to(inputs.x64.device)


def rms_ratio(case, inputs, got, exact, bound) -> float:
    """RMS(got - exact) over the check's allowance (module docstring) for one
    output of ``case``: got (any dtype) and exact (float64) of one shape,
    ``bound`` its tolerance.Bound (for the magnitude M). <= 1 passes; 0.0
    for an empty output; inf when got is not finite."""
    xp = _xp.namespace(exact)
    n = int(np.prod(tuple(exact.shape)))
    if n == 0:
        return 0.0
    err = xp.abs(xp.f64(got) - exact)
    if not bool(xp.all(xp.isfinite(err))):
        return float("inf")
    _, u_a, tiny_o, _ = _units(case.dtype)
    y32 = baseline(case, inputs)
    a = y32 - exact
    e = _round(xp, y32, case.dtype) - exact
    if output_roundings(case.dtype) == 2 and bound.inner is not None:
        # truncation (Triton's CPU interpreter, bfloat16) is not continuous like rounding to nearest: a
        # float32 result a hair below a representable value loses a whole ulp, so the TIE term's
        # |fl(y^) - y| <= |fl(y) - y| + 2 |a'| fails there (a clean-clone CI: y = bias + 2**-32 x, exact
        # in float32, truncated one ulp low by the kernel's other order). Truncation is monotone, so over
        # every result y^ within the worst-case accumulation bound ``inner`` of y the output's error is
        # largest at an end of that interval: that is the output's own rounding error taken here
        e = xp.maximum(xp.abs(e), xp.maximum(xp.abs(_round(xp, exact - bound.inner, case.dtype) - exact),
                                             xp.abs(_round(xp, exact + bound.inner, case.dtype) - exact)))

    def rms(v):
        return (float(xp.sum(v * v)) / n) ** 0.5
    allowed = TIE * rms(e) + ORDER * rms(a) + 2 * u_a * rms(bound.magnitude) + tiny_o
    return rms(err) / allowed


def check(impl, case, inputs, got, exact, bound) -> float | None:
    """The RMS quality ratio of ``impl``'s output on ``case`` when the check
    applies to its precision class and dtype (``applies``), else None; the
    properties assert it is at most 1 (``failure`` words the message)."""
    if not applies(case.dtype, impl.domain.precision):
        return None
    return rms_ratio(case, inputs, got, exact, bound)


def failure(impl, case, rms: float, where: str = "") -> str:
    """The assertion message of a failed RMS check (``where``: the regime)."""
    return (f"{impl.id} in {case.dtype}{where} is within its worst-case bound but fails the RMS quality check "
            f"(kvcompress/testing/quality.py): RMS error {rms:.3g} times what a strict kernel (float32 accumulation, "
            f"output rounded once) may show; half-precision accumulation looks like this.\n  {case!r}")
