"""The property suite under pytest-xdist (kvcompress/testing/_xdist.py): the
workers' measurements and coverage merge on the controller, so the report
JSON, the coverage table and the ci profile's missing-feature check are those
of the whole run; ``--dist each`` sums independent parts of a property's
budget; worker gwN gets the N-th visible GPU modulo their count.

Sessions with ``-n 2`` are subprocesses: the repository's own properties
from this checkout, a consumer's property in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("xdist")
import execnet  # noqa: E402  (installed with pytest-xdist)

from kvcompress.testing._xdist import assign_gpus, gpu_for_worker, visible_devices  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFORMANCE = "kvcompress/testing/properties/test_conformance.py"
TABLE = "kvcompress: features drawn per implementation and dtype"


def _env(**extra):
    e = dict(os.environ)
    for k in ("KVCOMPRESS_REPORT", "KVCOMPRESS_PROFILE", "KVCOMPRESS_EMULATED", "KVCOMPRESS_PART_EXAMPLES",
              "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        e.pop(k, None)
    e.update(extra)
    return e


def _pytest(*args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=600)


def _out(r):
    return r.stdout[-5000:] + r.stderr[-3000:]


# -- one GPU per worker --------------------------------------------------------------

def test_worker_n_gets_the_nth_visible_gpu_modulo_their_count():
    assert [gpu_for_worker(f"gw{n}", ["0", "1", "2"]) for n in range(7)] == ["0", "1", "2", "0", "1", "2", "0"]
    assert gpu_for_worker("gw5", ["4", "6"]) == "6"
    assert gpu_for_worker("gw0", []) is None
    with pytest.raises(ValueError, match="worker id"):
        gpu_for_worker("master", ["0"])
    # the controller's CUDA_VISIBLE_DEVICES when set (CUDA stops at a negative entry), else the device count
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}) == ["GPU-a1", "GPU-b2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({}, device_count=2) == ["0", "1"]
    assert visible_devices({}, device_count=0) == []


def test_gpus_go_into_the_local_workers_specs_unless_they_set_one():
    specs = [execnet.XSpec("popen"), execnet.XSpec("popen"), execnet.XSpec("popen//env:CUDA_VISIBLE_DEVICES=7"),
             execnet.XSpec("ssh=host"), execnet.XSpec("popen")]
    for n, spec in enumerate(specs):
        spec.id = f"gw{n}"
    assign_gpus(specs, ["0", "1"])
    assert [s.env.get("CUDA_VISIBLE_DEVICES") for s in specs] == ["0", "1", "7", None, "0"]
    cpu = [execnet.XSpec("popen")]
    cpu[0].id = "gw0"
    assign_gpus(cpu, [])
    assert cpu[0].env == {}


# -- the repository's properties: merged results equal one process's --------------------

def test_the_merged_report_and_table_equal_one_process(tmp_path):
    """Two properties on two workers: the report has both workers' examples,
    exactly as one process measures them (ci is deterministic), and the
    coverage table is printed once, by the controller, with the full counts."""
    sel = [CONFORMANCE, "-k", "mean_pool and torch and (float32 or float64)", "--kvcompress-profile", "ci"]
    par = _pytest(*sel, "-n", "2", "-v", "--kvcompress-report", str(tmp_path / "par.json"))
    assert par.returncode == 0, _out(par)
    assert "[gw0] " in par.stdout and "[gw1] " in par.stdout, _out(par)   # one property each
    one = _pytest(*sel, "-q", "--kvcompress-report", str(tmp_path / "one.json"))
    assert one.returncode == 0, _out(one)
    merged = json.loads((tmp_path / "par.json").read_text())
    single = json.loads((tmp_path / "one.json").read_text())
    assert sorted(merged) == sorted(single) == [f"matches_reference|mean_pool-torch|{d}"
                                                for d in ("float32", "float64")]
    fields = ("examples", "failed", "first_failure", "worst_ratio")
    assert {k: [v[f] for f in fields] for k, v in merged.items()} \
        == {k: [v[f] for f in fields] for k, v in single.items()}
    assert par.stdout.count(TABLE) == 1
    for key, stats in merged.items():
        dtype = key.rsplit("|", 1)[1]
        rows = [line for line in par.stdout.splitlines() if line.startswith("mean_pool-torch") and dtype in line]
        assert len(rows) == 1 and f"{stats['examples']} examples  all features" in rows[0], rows


# -- a consumer's property: coverage over workers, --dist each --------------------------

# required features of this kernel: padding=valid, padding=left, pe=off, windows>0, windows=0
KERNEL = """
    import kvcompress.functional as kf
    from kvcompress.testing import declare_domain

    mean_pool = declare_domain(pe=False, groups="per_head", layouts=("contiguous",), inputs=("batched",))(
        kf.mean_pool)
