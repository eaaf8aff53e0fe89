"""kvcompress-bench's decoding tables (kvcompress/bench.py, ``render_decode``),
rendered from a small synthetic pytest-benchmark JSON, and its
``--decode/--no-decode`` switch."""

from __future__ import annotations

import re

import pytest

from kvcompress import bench

DECODE_CFG = dict(suite="decode", device="cuda", dtype="bfloat16", prefix=4096, H=4, D=128, L=32, S=16, G=4,
                  D_out=128, F=None, padding="left", pe=True, layout="bthd")


def _decode(kind, N, entrant, median, *, family="kvcompress", steps=1, **extra):
    info = dict(DECODE_CFG, kind=kind, N=N, entrant=entrant, family=family, steps=steps,
                label=f"label of {entrant}", group=f"decode {kind} N={N}", **extra)
    return {"fullname": f"benchmarks/test_bench_decode.py::test_decode[{kind}-N{N}-{entrant}]",
            "stats": {"median": median, "rounds": 5}, "extra_info": info}


def _compress(entrant, median, family):
    info = dict(kind="linear", role="nsa", direction="fwd", D=128, T=8192, L=32, S=16, dtype="bfloat16",
                device="cuda", entrant=entrant, family=family, label=f"label of {entrant}", flops=10 ** 9,
                bytes=10 ** 8, tflops=1.0, gbps=100.0, roofline_fraction=0.5, peak_extra_bytes=None, median_s=median)
    return {"fullname": f"benchmarks/test_bench_compress.py::test_compress[linear-{entrant}]",
            "stats": {"median": median, "rounds": 5}, "extra_info": info}


def _data():
    benchmarks = [
        _compress("triton", 1e-4, "kvcompress"),
        _compress("seed", 4e-4, "peer"),
        # linear, N = 8: us/step torch 500, torch+graph 50, recompress 4000, streaming 16 ms / 16 steps = 1000
        _decode("linear", 8, "torch", 5e-4, sync_free=True),
        _decode("linear", 8, "torch+graph", 5e-5, graph_equals_eager=True),
        _decode("linear", 8, "recompress", 4e-3, family="peer", backend="triton"),
        _decode("linear", 8, "streaming", 1.6e-2, family="peer", steps=16),
        # linear, N = 1: no streaming peer measured (skipped)
        _decode("linear", 1, "torch", 2e-4),
        _decode("linear", 1, "recompress", 1e-3, family="peer"),
        # mean_pool, N = 64
        _decode("mean_pool", 64, "triton", 1e-4, bit_exact=None),
        _decode("mean_pool", 64, "torch", 2e-4, bit_exact=True),
        _decode("mean_pool", 64, "recompress", 3e-4, family="peer"),
        _decode("mean_pool", 64, "streaming", 3.2e-3, family="peer", steps=16),
        # a benchmark without a configuration (benchmarks/test_bench_streaming.py)
        {"fullname": "benchmarks/test_bench_streaming.py::test_decode_step_emit[linear]",
         "stats": {"median": 1e-3, "rounds": 5}, "extra_info": {}},
    ]
    return {"datetime": "2026-12-04T00:00:00", "benchmarks": benchmarks,
            "kvcompress": {"device": "cuda", "gpu": "H200", "cuda": "12.8", "torch": "2.11", "dtype": "bfloat16",
                           "sizes": "default", "ceilings": None}}


