"""The code paths added for speed in the Triton backend of mean_pool,
weighted_pool and linear (docs/triton-perf.md), under the interpreter like
tests/test_triton.py. The property suite and tests/test_triton.py already
run every kind through them; here:

- the pooling forward is one launch, pe's share included (computed by every
  program from pe, summed over more than one block of positions when L > 16);
- eager calls take the autograd.Function, tracing takes the custom op, and
  the two give the same bits (same kernels);
- linear's x-gradient falls back to the gathering kernel beyond DXR_MAX_K, and the
  column sums of dy come from torch when no x-gradient kernel runs: both
  still match the torch backend;
- the backward of every kind is deterministic (fixed-order partial sums);
- scripts/gpu_perf.py runs every step on CPU (--dry-run-cpu), and compares saved runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvcompress.functional as kf  # noqa: E402
from kvcompress import backends as kb  # noqa: E402
from kvcompress.ops import _custom_op as tp  # noqa: E402  (eager_call)
from kvcompress.ops._triton import env  # noqa: E402
from kvcompress.ops._triton import launch as tc  # noqa: E402
from kvcompress.ops.linear import triton_impl as linear_triton  # noqa: E402
from kvcompress.testing import gradients  # noqa: E402
from kvcompress.testing.cases import Case, make_inputs  # noqa: E402
from kvcompress.testing.convert import round_to, to_numpy  # noqa: E402
from kvcompress.testing.records import RECORDS  # noqa: E402
from kvcompress.testing.tolerance import compare  # noqa: E402

KINDS = ("mean_pool", "weighted_pool", "linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not env.triton_available():
    pytest.skip("Triton can run neither on a GPU nor in its interpreter here", allow_module_level=True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every Triton output starts as NaN, so an element never written fails."""
    monkeypatch.setenv("KVCOMPRESS_POISON", "1")


def _spy_launches(monkeypatch) -> list[str]:
    """Names of the kernels run through a Launcher from now on."""
    names = []
    real = tc.Launcher.__call__

    def spy(self, grid, *args, **kwargs):
        names.append(self.kernel.__name__)
        return real(self, grid, *args, **kwargs)
    monkeypatch.setattr(tc.Launcher, "__call__", spy)
    return names


def _leaves(case, inputs, *, x_grad=True):
    rec = RECORDS[case.kind]
    src = {"x": inputs.x, **{p.name: inputs.params[p.name] for p in rec.params}, "pe": inputs.pe}
    out = {k: v.detach().requires_grad_(k != "x" or x_grad) for k, v in src.items() if v is not None}
    return out


def _run(case, inputs, leaves, backend, dy):
    rec = RECORDS[case.kind]
    y = getattr(kf, case.kind)(leaves["x"], *[leaves.get(p.name) for p in rec.params], **case.window_kwargs(),
                               pe=leaves.get("pe"), cu_seqlens=inputs.cu_seqlens, backend=backend)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items() if v.requires_grad}


# --------------------------------------------------------------------------- the pooling forward


@pytest.mark.parametrize("small", [False, True], ids=["large_tiles", "small_tiles"])
@pytest.mark.parametrize("kind", ["mean_pool", "weighted_pool"])
def test_pool_forward_is_one_launch_with_pe(kind, small, monkeypatch):
    """With pe, packed sequences and L = 20 > PE_J = 16 (pe's share summed over
    two blocks of positions), C = 3 (C_PAD = 4 partial sums, one padded): the
    forward launches pool_fwd_kernel alone, and the forward and every
    gradient match the torch backend."""
    case = Case(kind=kind, dtype="float32", B=1, H=2, G=1, T=0, D=5, block_size=20, stride=7, padding="left",
                seqlens=(45, 0, 6, 31), use_pe=True, seed=11)
    case = case.replace(T=sum(case.seqlens))
    inputs = make_inputs(case, RECORDS[kind], DEVICE)
    names = _spy_launches(monkeypatch)
    with tc.small_tiles() if small else contextlib.nullcontext():
        leaves = _leaves(case, inputs)
        getattr(kf, kind)(leaves["x"], *[leaves.get(p.name) for p in RECORDS[kind].params], **case.window_kwargs(),
                          pe=leaves["pe"], cu_seqlens=inputs.cu_seqlens, backend="triton")
        assert names == ["pool_fwd_kernel"]
        _check_against_torch(case)


