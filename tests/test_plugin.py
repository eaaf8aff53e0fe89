"""The shipped suite as a consumer meets it: the pytest plugin is inert until
used, domains narrow the draws, no skip reads as a pass, known failures stay
visible, and ``assert_matches_reference`` checks one call.

Runs of pytest on a consumer's kernel are subprocesses in a temporary folder
(not this checkout), with ``--pyargs kvcompress.testing.properties``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvcompress.functional as kf
from kvcompress.testing import Domain, assert_matches_reference, declare_domain, domain_of
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.strategies import cases

PROPS = ["--pyargs", "kvcompress.testing.properties"]
VALUES_ONLY = "test_matches_reference and not realistic and not production"   # the small-case value property


def _pytest(tmp_path, *args, files=None, **env):
    """pytest in ``tmp_path`` (a consumer's folder), its own modules importable."""
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    e = {**os.environ, "PYTHONPATH": str(tmp_path), **env}
    for k in ("KVCOMPRESS_REPORT", "KVCOMPRESS_PROFILE", "KVCOMPRESS_EMULATED"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=tmp_path,
                          env=e, capture_output=True, text=True, timeout=600)


def _out(r):
    return r.stdout[-4000:] + r.stderr[-3000:]


# -- the plugin is inert until used -------------------------------------------

def test_plugin_is_inert_in_a_host_project(tmp_path):
    """A host project's own session: no torch imported at start-up, its own
    Hypothesis profile untouched, no kvcompress test collected."""
    r = _pytest(tmp_path, "test_host.py", files={
        "conftest.py": """
            from hypothesis import settings
            settings.register_profile("host", max_examples=3)
            settings.load_profile("host")
        """,
        "test_host.py": """
            import sys
            from hypothesis import given, settings, strategies as st
            def test_no_torch_at_start_up():
                assert "torch" not in sys.modules
            def test_profile_untouched():
                assert settings.default.max_examples == 3
            calls = []
            @given(st.integers())
            def test_host_property(i):
                calls.append(i)
            def test_host_property_ran_three_times():
                assert len(calls) == 3
            def test_kvcompress_plugin_loaded(pytestconfig):
                assert pytestconfig.pluginmanager.hasplugin("kvcompress")
        """})
    assert r.returncode == 0, _out(r)
    assert "5 passed" in r.stdout and "kvcompress" not in r.stdout.split("passed")[0].split("\n")[-1]


# -- domains -------------------------------------------------------------------------

DOMAINS = st.builds(
    Domain,
    paddings=st.sampled_from([("valid",), ("left",), ("valid", "left")]),
    inputs=st.sampled_from([("batched",), ("packed",), ("batched", "packed")]),
    groups=st.sampled_from(["any", "per_head", "shared"]),
    bias=st.booleans(), bias2=st.booleans(), d_out_equals_d=st.booleans(),
    block_sizes=st.one_of(st.none(), st.lists(st.integers(1, 40), min_size=1, max_size=3)),
    strides=st.sampled_from(["any", "divides", "equal"]),
    head_dim_multiple=st.sampled_from([1, 2, 4, 8]),
    pe=st.booleans(), layouts=st.sampled_from([("contiguous",), ("contiguous", "bthd"), ("contiguous", "sliced")]),
    empty=st.booleans(), max_tokens=st.one_of(st.none(), st.integers(64, 200)),
    activations=st.sampled_from([("relu",), ("gelu", "silu")]))


@property_settings()
@given(data=st.data())
def test_strategies_draw_only_inside_the_domain(data):
    """Every case drawn for a domain lies inside it (no filtering: the draws
    themselves are narrowed, so no health check trips)."""
    domain = data.draw(DOMAINS, label="domain")
    kind = data.draw(st.sampled_from(["mean_pool", "weighted_pool", "linear", "mlp", "attention_pool"]), label="kind")
    case = data.draw(cases(kind=kind, dtype="float32", domain=domain), label="case")
    assert domain.allows(case), (domain, case)
    if domain.d_out_equals_d and kind in ("linear", "mlp"):
        assert case.D_out == case.D


def test_domain_rejects_malformed_fields():
    with pytest.raises(ValueError, match="paddings"):
        Domain(paddings=("same",))
    with pytest.raises(TypeError, match="paddings"):
        Domain(paddings="valid")
    with pytest.raises(ValueError, match="block_sizes"):
        Domain(block_sizes=(0, 16))
    with pytest.raises(ValueError, match="groups"):
        Domain(groups="some")
    assert Domain().full and Domain().describe() == "full"
    d = Domain(paddings=("valid",), groups="per_head", pe=False, block_sizes=(16, 32), strides="divides")
    assert d.describe() == "paddings=valid; G=H; L in {16,32}; S|L; no pe"


def test_declare_domain_attaches_and_domain_of_reads():
    @declare_domain(pe=False)
    def f(x, **kw):
        return x

    assert domain_of(f) == Domain(pe=False) and domain_of(kf.linear).full


PARTIAL = """
    import kvcompress.functional as kf
    from kvcompress.testing import declare_domain

    @declare_domain(paddings=("valid",), groups="per_head", pe=False, inputs=("batched",), empty=False,
                    block_sizes=(2, 4), strides="equal", dtypes=("float32",))
    def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
        # a partial kernel: anything outside its domain is an error, as in the real ones
        assert padding == "valid" and pe is None and cu_seqlens is None and block_size in (2, 4)
        assert stride == block_size and weight.shape[0] == x.shape[1] and x.shape[0] > 0 and x.shape[2] >= block_size
        return kf.weighted_pool(x, weight, block_size=block_size, stride=stride)
"""


def test_a_partial_kernel_passes_inside_its_domain(tmp_path):
    """A kernel that errors outside its declared domain passes: nothing
    outside it is drawn, and the properties that need more (both paddings,
    packed inputs, strided layouts) are not generated for it."""
    r = _pytest(tmp_path, *PROPS, "--impl", "weighted_pool=partial:weighted_pool", "--kvcompress-profile", "dev",
                "-k", "matches_reference or packed or left_padding or gradients_match",
                files={"partial.py": PARTIAL})
    assert r.returncode == 0, _out(r)
    assert "test_packed_equals_one_by_one" not in r.stdout and "failed" not in r.stdout


def test_domain_given_on_the_command_line(tmp_path):
    """--domain KIND=module:attribute names the domain of an undecorated kernel."""
    files = {"partial.py": PARTIAL.replace("@declare_domain(", "DOMAIN = dict(").replace(
        "dtypes=(\"float32\",))\n    def", "dtypes=(\"float32\",))\n\n    def")}
    r = _pytest(tmp_path, *PROPS, "--impl", "weighted_pool=partial:weighted_pool",
                "--domain", "weighted_pool=partial:DOMAIN", "--kvcompress-profile", "dev", "-k", "matches_reference",
                files=files)
    assert r.returncode == 0, _out(r)


# -- no skip is a pass --------------------------------------------------------------

GRADLESS = """
    import torch
    import kvcompress.functional as kf

    class DoubleDx(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def mean_pool(x, **kw):
        y = kf.mean_pool(x, **kw)
        if y.numel() == 0:
            return torch.zeros(y.shape, dtype=y.dtype, device=y.device)   # grad-less
        return DoubleDx.apply(y)

    def detached(x, **kw):
        return kf.mean_pool(x, **kw).detach()
"""


def test_a_doubled_gradient_with_gradless_empty_outputs_fails(tmp_path):
    """The issue's kernel: doubled dx, and grad-less zeros for empty outputs.
    The empty examples check nothing; the others fail."""
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=gradless:mean_pool", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", "gradients_match", files={"gradless.py": GRADLESS})
    assert r.returncode == 1, _out(r)
    assert "gradient of x" in r.stdout and "skipped" not in r.stdout