def _rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as cells."""
    part = text.split(heading, 1)[1]
    lines = [ln for ln in part.splitlines()[1:] if ln.strip()]
    table = []
    for ln in lines:
        if not ln.startswith("|"):
            if table:
                break
            continue
        table.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return table[2:]            # header and separator


def _row(rows, **match):
    cols = {"N": 0, "P": 1, "entrant": 2}
    found = [r for r in rows if all(r[cols[k]] == str(v) for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_decode_tables():
    text = bench.render(_data())
    assert "## Decoding" in text
    rows = _rows(text, "### Decoding: linear")
    # N ascending, eager before replayed before the peers
    assert [(r[0], r[2]) for r in rows] == [("1", "torch"), ("1", "recompress"), ("8", "torch"),
                                            ("8", "torch+graph"), ("8", "recompress"), ("8", "streaming")]
    torch_row = _row(rows, N=8, entrant="torch")
    assert torch_row[3:6] == ["500", "8x", "2x"]
    assert "sync-free" in torch_row[6]
    graph_row = _row(rows, N=8, entrant="torch+graph")
    assert graph_row[3:6] == ["50", "80x", "20x"]
    assert "replay = eager" in graph_row[6]
    streaming = _row(rows, N=8, entrant="streaming")       # time per call / steps; no ratio for a peer
    assert streaming[3:6] == ["1000", "", ""]
    assert "16 steps per call" in streaming[6]
    assert _row(rows, N=8, entrant="recompress")[3:6] == ["4000", "", ""]
    assert _row(rows, N=1, entrant="torch")[3:6] == ["200", "5x", "-"]    # no streaming measured at N = 1

    mp = _rows(text, "### Decoding: mean_pool")
    assert _row(mp, N=64, entrant="torch")[6] == "bit-exact"
    assert _row(mp, N=64, entrant="triton")[3:6] == ["100", "3x", "2x"]

    summary = _rows(text, "### Decoding summary")
    assert ["linear", "8", "4096", "torch+graph", "50", "80x", "20x"] in summary
    assert ["mean_pool", "64", "4096", "triton", "100", "3x", "2x"] in summary
    assert ["linear", "1", "4096", "torch", "200", "5x", "-"] in summary


def test_decode_rows_stay_out_of_the_other_tables():
    text = bench.render(_data())
    compress = text.split("## Decoding", 1)[0]
    assert "## linear" in compress and "| fwd | 8192 |" in compress
    assert "recompress" not in compress and "streaming" not in compress
    assert "4x" in _row_of(compress, "triton")               # the compression table itself is unchanged
    other = text.split("## Other benchmarks", 1)[1]
    assert "test_decode_step_emit" in other and "test_decode[" not in other


def _row_of(text, entrant):
    return next(ln for ln in text.splitlines() if f"| {entrant} |" in ln)


def test_decode_vs_saved():
    data = _data()
    saved = {"datetime": "2026-12-01T00:00:00",
             "benchmarks": [{"fullname": b["fullname"], "stats": {"median": 2 * b["stats"]["median"]}}
                            for b in data["benchmarks"] if b["extra_info"].get("entrant") == "torch"]}
    text = bench.render(data, compared=saved)
    rows = _rows(text, "### Decoding: linear")
    assert _row(rows, N=8, entrant="torch")[-1] == "2x"
    assert _row(rows, N=8, entrant="streaming")[-1] == ""


def test_no_decode_section_without_decode_results():
    data = _data()
    data["benchmarks"] = [b for b in data["benchmarks"] if not bench._decode(b)]
    assert "Decoding" not in bench.render(data)
    assert bench.render_decode([]) == []


def test_plot_ignores_decode_results(tmp_path):
    data = _data()
    data["kvcompress"]["ceilings"] = {"bandwidth_gbps": 4000.0, "matmul_tflops": 800.0}
    data["benchmarks"] = [b for b in data["benchmarks"] if bench._decode(b)]
    msg = bench.plot(data, tmp_path / "roofline.png")      # no cost model: nothing to plot, and no error
    assert re.search(r"no timed benchmarks|matplotlib is not installed", msg)


@pytest.mark.parametrize("flag", [None, "--decode", "--no-decode"])
def test_decode_switch(monkeypatch, tmp_path, flag):
    seen = []

    def fake_main(args, plugins=()):
        seen.append(list(args))
        return pytest.ExitCode.NO_TESTS_COLLECTED

    monkeypatch.setattr(pytest, "main", fake_main)
    argv = ["--out", str(tmp_path), "--device", "cpu", "--check-only"] + ([flag] if flag else [])
    assert bench.main(argv) == int(pytest.ExitCode.NO_TESTS_COLLECTED)
    ignored = [a for a in seen[0] if a.startswith("--ignore=")]
    if flag == "--no-decode":
        assert ignored == [f"--ignore={bench._checkout() / bench.SUITE / bench.DECODE_MODULE}"]
    else:
        assert ignored == []


def test_a_gate_fallback_is_named_in_the_tables():
    """An entrant held to the RMS check because its class's bound was
    ill-conditioned (benchmarks/checks.py, ``Checker.gate_class``) gets a
    note under its kind's table; one checked under its own class gets none."""
    data = _data()
    b = data["benchmarks"][0]
    assert "RMS check" not in bench.render(data)
    b["extra_info"].update(precision_class="io-intermediates", check_precision="peer")
    text = bench.render(data)
    assert "`triton` at D=128: held to the peers' RMS check" in text and "(io-intermediates)" in text
    b["extra_info"].update(check_precision="io-intermediates")
    assert "RMS check" not in bench.render(data)
