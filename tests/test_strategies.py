"""The strategies and the coverage they promise (kvcompress/testing/strategies.py,
coverage.py): how often a draw is empty, which head groupings are reached
(also under an emulated backend's small limits), and which features the ci
profile requires of each kind."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, find, given, seed, settings

from kvcompress.testing import Domain, coverage
from kvcompress.testing.cases import Case
from kvcompress.testing.impls import Impl
from kvcompress.testing.records import KINDS
from kvcompress.testing.strategies import cases

GROUPED_KINDS = ("weighted_pool", "linear", "mlp", "attention_pool", "gated_pool")   # a parameter with a G dim
EMULATED = Impl("linear", "triton", None, "cpu", ("float32",), emulated=True).limits


def _draws(n_seeds: int = 5, examples: int = 40, **kw) -> list[Case]:
    """The cases a ci-like run draws: ``examples`` derandomized examples for
    each of ``n_seeds`` seeds (the plugin seeds each property from its id)."""
    out = []
    for s in range(n_seeds):
        @seed(s)
        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(**kw))
        def run(case):
            out.append(case)

        run()
    return out


def _empty(case: Case) -> bool:
    return case.B * case.W == 0


@pytest.mark.parametrize("kind", KINDS)
def test_few_draws_are_empty_but_some_are(kind):
    """About one ci draw in 15 has an empty output (it was 35-50%: every
    size drawn from 0 could make it empty); the first example of every run
    is one, so the ci profile always covers them, and the smallest case."""
    drawn = _draws(kind=kind, dtype="float32")
    frac = sum(map(_empty, drawn)) / len(drawn)
    assert 0.02 < frac <= 0.10, frac
    assert all(_empty(drawn[i]) for i in range(0, len(drawn), 40)), "a run's first example is not empty"
    assert _empty(find(cases(kind=kind, dtype="float32"), lambda c: True))


def test_empty_draws_keep_their_variety():
    """The empty branch holds B == 0 (with and without windows in T), short
    sequences and empty packed lists; the others still hold empty and short
    sequences inside a packed batch beside one with windows."""
    drawn = _draws(n_seeds=10, kind="linear", dtype="float32")
    empty = [c for c in drawn if _empty(c)]
    assert any(c.B == 0 and c.W > 0 for c in empty) and any(c.B == 0 and c.T == 0 for c in empty)
    assert any(c.B > 0 and c.seqlens is None and 0 < c.T for c in empty)
    assert any(c.seqlens == () for c in empty) and any(c.seqlens and c.T > 0 for c in empty)
    packed = [c for c in drawn if c.seqlens is not None and not _empty(c)]
    assert any(any(c.replace(seqlens=(n,), T=n).W == 0 for n in c.seqlens) for c in packed)
    assert any(0 in c.seqlens for c in packed)


@pytest.mark.parametrize("limits", [{}, EMULATED], ids=["default", "emulated"])
def test_groupings_reach_one_lt_g_lt_h(limits):
    """1 < G < H (where h // (H // G) and h % G differ) is drawn in about a
    third of the cases, under an emulated backend's limits too (there only
    as H = 4, G = 2 with one batch row; the other groupings keep H <= 2, so
    B * H <= 4 as before); G == 1 and G == H > 1 as well."""
    drawn = _draws(kind="linear", dtype="float32", **limits)
    assert all(c.H % c.G == 0 for c in drawn)
    grouped = [c for c in drawn if 1 < c.G < c.H]
    assert len(grouped) > len(drawn) / 5, len(grouped)
    assert any(c.G == 1 and c.H > 1 for c in drawn) and any(c.G == c.H > 1 for c in drawn)
    if limits:
        assert {(c.G, c.H) for c in grouped} == {(2, 4)} and all(c.B <= 1 for c in grouped)
        assert all(c.H <= 2 and c.B <= 2 for c in drawn if c not in grouped)
        assert any(c.B == 2 for c in drawn)
    else:
        assert {(c.G, c.H) for c in grouped} == {(2, 4), (2, 6), (3, 6)}


@given(case=cases(kind="mlp", dtype="float32", max_heads=3))
@settings(max_examples=30, derandomize=True, database=None, deadline=None)
def test_no_grouped_draw_below_four_heads(case):
    assert case.H <= 3 and case.G in (1, case.H)


def test_budget_without_room_for_a_window_draws_only_empty_cases():
    """A domain whose max_tokens leaves a packed sequence no room for a
    window gets empty cases, inside its max_tokens (not lengths beyond it)."""
    d = Domain(block_sizes=(40,), strides="equal", inputs=("packed",), max_tokens=64)
    drawn = _draws(n_seeds=2, kind="weighted_pool", dtype="float32", domain=d)
    assert all(_empty(c) and d.allows(c) for c in drawn)


# -- coverage ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_required_features_per_kind(kind):
    """Every kind with a grouped parameter must draw 1 < G < H, every
    domain with empty inputs an empty case; the older features stay."""
    req = coverage.required(Domain(), kind)
    assert set(coverage.REQUIRED) - {"1<groups<heads"} - ({"pe=on"} if kind == "gated_pool" else set()) <= set(req)
    assert ("1<groups<heads" in req) == (kind in GROUPED_KINDS)
    assert "windows=0" not in coverage.required(Domain(empty=False), kind)
    for d in (Domain(groups="per_head"), Domain(groups="shared"), Domain(max_heads=3)):
        assert "1<groups<heads" not in coverage.required(d, kind)


def test_gated_pool_groups_only_through_its_bias():
    """gated_pool's one grouped parameter is its optional bias: without it
    (in the case or the domain) no head mapping is exercised."""
    assert "1<groups<heads" not in coverage.required(Domain(bias=False), "gated_pool")
    assert "1<groups<heads" in coverage.required(Domain(bias2=False), "mlp")   # w1, w2 are always given
    case = Case("gated_pool", H=4, G=2, T=4, D=2, block_size=2, stride=2, bias=True)
    assert "1<groups<heads" in coverage.features(case)
    assert "1<groups<heads" not in coverage.features(dataclasses.replace(case, bias=False))


@pytest.mark.parametrize(("G", "H", "B", "T", "want"), [
    (2, 4, 1, 4, {"groups>1", "1<groups<heads", "windows>0"}),
    (2, 2, 1, 4, {"groups>1", "windows>0"}),
    (1, 4, 1, 4, {"windows>0"}),
    (3, 6, 0, 4, {"groups>1", "1<groups<heads", "windows=0"}),
    (1, 1, 2, 1, {"windows=0"}),
])
def test_features_of_a_case(G, H, B, T, want):
    case = Case("linear", H=H, G=G, B=B, T=T, D=2, block_size=2, stride=2)
    got = set(coverage.features(case)) & {"groups>1", "1<groups<heads", "windows>0", "windows=0"}
    assert got == want
    assert "1<groups<heads" not in coverage.features(dataclasses.replace(case, kind="mean_pool"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("limits", [{}, EMULATED], ids=["default", "emulated"])
def test_ci_like_draws_cover_every_required_feature(kind, limits):
    """One property's ci draws (40 examples; 10 under emulation, the
    ci-emulated budget) already hold every feature required of the kind."""
    seen = set()
    for c in _draws(n_seeds=1, examples=10 if limits else 40, kind=kind, dtype="float32", **limits):
        seen.update(coverage.features(c))
    assert set(coverage.required(Domain(), kind)) <= seen, set(coverage.required(Domain(), kind)) - seen
