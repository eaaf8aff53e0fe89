"""The contributor harness itself: --impl usage errors are usage errors, a
broken callable fails with a shrunk counterexample, and kvcompress-verify
prints its matrix and exits non-zero on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = "kvcompress/testing/properties/test_conformance.py"


def _run(args, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("KVCOMPRESS_REPORT", "KVCOMPRESS_VERIFY_NATIVE_ONLY")}
    e.update({"KVCOMPRESS_PROFILE": "dev", **env})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("spec, message", [
    ("linear", "KIND=module:callable"),
    ("convolution=kvcompress.functional:linear", "unknown kind 'convolution'"),
    ("linear=kvcompress.nonexistent:linear", "cannot import module 'kvcompress.nonexistent'"),
    ("linear=kvcompress.functional:nope", "has no attribute 'nope'"),
    ("linear=kvcompress.functional:__doc__", "is not callable"),
    ("linear=kvcompress.functional", "module:callable"),
])
def test_bad_impl_is_a_usage_error(spec, message):
    r = _run(["-m", "pytest", CONFORMANCE, "-q", "-p", "no:cacheprovider", "--impl", spec])
    assert r.returncode == 4, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert message in r.stderr + r.stdout


def test_bad_impl_dtypes_is_a_usage_error():
    r = _run(["-m", "pytest", CONFORMANCE, "-q", "-p", "no:cacheprovider",
              "--impl-dtypes", "float32,int8"])
    assert r.returncode == 4 and "--impl-dtypes" in r.stderr + r.stdout


def test_verify_prints_the_matrix_and_writes_json(tmp_path):
    out = tmp_path / "v.json"
    r = _run(["-m", "kvcompress.verify", "-k", "mean_pool and float32", "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mean_pool      torch" in r.stdout and "pass" in r.stdout
    rep = json.loads(out.read_text())
    rows = [row for row in rep["rows"] if row["kind"] == "mean_pool" and row["dtype"] == "float32"]
    assert rows and rows[0]["passed"] and rows[0]["examples"] > 0
    assert {"matches_reference", "test_locality", "test_gradients_match_exact"} <= set(rows[0]["properties"])
    # the second session: the Triton backend through its interpreter, with the ci-emulated budget
    emulated = [row for row in rows if row["backend"] == "triton (interpreter)"]
    assert emulated and emulated[0]["passed"] and emulated[0]["properties"]["matches_reference"] == "passed"


def test_verify_native_only_leaves_the_emulated_session_out_and_says_so(tmp_path):
    out = tmp_path / "v.json"
    r = _run(["-m", "kvcompress.verify", "-k", "mean_pool and float32 and matches_reference", "--json", str(out)],
             KVCOMPRESS_VERIFY_NATIVE_ONLY="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "emulated backends (Triton's interpreter) were left out" in r.stdout
    backends = {row["backend"] for row in json.loads(out.read_text())["rows"]}
    assert backends == {"torch"}, backends


def test_verify_fails_on_a_broken_callable(tmp_path):
    mod = tmp_path / "broken_impl.py"
    mod.write_text(
        "import kvcompress.functional as kf\n"
        "def mean_pool(x, **kw):\n"
        "    return kf.mean_pool(x, **kw) * 1.01   # 1% off: far outside any tolerance\n")
    r = _run(["-m", "kvcompress.verify", "--impl", "mean_pool=broken_impl:mean_pool", "--impl-dtypes", "float32",
              "-k", "matches_reference"], PYTHONPATH=str(tmp_path))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAIL" in r.stdout
