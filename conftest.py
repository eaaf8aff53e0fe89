"""Top-level pytest configuration: Hypothesis profiles, the --impl options
of the contributor harness, and the feature-coverage report.

Profiles (select with ``--hypothesis-profile NAME`` or the environment
variable ``KVCOMPRESS_PROFILE``; default ``ci``):

- ``dev``: a handful of examples per property, random, for editing loops.
- ``ci``: deterministic (derandomized, no example database), bounded time,
  prints the ``@reproduce_failure`` blob of any failure; asserts that the
  promised features were all drawn.
- ``thorough``: many random examples, for long runs and new kernels;
  ``thorough-part``: one of several processes sharing a thorough run.
- ``ci-emulated``: like ci with 10 examples, for backends emulated on this
  device (Triton's interpreter on the CPU), which ``--emulated only``
  selects; they are left out of a plain run (``--emulated exclude``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
import torch
from hypothesis import HealthCheck, seed, settings

# Before anything imports triton: without a GPU, Triton kernels run in its
# interpreter on CPU tensors (that is how CI exercises them); float32 dots
# are IEEE unless a test is about tf32 (STYLE.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
# Triton outputs start as NaN (_triton_common.empty): an element a kernel never writes fails
os.environ.setdefault("KVCOMPRESS_POISON", "1")
# The suite runs thousands of tiny ops, where OpenMP start-up and spinning
# threads cost more than they save (and oversubscribe a shared machine);
# benchmarks/conftest.py gives the benchmarks their threads back.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])  # `rerun` is stateless
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
# one part of a thorough run split over processes (scripts/run_properties.py --split K): each part
# draws KVCOMPRESS_PART_EXAMPLES examples from its own --hypothesis-seed
settings.register_profile("thorough-part", max_examples=int(os.environ.get("KVCOMPRESS_PART_EXAMPLES", "250")),
                          **_common)
# emulated backends (Triton's interpreter on the CPU) cost ~100x per example:
# deterministic like ci, with fewer examples (and smaller cases, Impl.limits)
settings.register_profile("ci-emulated", max_examples=10, derandomize=True, database=None, **_common)
settings.load_profile(os.environ.get("KVCOMPRESS_PROFILE", "ci"))


def pytest_addoption(parser):
    group = parser.getgroup("kvcompress")
    group.addoption("--impl", action="append", default=[], metavar="KIND=module:callable",
                    help="verify this callable (reference signature, torch tensors) instead of the built-in "
                         "backends; repeatable")
    group.addoption("--impl-device", default=None, choices=("cpu", "cuda"),
                    help="device of the inputs given to implementations (default: cuda if available, else cpu)")
    group.addoption("--impl-dtypes", default=None, metavar="LIST",
                    help="comma list of dtypes to test (default: float64,float32,float16,bfloat16)")
    group.addoption("--emulated", default=None, choices=("exclude", "only", "include"),
                    help="built-in backends emulated on this device (Triton's interpreter on the CPU): leave out "
                         "(default), run only them (use with --hypothesis-profile ci-emulated), or include them; "
                         "also KVCOMPRESS_EMULATED")


def _impls(config):
    from tests.harness import impls

    cached = getattr(config, "_kvcompress_impls", None)
    if cached is not None:
        return cached
    if config.getoption("--emulated"):
        os.environ["KVCOMPRESS_EMULATED"] = config.getoption("--emulated")
    try:
        impls.emulated_choice()
        device = impls.parse_device(config.getoption("--impl-device"))
        dtypes = impls.parse_dtypes(config.getoption("--impl-dtypes"))
        given = [impls.load_impl(s, device, dtypes) for s in config.getoption("--impl")]
    except impls.UsageError as e:
        raise pytest.UsageError(str(e)) from None
    if given:
        chosen = given
    else:
        chosen = [i for i in impls.builtin_impls(device)]
        chosen = [dataclasses.replace(i, dtypes=tuple(d for d in i.dtypes if d in dtypes)) for i in chosen]
    config._kvcompress_impls = chosen
    return chosen


def pytest_configure(config):
    _impls(config)  # a bad --impl is a usage error before any test runs


def pytest_generate_tests(metafunc):
    """Tests asking for ``impl`` run once per implementation (and per dtype
    when they also ask for ``dtype``); ``kind`` restricts to one kind."""
    if "impl" not in metafunc.fixturenames:
        return
    impls = _impls(metafunc.config)
    kinds = getattr(metafunc.function, "kvcompress_kinds", None)
    needs = getattr(metafunc.function, "kvcompress_needs_dtype", None)
    impls = [i for i in impls if (kinds is None or i.kind in kinds) and (needs is None or needs in i.dtypes)]
    if "dtype" in metafunc.fixturenames:
        pairs = [(i, d) for i in impls for d in i.dtypes]
        metafunc.parametrize(("impl", "dtype"), pairs, ids=[f"{i.id}-{d}" for i, d in pairs])
    else:
        metafunc.parametrize("impl", impls, ids=[i.id for i in impls])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """The ci profile's derandomize seeds Hypothesis from the test function
    alone, so every (impl, dtype) parametrization of a property would draw
    the same cases. Seed each from its test id instead, with the
    implementation's name replaced by its kind: dtypes draw different cases,
    every implementation of a kind faces the same ones, and runs stay
    deterministic."""
    fn = getattr(item, "obj", None)
    if settings.default.derandomize and hasattr(fn, "hypothesis"):
        key = item.nodeid
        impl = item.callspec.params.get("impl") if hasattr(item, "callspec") else None
        if impl is not None:
            key = key.replace(impl.id, impl.kind)
        seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))(fn)
    yield


@pytest.fixture
def rerun(request) -> str:
    """A one-line command that reruns this test (with the same --impl options)."""
    opts = " ".join(f"--impl {s}" for s in request.config.getoption("--impl"))
    for name in ("--impl-device", "--impl-dtypes"):
        if request.config.getoption(name):
            opts += f" {name} {request.config.getoption(name)}"
    return f"python -m pytest '{request.node.nodeid}' {opts}".rstrip()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.harness import coverage

    lines = coverage.table()
    if lines:
        terminalreporter.section("kvcompress: features drawn per implementation and dtype")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    from tests.harness import coverage, report

    report.write()

    strict = settings.default in (settings.get_profile("ci"), settings.get_profile("ci-emulated"))
    if strict and coverage.missing() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nkvcompress: the ci profile never drew these promised features:")
        for key, miss in coverage.missing().items():
            print(f"  {key}: {', '.join(miss)}")
