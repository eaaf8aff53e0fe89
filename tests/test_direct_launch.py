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
    lau._direct = {}
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


def test_switch_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_TRITON_FAST_LAUNCH", "maybe")
    with pytest.raises(ValueError, match="KVCOMPRESS_TRITON_FAST_LAUNCH"):
        tc._fast_launch_setting()
    monkeypatch.setenv("KVCOMPRESS_TRITON_FAST_LAUNCH", "0")
    assert tc._fast_launch_setting() is False
    if tc.INTERPRET:
        assert tc.FAST_LAUNCH is False                      # the interpreter has no compiled kernels
