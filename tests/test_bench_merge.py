"""``kvcompress-bench --render``: one report from several runs on one machine
(kvcompress/bench.py, ``merge_runs``), for a record larger than one call's
time limit; from small synthetic pytest-benchmark JSONs."""

from __future__ import annotations

import json

import pytest

from kvcompress import bench


def _run(tmp_path, name, entrants, *, gpu="H200", T=8192, failed=(), when="2026-12-04T10:00:00"):
    """An output directory as kvcompress-bench leaves it: bench.json with one
    linear forward row per entrant, and outcomes.json."""
    benchmarks = []
    for entrant, median, family in entrants:
        info = dict(kind="linear", role="nsa", direction="fwd", D=128, T=T, L=32, S=16, dtype="bfloat16",
                    device="cuda", entrant=entrant, family=family, label=f"label of {entrant}", flops=10 ** 9,
                    bytes=10 ** 8, tflops=1.0, gbps=100.0, roofline_fraction=0.5, peak_extra_bytes=None,
                    median_s=median)
        benchmarks.append({"fullname": f"benchmarks/test_bench_compress.py::test_compress[linear-T{T}-{entrant}]",
                           "stats": {"median": median, "rounds": 5}, "extra_info": info})
    ceil = {"bandwidth_gbps": 4000.0, "matmul_tflops": 700.0, "copy_bytes": 1 << 30, "matmul_dtype": "bfloat16",
            "matmul_n": 8192}
    data = {"datetime": when, "benchmarks": benchmarks,
            "kvcompress": {"device": "cuda", "gpu": gpu, "cuda": "13.0", "torch": "2.11", "dtype": "bfloat16",
                           "sizes": "record", "ceilings": ceil}}
    d = tmp_path / name
    d.mkdir()
    (d / "bench.json").write_text(json.dumps(data))
    (d / "outcomes.json").write_text(json.dumps({"passed": [b["fullname"] for b in benchmarks],
                                                 "failed": [[f, "CheckFailed: wrong"] for f in failed],
                                                 "skipped": [], "seconds": 100.0}))
    return d


def test_render_merges_runs_into_one_report(tmp_path):
    a = _run(tmp_path, "a", [("triton", 1e-4, "kvcompress"), ("seed", 4e-4, "peer")], T=8192)
    b = _run(tmp_path, "b", [("triton", 2e-4, "kvcompress"), ("seed", 6e-4, "peer")], T=65536,
             failed=["test_compress[linear-T65536-torch]"], when="2026-12-04T10:10:00")
    out = tmp_path / "merged"
    assert bench.main(["--render", str(a), str(b), "--out", str(out)]) == 0
    text = (out / "bench.md").read_text()
    assert "Merged from 2 runs" in text and "2026-12-04T10:00:00" in text and "2026-12-04T10:10:00" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| fwd |")]
    assert {r.split("|")[2].strip() for r in rows} == {"8192", "65536"}
    assert "4x" in text and "3x" in text                        # each triton row against its own run's seed
    assert "test_compress[linear-T65536-torch]" in text and "4 passed, 1 failed" in text
    merged = json.loads((out / "bench.json").read_text())
    assert len(merged["benchmarks"]) == 4 and len(merged["kvcompress"]["parts"]) == 2


def test_render_refuses_runs_of_different_machines_or_repeated_benchmarks(tmp_path):
    a = _run(tmp_path, "a", [("triton", 1e-4, "kvcompress")])
    other = _run(tmp_path, "other", [("triton", 1e-4, "kvcompress")], gpu="H100", T=65536)
    with pytest.raises(SystemExit, match="differ in 'gpu'"):
        bench.main(["--render", str(a), str(other), "--out", str(tmp_path / "x")])
    again = _run(tmp_path, "again", [("triton", 1e-4, "kvcompress")])
    with pytest.raises(SystemExit, match=r"test_compress\[linear-T8192-triton\] is in runs 0 and 1"):
        bench.main(["--render", str(a), str(again), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main(["--render", str(tmp_path / "none"), "--out", str(tmp_path / "z")])


def test_a_run_writes_its_outcomes(monkeypatch, tmp_path):
    """What --render merges: a run's outcomes.json lists what passed, what
    failed and why (pytest itself replaced here by a fake that reports two
    tests through the run's plugin)."""
    from types import SimpleNamespace

    def fake_main(args, plugins=()):
        for p in plugins:
            p.pytest_runtest_logreport(SimpleNamespace(when="call", passed=True, failed=False, skipped=False,
                                                       nodeid="test_compress[ok]"))
            p.pytest_runtest_logreport(SimpleNamespace(when="call", passed=False, failed=True, skipped=False,
                                                       nodeid="test_compress[bad]",
                                                       longreprtext="E   CheckFailed: wrong"))
        return pytest.ExitCode.TESTS_FAILED

    monkeypatch.setattr(pytest, "main", fake_main)
    assert bench.main(["--out", str(tmp_path), "--device", "cpu", "--check-only"]) == 1
    got = json.loads((tmp_path / "outcomes.json").read_text())
    assert got["passed"] == ["test_compress[ok]"] and got["failed"] == [["test_compress[bad]", "CheckFailed: wrong"]]
    assert got["skipped"] == [] and got["seconds"] >= 0


def test_the_report_sets_each_size_against_its_fastest_peer(tmp_path):
    """The "Against the fastest peer" section: per configuration the fastest
    kvcompress entrant against the fastest peer of the same run, the
    speed-up, whether it reaches 1.25x, and the count of rows that do."""
    a = _run(tmp_path, "a", [("triton", 1e-4, "kvcompress"), ("torch", 3e-4, "kvcompress"),
                             ("seed", 4e-4, "peer"), ("seed+compile", 1.2e-4, "peer")], T=8192)
    b = _run(tmp_path, "b", [("triton", 2e-4, "kvcompress"), ("seed", 6e-4, "peer")], T=65536,
             when="2026-12-04T10:10:00")
    out = tmp_path / "merged"
    assert bench.main(["--render", str(a), str(b), "--out", str(out)]) == 0
    text = (out / "bench.md").read_text()
    section = text[text.index("## Against the fastest peer"):]
    rows = [ln.split("|")[1:-1] for ln in section.splitlines() if ln.startswith("| linear |")]
    assert [[c.strip() for c in r] for r in rows] == [
        ["linear", "32/16", "128", "65536", "fwd", "triton", "200 us", "seed", "600 us", "3x", "yes"],
        ["linear", "32/16", "128", "8192", "fwd", "triton", "100 us", "seed+compile", "120 us", "1.2x", "**no**"]]
    assert "1 of 2 rows reach 1.25x." in section


def test_the_report_lists_the_autotuner_picks(tmp_path):
    """Each benchmark's picks (kvcompress-bench records the configurations the
    autotuner chose in its gate) appear in a section of their own; a run
    without any (the CPU) has no such section."""
    a = _run(tmp_path, "a", [("triton", 1e-4, "kvcompress"), ("seed", 4e-4, "peer")])
    data = json.loads((a / "bench.json").read_text())
    assert "## Autotuner picks" not in bench.render(data)
    data["benchmarks"][0]["extra_info"]["autotuned"] = {"linear_fwd_kernel": ["BLOCK_W: 128, num_warps: 8"]}
    section = bench.render(data).split("## Autotuner picks")[1]
    assert "| linear | fwd | 8192 | 128 | 32/16 | triton | linear_fwd_kernel | BLOCK_W: 128, num_warps: 8 |" in section