def test_outputs_that_never_require_grad_fail_unless_declared_forward_only(tmp_path):
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=gradless:detached", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", "gradients_match", files={"gradless.py": GRADLESS})
    assert r.returncode == 1 and "does not require grad" in r.stdout, _out(r)
    fwd = textwrap.dedent(GRADLESS) + ("\nfrom kvcompress.testing import declare_domain\n"
                                       "detached = declare_domain(differentiable=False)(detached)\n")
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=fwd:detached", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", "(gradients or matches_reference) and not production",
                files={"fwd.py": fwd})
    assert r.returncode == 0, _out(r)
    # no gradient property is generated (deselected, never skipped), the two value properties pass
    assert "2 passed" in r.stdout and "skipped" not in r.stdout and "deselected" in r.stdout


def test_a_property_that_checks_no_example_fails(tmp_path):
    """A property whose every example is discarded without a check fails."""
    r = _pytest(tmp_path, "test_empty_property.py", "--impl", "mean_pool=kvcompress.functional:mean_pool",
                files={"test_empty_property.py": """
                    import pytest
                    from hypothesis import given, strategies as st
                    from kvcompress.testing.plugin import property_settings

                    pytestmark = pytest.mark.kvcompress_property

                    @property_settings()
                    @given(data=st.data())
                    def test_checks_nothing(impl, data):
                        data.draw(st.integers(), label="n")   # ... and never calls report.checked()
                """})
    assert r.returncode == 1 and "no example was checked" in r.stdout, _out(r)


