"""The pytest plugin of kvcompress's property suite (entry point ``pytest11``).

Installed with ``pip install "kvcompress[test]"``, it is loaded by every
pytest session in that environment and does nothing until the suite is used:
it adds the options below, imports neither torch nor Hypothesis at start-up,
never loads or changes the host project's Hypothesis profile (the properties
carry their own settings), and never collects a test by itself. It acts only
on tests marked ``kvcompress_property`` (the shipped properties,
``pytest --pyargs kvcompress.testing.properties``, and this repository's own
suite):

- ``--impl KIND=module:callable`` (repeatable): verify this callable (the
  reference signature on torch tensors) instead of the built-in backends;
  ``--domain KIND=module:attribute`` gives its Domain where the callable
  does not declare one (kvcompress.testing.domain);
- ``--impl-device cpu|cuda``, ``--impl-dtypes LIST``;
- ``--kvcompress-profile NAME`` (or ``KVCOMPRESS_PROFILE``): ``dev``, ``ci``
  (the default: deterministic, bounded, and fails if a promised feature was
  never drawn), ``thorough``, ``thorough-part`` and ``ci-emulated``;
- ``--emulated exclude|only|include``: built-in backends emulated on this
  device (Triton's interpreter on the CPU);
- ``--xfails-file PATH``: known failures (one test id or glob per line, ``#``
  comments) run as non-strict xfails: a red property stays visible while CI
  stays green, and one that passes is listed as an unexpected pass;
- ``--kvcompress-report PATH`` (or ``KVCOMPRESS_REPORT``): per-property
  measurements as JSON.

Every property must check at least one example: one whose every drawn
example was discarded (empty outputs, ill-conditioned cases) fails instead of
passing silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os

import pytest

PROFILES = ("dev", "ci", "thorough", "thorough-part", "ci-emulated")
MARKER = "kvcompress_property"

_state: dict = {"profile": None, "registered": False}


# -- Hypothesis profiles, registered under "kvcompress-<name>" on first use ---

def _register_profiles() -> None:
    if _state["registered"]:
        return
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
    settings.register_profile("kvcompress-dev", max_examples=8, **common)
    settings.register_profile("kvcompress-ci", max_examples=40, derandomize=True, database=None, **common)
    settings.register_profile("kvcompress-thorough", max_examples=1000, **common)
    # one part of a thorough run split over processes: each part draws
    # KVCOMPRESS_PART_EXAMPLES examples from its own --hypothesis-seed
    settings.register_profile("kvcompress-thorough-part",
                              max_examples=int(os.environ.get("KVCOMPRESS_PART_EXAMPLES", "250")), **common)
    # emulated backends (Triton's interpreter on the CPU) cost ~100x per
    # example: deterministic like ci, with fewer examples and smaller cases
    settings.register_profile("kvcompress-ci-emulated", max_examples=10, derandomize=True, database=None, **common)
    _state["registered"] = True


def current_profile() -> str:
    """The kvcompress profile of this session (``--kvcompress-profile``, else
    ``KVCOMPRESS_PROFILE``, else ci)."""
    name = _state["profile"] or os.environ.get("KVCOMPRESS_PROFILE") or "ci"
    if name not in PROFILES:
        raise ValueError(f"KVCOMPRESS_PROFILE must be one of {PROFILES}, got {name!r}")
    return name


def profile_settings():
    """The Hypothesis settings object of the current kvcompress profile."""
    from hypothesis import settings

    _register_profiles()
    return settings.get_profile(f"kvcompress-{current_profile()}")


def property_settings(*, scale: float = 1.0, minimum: int = 1):
    """``@settings`` for a property: the current kvcompress profile, with
    ``max_examples`` scaled by ``scale`` (at least ``minimum``) for properties
    that cost many calls per example. Applied explicitly to each property so
    the host's Hypothesis profile neither changes nor leaks in."""
    from hypothesis import settings

    p = profile_settings()
    if scale == 1.0:
        return settings(p)
    return settings(p, max_examples=max(minimum, int(p.max_examples * scale)))


def is_strict_profile() -> bool:
    """ci and ci-emulated promise that every feature was drawn."""
    return current_profile() in ("ci", "ci-emulated")