# --------------------------------------------------------------------------- eager and traced paths


@pytest.mark.parametrize("kind", KINDS)
def test_eager_function_and_custom_op_give_the_same_bits(kind):
    """An eager call runs the autograd.Function (no dispatch of the custom
    op), the op itself runs the same kernels: outputs and every gradient are
    bitwise equal."""
    case = Case(kind=kind, dtype="float16", B=2, H=2, G=1, T=37, D=6, block_size=5, stride=2, padding="left",
                D_out=3, use_pe=True, bias=True, layout="bthd", seed=4)
    inputs = make_inputs(case, RECORDS[kind], DEVICE)
    assert tp.eager_call(inputs.x)
    dy = torch.randn(case.B, case.H, case.W, RECORDS[kind].d_out(case)).to(inputs.x.dtype)
    eager = _leaves(case, inputs)
    y_e, g_e = _run(case, inputs, eager, "triton", dy)
    names = {"mean_pool": "_MeanPoolFn", "weighted_pool": "_WeightedPoolFn", "linear": "_LinearFn"}
    probe = _leaves(case, inputs)
    rec = RECORDS[kind]
    y_probe = getattr(kf, kind)(probe["x"], *[probe.get(p.name) for p in rec.params], **case.window_kwargs(),
                                pe=probe.get("pe"), backend="triton")
    assert type(y_probe.grad_fn).__name__.startswith(names[kind])
    op = _leaves(case, inputs)
    params = [op.get(p.name) for p in rec.params]
    y_o = getattr(torch.ops.kvcompress, f"{kind}_triton")(op["x"], *params, op["pe"], None, case.block_size,
                                                         case.stride, case.padding, -1)
    assert not type(y_o.grad_fn).__name__.startswith(names[kind])
    y_o.backward(dy)
    assert torch.equal(y_e, y_o.detach())
    for name, g in g_e.items():
        assert torch.equal(g, op[name].grad), f"d{name} differs between the eager Function and the op"


