"""The Launcher's direct launch (kvcompress/ops/_triton/launch.py,
``Launcher.launch``), which calls a compiled kernel's own launcher instead of
Triton's JITFunction.run once a specialisation has been launched. It runs only
on a GPU (the GPU suite covers its results); here a fake kernel records what
each path receives, so that the cache key and the argument order are checked
on any machine:

- the first call of a specialisation goes through ``kernel[grid]``, the next
  ones through the compiled kernel's launcher, given every parameter in
  signature order (constexprs and defaults after the positional arguments)
  and the grid evaluated on them;
- a different dtype, 16-byte alignment, integer value or keyword goes
  through ``kernel[grid]`` again (a new specialisation); a different grid
  function does not (it is evaluated on every call);
- an unhashable argument, a parameter the launch cannot place, or the switch
  off (``_direct`` None) never take the direct path.
"""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from kvcompress.ops._triton import launch as tc  # noqa: E402


class _Param:
    def __init__(self, name, default=inspect.Parameter.empty):
        self.name, self.default = name, default


class _FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _FakeKernel:
    """JITFunction's surface that Launcher.launch uses: arg_names, params,
    kernel[grid](*args, **kwargs) returning the compiled kernel."""

    __name__ = "fake_kernel"
    arg_names = ["x", "n", "y", "BLOCK", "FLAG"]
    params = [_Param("x"), _Param("n"), _Param("y"), _Param("BLOCK"), _Param("FLAG", default=True)]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.log)
        return run


