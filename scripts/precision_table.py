#!/usr/bin/env python
"""How tight is the tolerance model? Error of the built-in backends against
the bound, per kind, dtype and tensor, at the NSA shape (issue 13's table).

For every kind, dtype and backend: one forward and one backward (cotangent
N(0, 1) rounded to the dtype) at B=1, H=4, D=128, L=32, S=16, left padding,
pe and biases on (mlp: F = L*D, relu; gated_pool: the same shape, z and
bias N(0, 1), split off), then, per tensor (y and each gradient), over the
elements whose exact value is not 0:

- ``err``: median |got - exact| / |exact| (the relative error of the kernel),
- ``admits``: median bound / |exact| (the relative error the bound admits),
- ``headroom``: median bound / median |got - exact| (issue 13's target: <= 8
  for a correct strict kernel),
- ``worst``: max |got - exact| / bound (must be <= 1),
- ``rms``: the RMS quality check's ratio (kvcompress.testing.quality; absent
  in trees before it existed),

in each precision class the tree's model has ("strict" and
"io-intermediates"; a tree without classes reports its one model as
"model"). The model is whatever ``kvcompress.testing`` imports: run the
script with PYTHONPATH pointing at an older tree's copy to measure "before"
(scripts/gpu_session.sh phase ``precision``).

    python scripts/precision_table.py --device cuda --T 131072 --out table.json
    python scripts/precision_table.py --device cpu --T 2048 --backends torch      # a CPU run
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool", "gated_pool")
PARAM_NAMES = {"mean_pool": [], "weighted_pool": ["weight"], "linear": ["weight", "bias"],
               "mlp": ["w1", "b1", "w2", "b2"], "attention_pool": ["weight"], "gated_pool": ["z", "bias"]}


def arguments(kind, *, B, H, T, D, L, S, dtype, device, seed=0):
    """(x, params in signature order, pe or None) at the NSA shape, G = H."""
    if kind == "gated_pool":
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(B, T, H, D, device=device, generator=g).to(dtype).transpose(1, 2)
        z = torch.randn(B, T, H, D, device=device, generator=g).to(dtype).transpose(1, 2)
        return x, [z, torch.randn(H, L, D, device=device, generator=g).to(dtype)], None
    sys.path.insert(0, ".")
    from benchmarks.inputs import nsa_arguments
    return nsa_arguments(kind, B=B, H=H, T=T, D=D, L=L, S=S, dtype=dtype, device=device, layout="bthd",
                         pe=True, bias=True)


def case_of(kind, x, named, pe, *, L, S):
    from kvcompress.testing.cases import Case
    B, H, T, D = x.shape
    d_out = {"linear": lambda: named["weight"].shape[-1], "mlp": lambda: named["w2"].shape[-1]}.get(kind, lambda: D)()
    extra = {}
    if kind == "mlp":
        extra["F"] = named["w1"].shape[-1]
    if kind in ("linear", "mlp"):
        extra["bias"] = named.get("bias", named.get("b1")) is not None
    if kind == "mlp":
        extra["bias2"] = named["b2"] is not None
    return Case(kind=kind, dtype=str(x.dtype).replace("torch.", ""), B=B, H=H, G=H, T=T, D=D, block_size=L,
                stride=S, padding="left", use_pe=pe is not None, D_out=d_out, **extra)


def call(kind, backend, x, params, pe, *, L, S):
    import kvcompress.functional as kf
    kw = {} if kind == "gated_pool" else {"pe": pe}
    return getattr(kf, kind)(x, *params, block_size=L, stride=S, padding="left", backend=backend, **kw)


def stats(got, exact, bound):
    got, exact = got.double(), exact.double()
    nz = exact != 0
    err = (got - exact).abs()
    e, b, a = err[nz], bound[nz], exact[nz].abs()
    if e.numel() == 0:
        return None
    med = lambda t: float(t.median())   # noqa: E731
    worst = err / bound
    worst = float(torch.where(torch.isfinite(got), worst, torch.inf).max())
    return {"err": med(e / a), "admits": med(b / a), "headroom": med(b) / max(med(e), 1e-300), "worst": worst}


def models(case, inputs, g):
    """{class: ({tensor: (exact, bound)}, well_conditioned)} for the classes the tree's model has."""
    from kvcompress.testing import gradients
    params = inspect.signature(gradients.model).parameters
    if "precision" not in params:
        return {"model": gradients.model(case, inputs, g)}
    from kvcompress.kinds import PRECISION_CLASSES
    return {p: gradients.model(case, inputs, g, precision=p) for p in PRECISION_CLASSES}


