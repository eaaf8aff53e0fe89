"""Every launch configuration the autotuner may pick, of every autotuned
Triton kernel of every kind, checked against the loop reference, forward
and gradients (``kvcompress.testing.assert_matches_reference``, the
backend's own precision class).

The autotuner times the configurations its prune keeps and checks none of
their results; the property suite on a GPU runs untuned
(KVCOMPRESS_TRITON_AUTOTUNE=0: the first kept configuration only), and
kvcompress-bench's gate checks only the picks at its sizes. So a tile that
is wrong for some shape, kept by the prune, would reach a user whose shape
the autotuner times it fastest for. Here, per kind and case (bfloat16 and
float32, D = 128 where the prunes keep the wide tiles and D = 16 where they
keep the narrow ones), one call of forward + backward is recorded to learn
which launchers run and with what arguments; then for every launcher and
every index i of the configurations its prune keeps, the call is checked
with each launch of that launcher running the i-th kept configuration
(``launch.only_config``).

On a GPU each configuration runs as compiled (untuned launches elsewhere).
In Triton's interpreter, which ignores warps and stages, an index whose
tiles repeat an earlier index's for every launch is left out (the same
run); the rest checks the tile sizes' masking and loop bounds. There
linear and mlp run the D = 16 cases only: at D = 128 one check of theirs
takes 3-8 s in the interpreter and they have about 40 distinct tilings
there (about 6 minutes in all, measured on the 2-core CI machine); on a
GPU they run every case.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import kvcompress.functional as kf  # noqa: E402
from kvcompress import backends, kinds  # noqa: E402
from kvcompress.ops._triton import launch  # noqa: E402
from kvcompress.ops._triton.env import INTERPRET  # noqa: E402
from kvcompress.testing import assert_matches_reference  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
# every kind with a Triton backend (a new one without a case in ``inputs`` fails there, by name)
KINDS = tuple(k for k in kinds.KINDS if any(b.name == "triton" for b in backends.backends(k)))
# (dtype, D): the wide tiles need D (and D_out, F) >= 64 or 128 to be kept, the narrow ones (16) D < 64
CASES = [(torch.bfloat16, 128), (torch.float32, 128), (torch.bfloat16, 16), (torch.float32, 16)]
B, H, T, L, S = 1, 2, 48, 8, 4


def cases(kind) -> list:
    """The (dtype, D) cases of ``kind`` (see the module docstring)."""
    if INTERPRET and kind in ("linear", "mlp"):
        return [c for c in CASES if c[1] < 64]
    return CASES


def inputs(kind, dtype, D, seed=0):
    """(x, params, keywords) of one call of ``kind``: x (B, H, T, D), the
    parameters in the reference's order, scaled by 1/sqrt(fan in); pe and
    left padding (gated_pool: its bias instead of pe)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = rnd(B, H, T, D)
    kw = dict(block_size=L, stride=S, padding="left")
    if kind != "gated_pool":
        kw["pe"] = rnd(H, L, D, scale=0.5)
    F = D if D >= 64 else 32
    params = {"mean_pool": lambda: [],
              "weighted_pool": lambda: [rnd(H, L, scale=L ** -0.5)],
              "linear": lambda: [rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D)],
              "mlp": lambda: [rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F), rnd(H, F, D, scale=F ** -0.5),
                              rnd(H, D)],
              "attention_pool": lambda: [rnd(1, D, D, scale=0.5 * D ** -0.5)],
              "gated_pool": lambda: [rnd(B, H, T, D), rnd(1, L, D)]}
    if kind not in params:
        raise KeyError(f"tests/test_every_config.py: no inputs written for {kind}")
    params = params[kind]()
    return x, params, kw


def triton_call(kind):
    return lambda *a, **k: getattr(kf, kind)(*a, **k, backend="triton")


def check(kind, dtype, D):
    """The call's forward and gradients against the reference, in the
    Triton backend's precision class."""
    x, params, kw = inputs(kind, dtype, D)
    assert_matches_reference(kind, triton_call(kind), x, *params, **kw, check_grad=True,
                             precision=backends.get(kind, "triton").precision)


def launches(kind, dtype, D, monkeypatch):
    """{launcher: [its launches' arguments by name, ...]} of one forward +
    backward of the case, in the order the launchers first ran."""
    seen: dict = {}
    call = launch.Launcher.__call__

    def recording(self, grid, *args, **kwargs):
        seen.setdefault(self, []).append({**dict(zip(self.kernel.arg_names, args)), **kwargs})
        return call(self, grid, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(launch.Launcher, "__call__", recording)
        check(kind, dtype, D)
    return seen


def kept(launcher, named) -> list:
    return launcher.prune(launcher.configs, named) if launcher.prune is not None else list(launcher.configs)


def indices(launcher, calls) -> list[int]:
    """The indices into the kept configurations to check: all of them on a
    GPU; in the interpreter those whose tiles differ from every earlier
    index's in at least one launch."""
    lists = [kept(launcher, named) for named in calls]
    n = max(len(k) for k in lists)
    if not INTERPRET:
        return list(range(n))
    out, seen = [], set()
    for i in range(n):
        tiles = tuple(tuple(sorted(k[i].kwargs.items())) if i < len(k) else None for k in lists)
        if tiles not in seen:
            seen.add(tiles)
            out.append(i)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_kept_configuration(kind, monkeypatch):
    if not INTERPRET:
        monkeypatch.setattr(launch, "AUTOTUNE", False)      # the launches not forced: untuned
    failures, checked = [], 0
    for dtype, D in cases(kind):
        for launcher, calls in launches(kind, dtype, D, monkeypatch).items():
            for i in indices(launcher, calls):
                with launch.only_config(launcher, lambda k, i=i: k[i] if i < len(k) else None) as runs:
                    try:
                        check(kind, dtype, D)
                    except AssertionError as e:
                        failures.append(f"{launcher.kernel.__name__}, {dtype}, D = {D}, kept configuration {i} "
                                        f"({runs[0] if runs else None}): {str(e)[:300]}")
                assert runs, f"{launcher.kernel.__name__}: configuration {i} never ran"
                checked += 1
    assert checked > 0
    assert not failures, f"{len(failures)} of {checked} configurations wrong:\n" + "\n".join(failures)