# -- options -----------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("kvcompress", "kvcompress property suite")
    group.addoption("--impl", action="append", default=[], metavar="KIND=module:callable",
                    help="verify this callable (reference signature, torch tensors) instead of the built-in "
                         "backends; repeatable")
    group.addoption("--domain", action="append", default=[], metavar="KIND=module:attribute",
                    help="the kvcompress.testing.Domain of the --impl of KIND (else the one it declares)")
    group.addoption("--impl-device", default=None, choices=("cpu", "cuda"),
                    help="device of the inputs given to implementations (default: cuda if available, else cpu)")
    group.addoption("--impl-dtypes", default=None, metavar="LIST",
                    help="comma list of dtypes to test (default: float64,float32,float16,bfloat16)")
    group.addoption("--emulated", default=None, choices=("exclude", "only", "include"),
                    help="built-in backends emulated on this device (Triton's interpreter on the CPU): leave out "
                         "(default), run only them (use with --kvcompress-profile ci-emulated), or include them; "
                         "also KVCOMPRESS_EMULATED")
    group.addoption("--kvcompress-profile", default=None, choices=PROFILES,
                    help="Hypothesis profile of the kvcompress properties (default: KVCOMPRESS_PROFILE, else ci)")
    group.addoption("--xfails-file", default=None, metavar="PATH",
                    help="known failures: one test id (or glob) per line; they run as xfail, and a pass is "
                         "reported as unexpected")
    group.addoption("--kvcompress-report", default=None, metavar="PATH",
                    help="write per-property measurements as JSON (also KVCOMPRESS_REPORT)")


def _used(config) -> bool:
    return any(config.getoption(o) for o in ("--impl", "--domain", "--emulated", "--impl-dtypes", "--impl-device",
                                              "--kvcompress-profile", "--xfails-file"))


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: a kvcompress conformance property (parametrized over the "
                                       "implementations under test by the kvcompress plugin)")
    if config.getoption("--kvcompress-profile"):
        _state["profile"] = config.getoption("--kvcompress-profile")
    elif os.environ.get("KVCOMPRESS_PROFILE", "ci") not in PROFILES:
        raise pytest.UsageError(f"KVCOMPRESS_PROFILE must be one of {PROFILES}, "
                                f"got {os.environ['KVCOMPRESS_PROFILE']!r}")
    if config.getoption("--kvcompress-report"):
        os.environ["KVCOMPRESS_REPORT"] = os.path.abspath(config.getoption("--kvcompress-report"))
    if config.pluginmanager.hasplugin("xdist"):
        from . import _xdist

        _xdist.install(config)
    if _used(config):
        _impls(config)   # a bad --impl is a usage error before any test runs


def _impls(config):
    cached = getattr(config, "_kvcompress_impls", None)
    if cached is not None:
        return cached
    import dataclasses

    from . import impls

    if config.getoption("--emulated"):
        os.environ["KVCOMPRESS_EMULATED"] = config.getoption("--emulated")
    try:
        impls.emulated_choice()
        device = impls.parse_device(config.getoption("--impl-device"))
        dtypes = impls.parse_dtypes(config.getoption("--impl-dtypes"))
        domains = impls.load_domains(config.getoption("--domain"))
        given = [impls.load_impl(s, device, dtypes, domains) for s in config.getoption("--impl")]
    except impls.UsageError as e:
        raise pytest.UsageError(str(e)) from None
    if domains and not given:
        raise pytest.UsageError("--domain describes an --impl: give the --impl it belongs to")
    if given:
        chosen = given
    else:
        chosen = [dataclasses.replace(i, dtypes=tuple(d for d in i.dtypes if d in dtypes))
                  for i in impls.builtin_impls(device)]
    config._kvcompress_impls = chosen
    return chosen


def _is_property(node) -> bool:
    return node.get_closest_marker(MARKER) is not None


# -- parametrization ----------------------------------------------------------

def pytest_generate_tests(metafunc):
    """Properties asking for ``impl`` run once per implementation (and per
    dtype when they also ask for ``dtype``), limited by ``for_kinds``,
    ``needs_dtype`` and ``requires`` (the implementation's domain)."""
    if "impl" not in metafunc.fixturenames or not _is_property(metafunc.definition):
        return
    from .impls import unmet_requirements

    fn = metafunc.function
    kinds = getattr(fn, "kvcompress_kinds", None)
    needs = getattr(fn, "kvcompress_needs_dtype", None)
    chosen = [i for i in _impls(metafunc.config)
              if (kinds is None or i.kind in kinds) and (needs is None or needs in i.dtypes)
              and not unmet_requirements(fn, i.domain)
              and all(pred(i) for pred, _ in getattr(fn, "kvcompress_impl_filters", ()))]
    if not chosen:   # no implementation under test is in this property's reach: it is not generated
        metafunc.config.stash.setdefault(_NOT_APPLICABLE, set()).add(metafunc.definition.nodeid)
    if "dtype" in metafunc.fixturenames:
        pairs = [(i, d) for i in chosen for d in i.dtypes]
        metafunc.parametrize(("impl", "dtype"), pairs, ids=[f"{i.id}-{d}" for i, d in pairs])
    else:
        metafunc.parametrize("impl", chosen, ids=[i.id for i in chosen])