@pytest.fixture
def launcher(monkeypatch):
    """A GPU-side Launcher (tuned, untuned launches: the first configuration)
    around the fake kernel, the direct launch on."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tc, "AUTOTUNE", False)
    lau = tc.Launcher.__new__(tc.Launcher)
    lau.kernel = _FakeKernel()
    lau.configs, lau.prune, lau.tuned = [triton.Config({"BLOCK": 16}, num_warps=4, num_stages=2)], None, object()
    lau._direct, lau._only = {}, None
    lau._defaults = {p.name: p.default for p in lau.kernel.params if p.default is not inspect.Parameter.empty}
    return lau


def grid(meta):
    return (meta["n"] // meta["BLOCK"], 2)


def test_second_call_is_direct_with_every_parameter_in_order(launcher):
    x, y = torch.zeros(8), torch.ones(8)
    launcher(grid, x, 64, y)
    launcher(grid, x, 64, y)
    log = launcher.kernel.log
    assert [e[0] for e in log] == ["jit", "direct"]
    assert log[0][3] == {"BLOCK": 16, "num_warps": 4, "num_stages": 2}     # the configuration, through JIT
    _, g, args = log[1]
    assert g == (4, 2, 1)                                   # grid(meta) on the bound parameters, padded to 3
    assert args[:3] == (x, 64, y) and args[3:] == (16, True)    # BLOCK, then FLAG's default; no options


@pytest.mark.parametrize("change", ["dtype", "alignment", "int", "keyword"])
def test_a_new_specialisation_goes_through_jit(launcher, change):
    x, y = torch.zeros(16), torch.ones(16)
    launcher(grid, x, 64, y)
    args, kw, g = (x, 64, y), {}, grid
    if change == "dtype":
        args = (x.double(), 64, y)
    elif change == "alignment":
        args = (x[1:], 64, y)                               # 4 bytes past an aligned address
    elif change == "int":
        args = (x, 65, y)
    else:
        kw = {"FLAG": False}
    launcher(g, *args, **kw)
    assert [e[0] for e in launcher.kernel.log] == ["jit", "jit"]
    launcher(g, *args, **kw)                                # and that one is cached in turn
    assert launcher.kernel.log[-1][0] == "direct"
    assert launcher.kernel.log[-1][2][4] == kw.get("FLAG", True)


def test_each_call_evaluates_its_own_grid(launcher):
    """The grid is not in the key (attention_pool and linear build a new grid
    function a call): a hit evaluates the call's grid, on the constexprs alone
    when it reads only those."""
    x, y = torch.zeros(8), torch.ones(8)
    launcher(grid, x, 64, y)
    seen = []

    def by_block(meta):
        seen.append(dict(meta))
        return (meta["BLOCK"], 3)
    launcher(by_block, x, 64, y)
    launcher(grid, x, 128, y)                               # another int: a new specialisation, through JIT
    launcher(grid, x, 128, y)
    log = launcher.kernel.log
    assert [e[0] for e in log] == ["jit", "direct", "jit", "direct"]
    assert log[1][1] == (16, 3, 1) and seen == [{"BLOCK": 16, "FLAG": True}]
    assert log[3][1] == (8, 2, 1)


def test_unhashable_or_unplaceable_or_off_stays_on_jit(launcher):
    x = torch.zeros(8)
    for _ in range(2):
        launcher(grid, x, 64, [1])                          # a list argument: no key
    for _ in range(2):
        launcher(grid, x, 64)                               # y given nowhere: no argument list to cache
    launcher._direct = None
    for _ in range(2):
        launcher(grid, x, 64, x)
    assert [e[0] for e in launcher.kernel.log] == ["jit"] * 6


def test_only_config_launches_the_picked_configuration_through_jit(launcher):
    """Inside ``only_config`` every launch runs the configuration its pick
    takes from those the prune keeps, through JITFunction.run, never a
    directly launched kernel cached for another configuration; a pick of
    None launches as usual; afterwards the launcher is as before."""
    x, y = torch.zeros(8), torch.ones(8)
    launcher(grid, x, 64, y)                                # the first configuration, now cached for direct launch
    other = triton.Config({"BLOCK": 32}, num_warps=8, num_stages=3)
    launcher.configs.append(other)
    seen = []

    def pick(kept):
        seen.append([c.kwargs["BLOCK"] for c in kept])
        return kept[-1]
    with tc.only_config(launcher, pick) as runs:
        launcher(grid, x, 64, y)
        launcher(grid, x, 64, y)
    launcher(grid, x, 64, y)
    log = launcher.kernel.log
    assert [e[0] for e in log] == ["jit", "jit", "jit", "direct"]
    assert log[1][3] == log[2][3] == {"BLOCK": 32, **other.all_kwargs()}
    assert runs == [other, other] and seen == [[16, 32], [16, 32]]
    assert log[3][2][3] == 16                               # the cached first configuration again
    launcher.prune = lambda configs, named: [c for c in configs if c.kwargs["BLOCK"] <= named["n"] // 4]
    with tc.only_config(launcher, lambda kept: kept[1] if len(kept) > 1 else None) as runs:
        launcher(grid, x, 64, y)                            # the prune keeps BLOCK 16 only: as usual (direct)
        launcher(grid, x, 128, y)                           # it keeps both: BLOCK 32, through JIT
    assert runs == [other] and [e[0] for e in log[4:]] == ["direct", "jit"]


def test_picks_since_a_snapshot(launcher, monkeypatch):
    """kvcompress-bench's record of the autotuner's picks: only the keys tuned
    after the snapshot, under their kernel's name."""
    launcher.best = {("old",): launcher.configs[0]}
    monkeypatch.setattr(tc, "LAUNCHERS", [launcher])
    keys = tc.tuned_keys()
    assert tc.picks_since(keys) == {}
    launcher.best[("new",)] = triton.Config({"BLOCK": 32}, num_warps=8)
    assert tc.picks_since(keys) == {"fake_kernel": [str(launcher.best[("new",)])]}
    assert "BLOCK: 32" in tc.picks_since(keys)["fake_kernel"][0]