def quality(case, inputs, cls, got, exact):
    """The RMS quality ratio of the output (trees that have the check; the
    strict class in float16/bfloat16), else None."""
    try:
        from kvcompress.testing import quality as q
        from kvcompress.testing import tolerance
    except ImportError:
        return None
    if not q.applies(case.dtype, cls):
        return None
    return q.rms_ratio(case, inputs, got, exact, tolerance.forward_bound(case, inputs, cls))


def one(kind, dtype, backends, *, B, H, T, D, L, S, device):
    from kvcompress.testing._xp import float64_inputs
    x, params, pe = arguments(kind, B=B, H=H, T=T, D=D, L=L, S=S, dtype=dtype, device=device)
    named = dict(zip(PARAM_NAMES[kind], params))
    case = case_of(kind, x, named, pe, L=L, S=S)
    rows = []
    dy = None
    got = {}
    for backend in backends:
        leaves = {"x": x, "pe": pe, **named}
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        y = call(kind, backend, leaves["x"], [leaves[n] for n in PARAM_NAMES[kind]], leaves["pe"], L=L, S=S)
        if dy is None:
            gen = torch.Generator(device=device).manual_seed(5)
            dy = torch.randn(y.shape, device=device, generator=gen).to(y.dtype)
        y.backward(dy)
        got[backend] = {"y": y.detach(), **{k: v.grad for k, v in leaves.items() if v is not None}}
        del y, leaves
    inputs = float64_inputs(x, named, pe)
    inputs.x, inputs.params, inputs.pe, inputs.cu_seqlens = x, named, pe, None   # the harness's Inputs' torch side
    with torch.no_grad():
        for cls, (model, ok) in models(case, inputs, dy.double()).items():
            for backend in backends:
                for name, (exact, bound) in model.items():
                    s = stats(got[backend][name], exact, bound)
                    if s is None:
                        continue
                    if name == "y":
                        r = quality(case, inputs, cls, got[backend]["y"], exact)
                        if r is not None:
                            s["rms"] = r
                    rows.append({"kind": kind, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                                 "class": cls, "tensor": name, "well_conditioned": bool(ok), **s})
            del model
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--backends", nargs="*", default=None, help="default: torch, and triton where registered")
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import kvcompress
    from kvcompress import backends as kb
    print(f"# {a.label}: kvcompress from {kvcompress.__file__}", flush=True)
    rows = []
    for kind in a.kinds:
        for dt in a.dtypes:
            dtype = getattr(torch, dt)
            backends = a.backends or [b.name for b in kb.backends(kind) if b.name in ("torch", "triton")
                                      and a.device in b.devices and b.available() and dtype in b.dtypes]
            t0 = time.perf_counter()
            r = one(kind, dtype, backends, B=1, H=4, T=a.T, D=a.D, L=32, S=16, device=a.device)
            rows += r
            for row in r:
                print(f"{a.label:8s} {row['kind']:15s} {row['dtype']:9s} {row['backend']:7s} {row['class']:17s} "
                      f"{row['tensor']:6s} err {row['err']:.2e} admits {row['admits']:.2e} headroom "
                      f"{row['headroom']:8.1f} worst {row['worst']:.3f}"
                      + (f" rms {row['rms']:.3f}" if "rms" in row else ""), flush=True)
            print(f"# {kind} {dt}: {time.perf_counter() - t0:.1f} s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"label": a.label, "T": a.T, "device": a.device,
                       "card": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