# -- known failures -------------------------------------------------------------------

BROKEN = """
    import kvcompress.functional as kf
    def mean_pool(x, **kw):
        return kf.mean_pool(x, **kw) * 1.01
"""


def test_xfails_file_keeps_a_red_property_visible_and_reports_unexpected_passes(tmp_path):
    (tmp_path / "xfails.txt").write_text("# known: 1% off\ntest_matches_reference[mean_pool-broken:mean_pool-*]\n"
                                         "test_no_such_property*\n")
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=broken:mean_pool", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", VALUES_ONLY, "--xfails-file", "xfails.txt", "-rxX",
                files={"broken.py": BROKEN})
    assert r.returncode == 0, _out(r)
    assert "1 xfailed" in r.stdout and "test_no_such_property*" in r.stdout   # the unused line is listed
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=kvcompress.functional:mean_pool", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", VALUES_ONLY, "--xfails-file", "xfails.txt")
    assert "known failures that PASSED" not in r.stdout   # the line names another implementation
    (tmp_path / "xfails.txt").write_text("test_matches_reference[mean_pool-*]\n")
    r = _pytest(tmp_path, *PROPS, "--impl", "mean_pool=kvcompress.functional:mean_pool", "--impl-dtypes", "float32",
                "--kvcompress-profile", "dev", "-k", VALUES_ONLY, "--xfails-file", "xfails.txt")
    assert r.returncode == 0 and "known failures that PASSED" in r.stdout and "1 xpassed" in r.stdout, _out(r)


# -- kvcompress-verify from any folder --------------------------------------------------

def test_verify_runs_from_a_foreign_folder_and_shows_the_domain(tmp_path):
    """No checkout needed; the folder's own pytest configuration does not leak in."""
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\naddopts = '--no-such-option'\n")
    (tmp_path / "partial.py").write_text(textwrap.dedent(PARTIAL))
    e = {**os.environ, "PYTHONPATH": str(tmp_path), "KVCOMPRESS_PROFILE": "dev"}
    e.pop("KVCOMPRESS_REPORT", None)
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "kvcompress.verify", "--impl", "weighted_pool=partial:weighted_pool",
                        "-k", "matches_reference or gradients", "--json", str(out)], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, _out(r)
    assert "paddings=valid; inputs=batched; G=H; dtypes=float32" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["dtype"] for row in rows] == ["float32"] and rows[0]["passed"] and rows[0]["examples"] > 0


# -- assert_matches_reference ------------------------------------------------------------

def _linear_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 40, 8, generator=g).to(dtype)
    w = (torch.randn(2, 4, 8, 6, generator=g) / 6).to(dtype)
    b = torch.randn(2, 6, generator=g).to(dtype)
    pe = torch.randn(4, 4, 8, generator=g).to(dtype)
    return x, w, b, pe


def test_assert_matches_reference_accepts_a_correct_call_and_names_the_worst_element():
    x, w, b, pe = _linear_inputs()
    kw = dict(block_size=4, stride=2, padding="left", pe=pe)
    assert_matches_reference("linear", kf.linear, x, w, b, **kw, check_grad=True)
    assert_matches_reference("linear", kf.linear(x, w, b, **kw), x, w, b, **kw)
    y = kf.linear(x, w, b, **kw)
    y[1, 2, 3, 4] += 1e-3
    with pytest.raises(AssertionError, match=r"at \(b, h, w, c\) = \(1, 2, 3, 4\)"):
        assert_matches_reference("linear", y, x, w, b, **kw)