def test_tracing_goes_through_the_custom_op():
    """Fake tensors and make_fx see the op (one node), not the Function."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        fake = torch.empty(1, 2, 16, 4)
        assert not tp.eager_call(fake)
    seen = []

    def f(x):
        seen.append(tp.eager_call(x))
        return kb.get("mean_pool", "triton").fn(x, block_size=4, stride=2)
    gm = make_fx(f)(torch.randn(1, 2, 16, 4))
    assert seen == [False]
    assert "kvcompress.mean_pool_triton" in gm.code


# --------------------------------------------------------------------------- linear's fallbacks


def test_linear_dx_beyond_dxr_max_k_runs_the_gathering_kernel(monkeypatch):
    """float16 with C_PAD * DO_PAD > DXR_MAX_K (S = 1: C = L windows hold a
    token) takes the gathering x-gradient kernel, its column sums from torch; every
    gradient within tests/test_triton.py's bound of the torch backend."""
    case = Case(kind="linear", dtype="float16", B=1, H=2, G=2, T=24, D=4, block_size=12, stride=1, padding="left",
                D_out=40, use_pe=True, bias=True, seed=2)
    c_pad, do_pad = tc.next_pow2(-(-case.block_size // case.stride)), max(16, tc.next_pow2(case.D_out))
    assert c_pad * do_pad > linear_triton.DXR_MAX_K
    names = _spy_launches(monkeypatch)
    _check_against_torch(case)
    assert "linear_bwd_kernel_dx" in names and "linear_bwd_kernel_dx_rows" not in names


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_linear_param_gradients_without_x_gradient(dtype, monkeypatch):
    """x not requiring grad: no x-gradient kernel runs, the column sums of dy
    (for bias, pe, and pe's term of the weight gradient) come from torch and
    the finalize kernel; the gradients match the torch backend."""
    case = Case(kind="linear", dtype=dtype, B=2, H=4, G=2, T=29, D=6, block_size=4, stride=2, padding="left",
                D_out=5, use_pe=True, bias=True, seed=6)
    names = _spy_launches(monkeypatch)
    _check_against_torch(case, x_grad=False)
    assert not any(n.startswith("linear_bwd_kernel_dx") for n in names)


@pytest.mark.parametrize("small", [False, True], ids=["large_tiles", "small_tiles"])
def test_linear_column_sum_slots(small):
    """float16, several chunk-row tiles (small tiles: BLOCK_K = SLOT_ROWS, one
    slot per tile; large: two slots per tile, the second zeroed) and packed
    sequences: dbias and dpe, which come from the slots, match torch."""
    case = Case(kind="linear", dtype="float16", B=1, H=2, G=1, T=0, D=5, block_size=4, stride=1, padding="valid",
                seqlens=(40, 0, 3, 37), D_out=6, use_pe=True, bias=True, seed=9)
    case = case.replace(T=sum(case.seqlens))
    with tc.small_tiles() if small else contextlib.nullcontext():
        _check_against_torch(case)


def _check_against_torch(case, *, x_grad=True):
    """Forward and every gradient asked for, of the Triton and the torch
    backend, against the exact values within the harness's tolerance model
    (kvcompress/testing/tolerance.py, gradients.py), as tests/test_triton.py
    checks every kind: the two backends then agree within twice it."""
    rec = RECORDS[case.kind]
    inputs = make_inputs(case, rec, DEVICE)
    rng = np.random.default_rng(case.seed + 7)
    dy64 = round_to(rng.standard_normal((case.B, case.H, case.W, rec.d_out(case))), case.dtype)
    dy = torch.from_numpy(dy64).to(inputs.x.dtype).to(DEVICE)
    model, ok = gradients.model(case, inputs, dy64)
    assert ok, f"fixed case is ill-conditioned: {case!r}"
    for backend in ("triton", "torch"):
        y, g = _run(case, inputs, _leaves(case, inputs, x_grad=x_grad), backend, dy)
        assert set(g) == set(model) - {"y"} - ({"x"} if not x_grad else set())
        for name, got in [("y", y), *g.items()]:
            ok, ratio, idx, err = compare(to_numpy(got), *model[name])
            assert ok, f"{backend} {name}: {err:.3g} at {idx} is {ratio:.3g} x the bound\n  {case!r}"


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_backward_is_deterministic(kind):
    """Partial sums (pool programs, linear column-sum slots) are reduced in a
    fixed order: two runs give the same bits."""
    case = Case(kind=kind, dtype="float16", B=1, H=2, G=1, T=45, D=9, block_size=6, stride=2, padding="left",
                D_out=7, use_pe=True, bias=True, seed=3)
    inputs = make_inputs(case, RECORDS[kind], DEVICE)
    dy = torch.randn(case.B, case.H, case.W, RECORDS[kind].d_out(case)).to(inputs.x.dtype)
    runs = [_run(case, inputs, _leaves(case, inputs), "triton", dy)[1] for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"d{name} differs between two runs"


# --------------------------------------------------------------------------- scripts/gpu_perf.py


def test_gpu_perf_counts_the_issue_flops():
    """gpu_perf.py's rates use the FLOP counts issue 4 states at the NSA size
    (B = 1, H = 4, D = 128, L = 32, S = 16, T = 131072, left padding): mlp
    2 W (L D F + F D) with F = L D, 1.134 TFLOP; linear 2 W L D D, 34.4 GFLOP."""
    spec = importlib.util.spec_from_file_location("gpu_perf", os.path.join(ROOT, "scripts", "gpu_perf.py"))
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    nsa = dict(B=1, H=4, T=131072, D=128, L=32, S=16, padding="left")
    assert abs(gp.traffic("mlp", **nsa)[2] / 1e12 - 1.134) < 1e-3
    assert abs(gp.traffic("linear", **nsa)[2] / 1e9 - 34.36) < 1e-2


def test_gpu_perf_script_dry_run(tmp_path):
    """scripts/gpu_perf.py runs every step (correctness, profile, graph and
    eager timing, host overhead, rates, summary, JSON) on CPU in the
    interpreter, and --compare prints two saved runs side by side with the
    speed-up of the second, so the lead's GPU run cannot fail on a bug of the
    script itself."""
    out = tmp_path / "perf.json"
    script = os.path.join(ROOT, "scripts", "gpu_perf.py")
    proc = subprocess.run([sys.executable, script, "--dry-run-cpu", "--label", "new", "--kinds",
                           "weighted_pool,linear", "--layouts", "bthd", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["label"] == "new" and set(res["correctness"]) == {"weighted_pool", "linear"}
    assert all(c["ok"] for c in res["correctness"].values())
    rows = {(r["kind"], r["layout"]): r for r in res["rows"]}
    assert set(rows) == {("weighted_pool", "bthd"), ("linear", "bthd")}
    for r in rows.values():
        assert "error" not in r
        for key in ("graph_fwd_ms", "graph_fwdbwd_ms", "eager_fwd_ms", "eager_fwdbwd_ms", "issue_fwd_us",
                    "issue_fwdbwd_us", "graph_fwd_tbs", "eager_fwdbwd_tbs"):
            assert r[key] > 0, key
        assert r["profile_fwd"]["kernels"] and r["profile_fwdbwd"]["kernels"]
    assert set(res["host"]) == {"weighted_pool", "linear"}
    assert "SUMMARY" in proc.stdout
    old = dict(res, label="old")
    old.pop("label")
    old["variant"] = "old"                       # the key of runs saved before the label existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    cmp = subprocess.run([sys.executable, script, "--compare", f"{tmp_path / 'old.json'},{out}", "--kinds",
                          "weighted_pool,linear", "--layouts", "bthd"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert cmp.returncode == 0, cmp.stdout[-3000:] + cmp.stderr[-3000:]
    assert "speed-up of new over old" in cmp.stdout and "1.00x" in cmp.stdout


# --------------------------------------------------------------------------- the other lease scripts


def test_host_profile_script_runs_on_cpu(tmp_path):
    """scripts/host_profile.py times and profiles a forward and a forward +
    backward through kvcompress.functional (in the interpreter here) and
    writes its report."""
    script = os.path.join(ROOT, "scripts", "host_profile.py")
    proc = subprocess.run([sys.executable, script, "--kinds", "mean_pool,gated_pool", "--top", "5",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "host_profile.txt").read_text()
    assert all(f"### {k} {d}:" in report for k in ("mean_pool", "gated_pool") for d in ("fwd", "fwdbwd"))
    assert "by tottime" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run runs the kernels in Triton's interpreter on the CPU")
def test_ap_sweep_script_dry_run(tmp_path):
    """scripts/ap_sweep.py (attention_pool's kernels one launch configuration
    at a time, GPU runs 57-58) runs every step on a tiny shape in the
    interpreter: the forward, each backward pass (dx, dW with and without
    pe's sums) and the tuned forward + backward, with no step failing, so a
    GPU call cannot be lost to a bug of the script itself."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ap_sweep.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["fwd"] and all("error" not in r and r["same_as_tuned"] for r in res["fwd"])
    assert {r["pass_"] for r in res["bwd"]} == {"dx", "dw+pe", "dw"}
    assert all("error" not in r for r in res["bwd"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run runs the kernels in Triton's interpreter on the CPU")
def test_kind_profile_script_dry_run(tmp_path):
    """scripts/kind_profile.py (the per-kernel profile of kvcompress-bench's
    configuration beside its peers) runs each entrant of gated_pool's CSA
    setting in both directions on a tiny shape, the Triton one in the
    interpreter, with no entrant failing; the compiled peer is the only one
    left out (no torch.compile in the dry run)."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kind_profile.py"), "--kind", "gated_pool",
                           "--dry-run", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ran = {(r["direction"], r["entrant"]) for r in rows if "host_us_per_call" in r}
    assert ran == {(d, e) for d in ("fwd", "fwd+bwd") for e in ("triton", "torch", "deepseek-v4")}, rows
    assert all("error" not in r for r in rows)
    assert {r["entrant"] for r in rows if "skipped" in r} == {"deepseek-v4+compile"}