def _xfail_patterns(config) -> list[str]:
    path = config.getoption("--xfails-file")
    if not path:
        return []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise pytest.UsageError(f"--xfails-file {path!r}: {e}") from None
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _matches(pattern: str, item) -> bool:
    """A known-failure line names a test by its node id, by the part after the
    file (``test_x[linear-pkg:fn-float32]``), or by a glob of either."""
    short = item.nodeid.split("::", 1)[-1]
    glob = pattern.replace("[", "[[]")   # brackets are part of test ids; only * and ? are wildcards
    return any(p == pattern or fnmatch.fnmatchcase(p, glob) for p in (item.nodeid, short, item.name))


_NOT_APPLICABLE = pytest.StashKey[set]()


def pytest_collection_modifyitems(session, config, items):
    gone = config.stash.get(_NOT_APPLICABLE, set())
    if gone:   # a property no implementation can take: deselected, not skipped (a skip would read as a pass)
        drop = [i for i in items if i.nodeid.split("[", 1)[0] in gone]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [i for i in items if i.nodeid.split("[", 1)[0] not in gone]
    patterns = _xfail_patterns(config)
    if not patterns:
        return
    used = set()
    for item in items:
        hit = [p for p in patterns if _matches(p, item)]
        if hit:
            used.update(hit)
            item.add_marker(pytest.mark.xfail(reason=f"listed in the xfails file ({hit[0]})", strict=False))
            item.stash[_XFAILED] = True
    config._kvcompress_unused_xfails = [p for p in patterns if p not in used]


_XFAILED = pytest.StashKey[bool]()


# -- running -------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """For a property: seed it (ci's derandomize would draw the same cases
    for every implementation and dtype; seed from the test id with the
    implementation replaced by its kind instead, so dtypes differ, the
    implementations of a kind face the same cases, and runs stay
    deterministic), then fail it if it checked no example."""
    fn = getattr(item, "obj", None)
    if not _is_property(item) or not hasattr(fn, "hypothesis"):
        return (yield)
    from hypothesis import seed

    from . import report

    if profile_settings().derandomize:
        key = item.nodeid.split("::", 1)[-1]
        impl = item.callspec.params.get("impl") if hasattr(item, "callspec") else None
        if impl is not None:
            key = key.replace(impl.id, impl.kind)
        seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))(fn)
    report.begin_test()
    result = yield
    n = report.checked_in_test()
    if n == 0:
        raise AssertionError(f"{item.name}: no example was checked (every drawn example was discarded: empty "
                             "outputs or ill-conditioned cases). A property that checks nothing proves nothing; "
                             "widen the implementation's domain or the profile's budget.")
    return result


@pytest.fixture
def kvcompress_rerun(request) -> str:
    """A one-line command that reruns this property (with the same options)."""
    config = request.config
    opts = " ".join(f"--impl {s}" for s in config.getoption("--impl"))
    opts += "".join(f" --domain {s}" for s in config.getoption("--domain"))
    for name in ("--impl-device", "--impl-dtypes", "--kvcompress-profile"):
        if config.getoption(name):
            opts += f" {name} {config.getoption(name)}"
    return f"python -m pytest '{request.node.path}::{request.node.name}' {opts}".rstrip()


# -- reporting -------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Tag each report of a property with what it checked (implementation
    id, dtype, property, whether the implementation is emulated, its
    domain), as a ``user_properties`` entry "kvcompress": the report carries
    it to pytest-xdist's controller, where kvcompress-verify reads it."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    impl = params.get("impl")
    if hasattr(impl, "id") and not any(k == "kvcompress" for k, _ in item.user_properties):
        item.user_properties.append(("kvcompress", {
            "impl": impl.id, "dtype": params.get("dtype", "*"), "emulated": bool(getattr(impl, "emulated", False)),
            "property": getattr(item, "originalname", item.name), "domain": impl.domain.describe()}))


def pytest_report_header(config):
    if getattr(config, "_kvcompress_impls", None) is None:
        return None
    return f"kvcompress: profile {current_profile()}, {len(config._kvcompress_impls)} implementation(s) under test"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from importlib import import_module

    if getattr(config, "_kvcompress_impls", None) is None:
        return
    coverage = import_module(f"{__package__}.coverage")
    lines = coverage.table()
    if lines:
        terminalreporter.section("kvcompress: features drawn per implementation and dtype")
        for line in lines:
            terminalreporter.write_line(line)
    xpassed = [r.nodeid for r in terminalreporter.stats.get("xpassed", [])]
    if xpassed:
        terminalreporter.section("kvcompress: known failures that PASSED (remove them from the xfails file)")
        for nodeid in xpassed:
            terminalreporter.write_line(nodeid)
    unused = getattr(config, "_kvcompress_unused_xfails", [])
    if unused:
        terminalreporter.section("kvcompress: xfails-file lines that match no test")
        for p in unused:
            terminalreporter.write_line(p)


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_kvcompress_impls", None) is None:
        return
    from . import coverage, report

    report.write()
    if is_strict_profile() and coverage.missing() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nkvcompress: the ci profile never drew these promised features:")
        for key, miss in coverage.missing().items():
            print(f"  {key}: {', '.join(miss)}")