"""

# each parametrization draws one padding only: alone it misses the other
PROPERTY = """
    import dataclasses

    import pytest
    from hypothesis import assume, given, strategies as st

    from kvcompress.testing import coverage, report
    from kvcompress.testing.cases import make_inputs
    from kvcompress.testing.convert import to_numpy
    from kvcompress.testing.plugin import property_settings
    from kvcompress.testing.records import RECORDS
    from kvcompress.testing.strategies import cases
    from kvcompress.testing.tolerance import compare, forward_bound

    pytestmark = pytest.mark.kvcompress_property


    @pytest.mark.parametrize("padding", ["valid", "left"])
    @property_settings()
    @given(data=st.data())
    def test_one_padding(impl, dtype, padding, data):
        rec = RECORDS[impl.kind]
        domain = dataclasses.replace(impl.domain, paddings=(padding,))
        case = data.draw(cases(kind=impl.kind, dtype=dtype, domain=domain), label="case")
        inputs = make_inputs(case, rec, impl.device)
        b = forward_bound(case, inputs)
        assume(b.well_conditioned)
        coverage.record(impl.id, dtype, case, impl.domain)
        ok, ratio, _, _ = compare(to_numpy(rec.call(impl.fn, case, inputs)), rec.call_reference(case, inputs),
                                  b.bound)
        report.observe(report.key("one_padding", impl.id, dtype), ratio=ratio, failed=not ok)
        assert ok, ratio
"""

# each worker notes the CUDA_VISIBLE_DEVICES it started with (before torch)
CONFTEST = """
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        with open(f"gpu-{worker}.txt", "w") as f:
            f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
"""

CONSUMER = ["test_one_padding.py", "--impl", "mean_pool=kernel:mean_pool", "--impl-device", "cpu",
            "--impl-dtypes", "float32", "-n", "2", "-v"]


def _consumer(tmp_path, *args, **env):
    for name, text in {"kernel.py": KERNEL, "test_one_padding.py": PROPERTY, "conftest.py": CONFTEST}.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return _pytest(*CONSUMER, *args, cwd=tmp_path, PYTHONPATH=str(tmp_path), **env)


def test_coverage_is_the_whole_runs_and_a_missing_feature_still_fails(tmp_path):
    """Each worker draws one padding: neither fails on its own partial
    coverage, and the controller's merged table has both. Selecting one
    padding only still fails the ci profile's check under xdist."""
    both = _consumer(tmp_path, "--kvcompress-profile", "ci", "--kvcompress-report", "r.json")
    assert both.returncode == 0, _out(both)
    assert "[gw0] " in both.stdout and "[gw1] " in both.stdout, _out(both)
    report = json.loads((tmp_path / "r.json").read_text())
    examples = report["one_padding|mean_pool-kernel:mean_pool|float32"]["examples"]
    rows = [line for line in both.stdout.splitlines() if line.startswith("mean_pool-kernel:mean_pool")]
    assert both.stdout.count(TABLE) == 1 and len(rows) == 1, _out(both)
    assert rows[0].split()[2] == str(examples) and rows[0].endswith("all features"), rows

    one = _consumer(tmp_path, "--kvcompress-profile", "ci", "-k", "valid")
    assert one.returncode == 1, _out(one)
    assert "the ci profile never drew these promised features" in one.stdout, _out(one)
    assert "MISSING padding=left" in one.stdout and "1 passed" in one.stdout, _out(one)


def test_dist_each_sums_independent_parts_and_gives_each_worker_a_gpu(tmp_path):
    """``--dist each`` with the thorough-part profile: every worker runs every
    property on its own random examples, and the report sums the parts (the
    recipe for a property too slow for one process). Worker gwN started with
    the N-th of the controller's CUDA_VISIBLE_DEVICES."""
    r = _consumer(tmp_path, "--dist", "each", "--kvcompress-profile", "thorough-part", "--kvcompress-report",
                  "r.json", KVCOMPRESS_PART_EXAMPLES="6", CUDA_VISIBLE_DEVICES="5,7")
    assert r.returncode == 0, _out(r)
    assert "4 passed" in r.stdout, _out(r)   # two properties on each of two workers
    stats = json.loads((tmp_path / "r.json").read_text())["one_padding|mean_pool-kernel:mean_pool|float32"]
    assert stats["examples"] == 2 * 2 * 6 and not stats["failed"], stats
    assert {w: (tmp_path / f"gpu-{w}.txt").read_text() for w in ("gw0", "gw1")} == {"gw0": "5", "gw1": "7"}