class _ScaledGrad(torch.autograd.Function):
    """The identity forward, its gradient scaled: a wrong backward with a right forward."""

    @staticmethod
    def forward(ctx, y, factor):
        ctx.factor = factor
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _grad_scaled(fn, factor):
    return lambda *a, **k: _ScaledGrad.apply(fn(*a, **k), factor)


def test_assert_matches_reference_checks_gradients():
    halved = _grad_scaled(kf.attention_pool, 0.5)

    x = torch.randn(1, 2, 12, 4, dtype=torch.float64)
    w = torch.randn(1, 4, 4, dtype=torch.float64) / 2
    assert_matches_reference("attention_pool", halved, x, w, block_size=3, stride=3)   # forward is right
    with pytest.raises(AssertionError, match="gradient of x"):
        assert_matches_reference("attention_pool", halved, x, w, block_size=3, stride=3, check_grad=True)


def test_assert_matches_reference_gated_pool():
    """gated_pool (no pe; z per token; bias (G, L, D_out) gives G, here not
    B; split): a correct call passes, forward and gradients; a wrong split
    and a perturbed gradient fail; a pe is refused."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 4, 40, 8, generator=g)
    bias = torch.randn(1, 4, 4, generator=g)                    # G = 1, L = 4, D_out = 8 / 2
    kw = dict(block_size=4, stride=2, padding="left")
    assert_matches_reference("gated_pool", kf.gated_pool, x, z, bias, **kw, split=True, check_grad=True)
    assert_matches_reference("gated_pool", kf.gated_pool, x, z, None, **kw, check_grad=True)
    with pytest.raises(AssertionError, match="output shape"):
        assert_matches_reference("gated_pool", kf.gated_pool(x, z, None, **kw), x, z, None, **kw, split=True)
    with pytest.raises(AssertionError, match="gradient of x"):
        assert_matches_reference("gated_pool", _grad_scaled(kf.gated_pool, 2.0), x, z, bias, **kw, split=True,
                                 check_grad=True)
    with pytest.raises(ValueError, match="gated_pool takes no pe"):
        assert_matches_reference("gated_pool", kf.gated_pool, x, z, bias, **kw, pe=torch.zeros(4, 4, 8))
    with pytest.raises(TypeError, match=r"gated_pool takes the options \(split\), got \['activation'\]"):
        assert_matches_reference("gated_pool", kf.gated_pool, x, z, bias, **kw, activation="relu")


def test_assert_matches_reference_passes_the_kinds_options():
    """mlp's activation reaches the call and the reference (gelu checked as
    gelu: relu's output would fail); a kind without options refuses one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 24, 4, generator=g)
    w1, b1 = torch.randn(2, 16, 8, generator=g) / 4, torch.randn(2, 8, generator=g)
    w2, b2 = torch.randn(2, 8, 4, generator=g) / 3, torch.randn(2, 4, generator=g)
    kw = dict(block_size=4, stride=2)
    assert_matches_reference("mlp", kf.mlp, x, w1, b1, w2, b2, **kw, activation="gelu", check_grad=True)
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_matches_reference("mlp", kf.mlp(x, w1, b1, w2, b2, **kw), x, w1, b1, w2, b2, **kw, activation="gelu")
    with pytest.raises(TypeError, match=r"mean_pool takes the options \(none\)"):
        assert_matches_reference("mean_pool", kf.mean_pool, x, **kw, split=True)


def test_assert_matches_reference_rejects_bad_calls():
    x, w, b, pe = _linear_inputs()
    with pytest.raises(ValueError, match="kind must be one of"):
        assert_matches_reference("conv", kf.linear, x, w, b, block_size=4, stride=2)
    with pytest.raises(TypeError, match=r"takes the parameters \(weight, bias\)"):
        assert_matches_reference("linear", kf.linear, x, w, block_size=4, stride=2)
    with pytest.raises(ValueError, match="check_grad needs the implementation"):
        assert_matches_reference("linear", kf.linear(x, w, b, block_size=4, stride=2), x, w, b, block_size=4,
                                 stride=2, check_grad=True)