def test_direct_wrapper_of_a_plain_launch(monkeypatch):
    """``Direct`` (kernels launched without autotuning): a tuple grid, the
    second call direct with the grid as given; a keyword tensor never
    direct (it would be keyed by identity and kept alive by the cache)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    d = tc.Direct.__new__(tc.Direct)
    d.kernel, d._direct = _FakeKernel(), {}
    d._defaults = tc._defaults(d.kernel)
    x, y = torch.zeros(8), torch.ones(8)
    for _ in range(2):
        d((3, 2), x, 64, y, BLOCK=16, num_warps=4)
    for _ in range(2):
        d((3,), x, 64, y=y, BLOCK=16)
    log = d.kernel.log
    assert [e[0] for e in log] == ["jit", "direct", "jit", "jit"]
    assert log[1][1] == (3, 2, 1) and log[1][2] == (x, 64, y, 16, True)
    assert len(d._direct) == 1


def test_switch_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_TRITON_FAST_LAUNCH", "maybe")
    with pytest.raises(ValueError, match="KVCOMPRESS_TRITON_FAST_LAUNCH"):
        tc._fast_launch_setting()
    monkeypatch.setenv("KVCOMPRESS_TRITON_FAST_LAUNCH", "0")
    assert tc._fast_launch_setting() is False
    if tc.INTERPRET:
        assert tc.FAST_LAUNCH is False                      # the interpreter has no compiled kernels


def _launchers():
    """Every Launcher and Direct of the Triton backends' modules (and of mlp's
    gemm backend's data-movement kernels)."""
    import importlib
    mods = [f"kvcompress.ops.{k}.triton_impl" for k in ("mean_pool", "weighted_pool", "linear", "mlp",
                                                          "attention_pool", "gated_pool")]
    mods += ["kvcompress.ops._triton_pool", "kvcompress.ops._triton.gemv", "kvcompress.ops._triton.ring",
             "kvcompress.ops.mlp._window_copy"]
    return [v for m in mods for v in vars(importlib.import_module(m)).values()
            if isinstance(v, (tc.Launcher, tc.Direct))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not tc.FAST_LAUNCH, reason="the direct launch is off (Triton version or switch)")
@pytest.mark.parametrize("kind, backend", [(k, "triton") for k in ("mean_pool", "weighted_pool", "linear", "mlp",
                                                                      "attention_pool", "gated_pool")]
                         + [("mlp", "gemm")])
def test_gpu_repeat_calls_skip_jit_run_and_match_it(kind, backend, monkeypatch):
    """On a GPU: once a call's kernels have run, a call on new tensors of the
    same shapes launches every Launcher's and Direct's kernel directly (no
    JITFunction.run for them), and its outputs and gradients are bit for bit
    those of the same call with the direct launch off."""
    from triton.runtime.jit import JITFunction

    import kvcompress.functional as kf
    from benchmarks.inputs import nsa_arguments

    launched = {id(lau.kernel) for lau in _launchers()}
    fn = getattr(kf, kind)

    def call(seed):
        x, params, pe = nsa_arguments(kind, B=1, H=4, T=1024, D=64, L=32, S=16, dtype=torch.bfloat16,
                                      device="cuda", layout="bthd", pe=kind != "gated_pool", bias=True,
                                      grad=True, seed=seed)
        kw = dict(block_size=32, stride=16, padding="left", backend=backend)
        if kind != "gated_pool":
            kw["pe"] = pe
        y = fn(x, *params, **kw)
        leaves = [t for t in (x, *params, pe) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        torch.cuda.synchronize()
        return (y, *grads)

    call(0)
    call(1)
    ran = []
    real = JITFunction.run

    def spy(self, *args, **kwargs):
        if id(self) in launched:                            # kernels launched without a Launcher may run it
            ran.append(self.fn.__name__)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(JITFunction, "run", spy)
    direct = call(2)
    assert not ran, f"JITFunction.run still ran for {ran}"
    for lau in _launchers():
        monkeypatch.setattr(lau, "_direct", None)
    through_jit = call(2)
    for a, b in zip(direct, through_jit):
        assert torch.equal(a, b)
