"""kvcompress-bench: time every kind x registered backend beside its peers.

Runs the benchmark suite of a source checkout (``benchmarks/``: the
configurations, the peers, the correctness gate, the timing method are
described in docs/benchmarks.md) in this process with pytest and
pytest-benchmark, then writes to the output directory:

- ``bench.json``: pytest-benchmark's JSON (every round, the machine, the
  ceilings measured in this run, and per benchmark its configuration,
  flops, bytes, achieved TFLOP/s and GB/s, fraction of the roofline, peak
  extra memory, and the correctness gate's worst error / bound);
- ``bench.md``: the tables (also printed): per kind, every configuration
  and entrant with median time, TFLOP/s, GB/s, % of roofline, peak extra
  memory and the speedup of each kvcompress backend over each peer; then
  the decoding tables (``benchmarks/test_bench_decode.py``): per kind, the
  latency of one step of N streams (us/step) of ``decode_step`` with each
  backend, eager and replayed from a CUDA graph, and its speed-up over
  recompressing the prefixes and over ``kvcompress.streaming``;
- ``roofline.png``: every benchmark against the measured ceilings
  (needs matplotlib; without it the plot is skipped with a message).

    kvcompress-bench --out results                 # default set for this machine (GPU if present)
    kvcompress-bench --out results --quick --kinds linear,mlp
    kvcompress-bench --out results --benchmark-save base      # keep this run in results/storage
    kvcompress-bench --out results --benchmark-compare        # compare with the last saved run
    kvcompress-bench --out results --check-only               # correctness only, nothing timed (CI)
    kvcompress-bench --out results --no-decode                # without the decoding benchmarks
    kvcompress-bench --out results -k test_bench_decode       # only the decoding benchmarks
    kvcompress-bench --out record --render part1 part2        # one report from the runs in part1/, part2/

A run also writes ``outcomes.json`` (what passed, failed or was not
measured, and why), so that ``--render`` can merge several runs made on one
machine (a record larger than one call's time limit) into one report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

SUITE = "benchmarks"
DECODE_MODULE = "test_bench_decode.py"
PEER_ORDER = ("seed", "seed+compile", "deepseek-v4", "deepseek-v4+compile", "fla", "reference")
DECODE_PEERS = ("recompress", "streaming")


def _checkout() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / SUITE / "conftest.py").is_file():
        raise SystemExit("kvcompress-bench: needs a source checkout of kvcompress (benchmarks/ beside the "
                         f"package); none found at {root}. Clone the repository and `pip install -e '.[test]'`.")
    return root


class _Outcomes:
    """A pytest plugin: which benchmarks passed, failed or were skipped (and why)."""

    def __init__(self):
        self.passed, self.failed, self.skipped = [], [], []
        self.t0 = time.perf_counter()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed.append(report.nodeid)
        elif report.failed:
            self.failed.append((report.nodeid, _one_line(report.longreprtext)))
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def to_json(self, seconds: float) -> dict:
        return {"passed": self.passed, "failed": [list(f) for f in self.failed],
                "skipped": [list(k) for k in self.skipped], "seconds": seconds}

    @classmethod
    def from_json(cls, parts: list[dict]) -> _Outcomes:
        """The outcomes of several runs together (``to_json``'s dicts)."""
        o = cls()
        for d in parts:
            o.passed += d["passed"]
            o.failed += [tuple(f) for f in d["failed"]]
            o.skipped += [tuple(k) for k in d["skipped"]]
        return o


def merge_runs(runs: list[dict]) -> dict:
    """One pytest-benchmark JSON from the ``bench.json`` of several runs of
    kvcompress-bench on one machine (a record split over calls).

    The runs must agree on the device, GPU or CPU model, torch and dtype
    (ValueError naming the field otherwise), and no benchmark may appear in
    two of them (ValueError naming it): nothing is silently picked. The
    result keeps the first run's header and lists every run under
    ``kvcompress["parts"]`` (its date, size set and measured ceilings); each
    benchmark keeps the roofline fraction of its own run's ceilings."""
    if not runs:
        raise ValueError("merge_runs: no runs given")
    first = runs[0].get("kvcompress", {})
    for field in ("device", "gpu", "cpu", "torch", "dtype"):
        seen = {r.get("kvcompress", {}).get(field) for r in runs}
        if len(seen) > 1:
            raise ValueError(f"merge_runs: the runs differ in {field!r}: {sorted(map(str, seen))}")
    names, benchmarks = {}, []
    for i, r in enumerate(runs):
        for b in r.get("benchmarks", []):
            if b["fullname"] in names:
                raise ValueError(f"merge_runs: {b['fullname']} is in runs {names[b['fullname']]} and {i}")
            names[b["fullname"]] = i
            benchmarks.append(b)
    parts = [{"datetime": r.get("datetime", ""), "sizes": r.get("kvcompress", {}).get("sizes"),
              "ceilings": r.get("kvcompress", {}).get("ceilings")} for r in runs]
    return dict(runs[0], benchmarks=benchmarks, kvcompress=dict(first, parts=parts))


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
    return (lines[0][2:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]


# ----------------------------------------------------------------------------- formatting


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt(v, spec=".3g", none="-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ours(b) -> bool:
    return b["extra_info"].get("family") == "kvcompress"


def _decode(b) -> bool:
    """Whether a benchmark is a decoding step (benchmarks/test_bench_decode.py)."""
    return b.get("extra_info", {}).get("suite") == "decode"


def _config_key(e: dict) -> tuple:
    return (e["kind"], e["role"], e["direction"], e["D"], e["T"], e["L"], e["S"], e["dtype"], e["device"])


def _autotuned(groups: dict) -> list[str]:
    """The section listing the configurations the autotuner picked in each
    benchmark's correctness gate (``extra_info["autotuned"]``; a key tuned
    by an earlier benchmark of the run is listed there only); none without
    autotuning (the CPU)."""
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        for name, b in sorted(groups[key].items()):
            e = b["extra_info"]
            for kernel, picks in sorted((e.get("autotuned") or {}).items()):
                for pick in picks:
                    rows.append(f"| {e['kind']} | {e['direction']} | {e['T']} | {e['D']} | {e['L']}/{e['S']} | "
                                f"{name} | {kernel} | {pick} |")
    if not rows:
        return []
    return ["## Autotuner picks", "", "The configuration each autotuned kernel took, where it was first tuned "
            "in this run (in that benchmark's correctness gate):", "",
            "| kind | dir | T | D | L/S | entrant | kernel | configuration |", "|---|---|---|---|---|---|---|---|",
            *rows, ""]


def render(data: dict, outcomes: _Outcomes | None = None, compared: dict | None = None) -> str:
    """The markdown report of one pytest-benchmark JSON (``data``).

    outcomes: the run's passed/failed/skipped tests (for the lists at the
    end); compared: an earlier saved JSON to show the change against.
    """
    info = data.get("kvcompress", {})
    ceil = info.get("ceilings") or {}
    ours = [b for b in data.get("benchmarks", []) if "kind" in b.get("extra_info", {}) and not _decode(b)]
    decode = [b for b in data.get("benchmarks", []) if _decode(b)]
    other = [b for b in data.get("benchmarks", []) if "kind" not in b.get("extra_info", {})]
    out = ["# kvcompress benchmarks", ""]
    if info.get("device") == "cuda":
        where = f"{info.get('gpu')} (CUDA {info.get('cuda')}, torch {info.get('torch')})"
    else:
        where = (f"{info.get('cpu')}, {info.get('cpu_count')} cores, torch {info.get('torch')} "
                 f"({info.get('torch_threads')} intra-op threads)")
    out.append(f"Machine: {where}; dtype {info.get('dtype')}; size set `{info.get('sizes')}`; "
               f"{data.get('datetime', '')[:19]}.")
    parts = info.get("parts") or []
    if len(parts) > 1:
        out.append(f"Merged from {len(parts)} runs on this machine (`kvcompress-bench --render`), each with its own "
                   "ceilings; every row's % of roofline uses its run's:")
        for p in parts:
            c = p.get("ceilings") or {}
            roofs = (f"copy {c['bandwidth_gbps']:.4g} GB/s, matmul {c['matmul_tflops']:.4g} TFLOP/s" if c
                     else "no ceilings")
            out.append(f"- {p.get('datetime', '')[:19]}, size set `{p.get('sizes')}`: {roofs}.")
    elif ceil:
        out.append(f"Ceilings measured in this run: copy {ceil['bandwidth_gbps']:.4g} GB/s (bytes read + written, "
                   f"{ceil['copy_bytes'] >> 20} MiB), matmul {ceil['matmul_tflops']:.4g} TFLOP/s "
                   f"({ceil['matmul_dtype']}, n = {ceil['matmul_n']}).")
    if info.get("device") == "cpu":
        out.append("CPU timings are rough: other processes may share these cores, and a server's shared L3 stays "
                   "warm between calls (docs/benchmarks.md).")
    out += ["", "Median time per call over rounds of back-to-back calls, each call on a different argument set "
            "(together at least twice the last-level cache); TFLOP/s and GB/s from the cost model of "
            "docs/benchmarks.md; % of roofline = max(flops / matmul ceiling, bytes / copy ceiling) / time; "
            "peak extra memory = device memory allocated during one call (outputs included). "
            "`vs X` = X's time / this time (> 1: kvcompress is faster). Every entrant passed the correctness "
            "gate on the timed call before it was timed.", ""]
    if compared:
        out += [f"`vs saved` compares with the saved run of {compared.get('datetime', '')[:19]} "
                "(its time / this time).", ""]
    old = {b["fullname"]: b["stats"]["median"] for b in (compared or {}).get("benchmarks", [])}

    groups = defaultdict(dict)                     # config -> entrant -> benchmark
    for b in ours:
        groups[_config_key(b["extra_info"])][b["extra_info"]["entrant"]] = b
    if groups:
        out += _summary(groups)
        out += _against_peers(groups)
    by_kind = defaultdict(list)
    for key in groups:
        by_kind[key[0]].append(key)
    for kind, keys in by_kind.items():
        peers = [p for p in PEER_ORDER if any(p in groups[k] for k in keys)]
        head = ["dir", "T", "D", "L/S", "entrant", "median", "TFLOP/s", "GB/s", "% roofline", "peak MiB"]
        head += [f"vs {p}" for p in peers] + (["vs saved"] if compared else [])
        out += [f"## {kind}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = set()
        for key in keys:
            for name, b in sorted(groups[key].items(), key=lambda kv: (not _ours(kv[1]), kv[0])):
                e, med = b["extra_info"], b["stats"]["median"]
                peak = e.get("peak_extra_bytes")
                row = [e["direction"], str(e["T"]), str(e["D"]), f"{e['L']}/{e['S']}", name, _fmt_time(med),
                       _fmt(e.get("tflops")), _fmt(e.get("gbps")), _fmt(100 * e["roofline_fraction"], ".3g")
                       if e.get("roofline_fraction") is not None else "-",
                       _fmt(None if peak is None else peak / 2 ** 20, ".4g")]
                for p in peers:
                    pb = groups[key].get(p)
                    row.append(f"{pb['stats']['median'] / med:.3g}x" if pb is not None and _ours(b) else "")
                if compared:
                    row.append(f"{old[b['fullname']] / med:.3g}x" if b["fullname"] in old else "")
                out.append("| " + " | ".join(row) + " |")
                if e["role"] == "nonoverlap":
                    notes.add("L/S 32/32 rows: S == L without pe, where fla's non-overlapping mean_pooling computes "
                              "the same thing (its chunks never overlap, so NSA's S < L cannot be compared).")
                if e["role"] == "readability":
                    notes.add(f"T={e['T']} D={e['D']} rows: the readability floor, where the loop reference runs.")
                if e.get("precision_class") not in (None, e.get("check_precision")):
                    notes.add(f"`{name}` at D={e['D']}: held to the peers' RMS check, not to the bound of its class "
                              f"({e['precision_class']}), which is ill-conditioned on the checked windows "
                              "(docs/benchmarks.md, the correctness gate).")
        labels = sorted({(b["extra_info"]["entrant"], b["extra_info"]["label"]) for k in keys
                         for b in groups[k].values()})
        out += ["", "Entrants: " + "; ".join(f"`{n}` = {lab}" for n, lab in labels) + "."]
        out += [f"Note: {n}" for n in sorted(notes)] + [""]
    out += _autotuned(groups)
    if decode:
        out += render_decode(decode, old if compared else None)
    if other:
        out += ["## Other benchmarks", "", "| benchmark | median | rounds |", "|---|---|---|"]
        out += [f"| {b['fullname']} | {_fmt_time(b['stats']['median'])} | {b['stats']['rounds']} |" for b in other]
        out.append("")
    if outcomes is not None:
        if outcomes.failed:
            out += ["## Failed (not timed)", ""] + [f"- `{n}`: {r}" for n, r in outcomes.failed] + [""]
        if outcomes.skipped:
            out += ["## Not measured", ""]
            reasons = defaultdict(list)
            for n, r in outcomes.skipped:
                reasons[r].append(n.split("[")[-1].rstrip("]"))
            for r, names in reasons.items():
                more = f" and {len(names) - 6} more" if len(names) > 6 else ""
                out.append(f"- {r}: " + ", ".join(f"`{n}`" for n in names[:6]) + more)
            out.append("")
    return "\n".join(out)


def _summary(groups) -> list[str]:
    """One line per kind and direction at the largest T of each D: the best
    kvcompress backend against each peer."""
    best = {}
    for key, entrants in groups.items():
        kind, role, direction, D, T = key[:5]
        if role != "nsa":
            continue
        k = (kind, direction, D)
        if k not in best or T > best[k][0]:
            best[k] = (T, entrants)
    if not best:
        return []
    out = ["## Summary (largest T per head dim, NSA setting)", "",
           "| kind | dir | D | T | fastest kvcompress | median | vs seed | vs seed+compile |",
           "|---|---|---|---|---|---|---|---|"]
    for (kind, direction, D), (T, entrants) in best.items():
        mine = [b for b in entrants.values() if _ours(b)]
        if not mine:
            continue
        b = min(mine, key=lambda b: b["stats"]["median"])
        med = b["stats"]["median"]
        ratios = [f"{entrants[p]['stats']['median'] / med:.3g}x" if p in entrants else "-"
                  for p in ("seed", "seed+compile")]
        out.append(f"| {kind} | {direction} | {D} | {T} | {b['extra_info']['entrant']} | {_fmt_time(med)} | "
                   + " | ".join(ratios) + " |")
    return out + [""]


# the speed-up over the fastest peer that issue 14 asks of every kind, direction and size
PEER_TARGET = 1.25


def _against_peers(groups, target: float = PEER_TARGET) -> list[str]:
    """One row per NSA-setting configuration (kind, L/S, D, T, direction)
    with a kvcompress entrant and a peer: the fastest of each, their
    medians and the speed-up (peer / kvcompress), and whether it reaches
    ``target``; then how many rows do."""
    rows = []
    for key, entrants in groups.items():
        kind, role, direction, D, T, L, S = key[:7]
        mine = [b for b in entrants.values() if _ours(b)]
        peers = [b for b in entrants.values() if not _ours(b)]
        if role != "nsa" or not mine or not peers:
            continue
        b = min(mine, key=lambda b: b["stats"]["median"])
        p = min(peers, key=lambda b: b["stats"]["median"])
        rows.append(((kind, L, S, D, -T, direction), b, p))
    if not rows:
        return []
    out = [f"## Against the fastest peer (NSA setting; target {target:g}x)", "",
           "| kind | L/S | D | T | dir | fastest kvcompress | median | fastest peer | median | speed-up | "
           f"{target:g}x |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    met = 0
    for (kind, L, S, D, negT, direction), b, p in sorted(rows, key=lambda r: r[0]):
        ratio = p["stats"]["median"] / b["stats"]["median"]
        met += ratio >= target
        out.append(f"| {kind} | {L}/{S} | {D} | {-negT} | {direction} | {b['extra_info']['entrant']} | "
                   f"{_fmt_time(b['stats']['median'])} | {p['extra_info']['entrant']} | "
                   f"{_fmt_time(p['stats']['median'])} | {ratio:.3g}x | {'yes' if ratio >= target else '**no**'} |")
    return out + ["", f"{met} of {len(rows)} rows reach {target:g}x.", ""]


def _us_per_step(b) -> float:
    """A decoding benchmark's median time per step, in microseconds."""
    return b["stats"]["median"] / b["extra_info"].get("steps", 1) * 1e6


def _fmt_us(us: float) -> str:
    return f"{us:.3g}" if us < 100 else f"{us:.0f}"


def _ratio(peer, b) -> str:
    return f"{_us_per_step(peer) / _us_per_step(b):.3g}x" if peer is not None else "-"


def _decode_notes(e: dict) -> str:
    notes = []
    if e.get("bit_exact"):
        notes.append("bit-exact")
    if e.get("graph_equals_eager"):
        notes.append("replay = eager")
    if e.get("sync_free") is True:
        notes.append("sync-free")
    elif e.get("sync_free") not in (None, True):
        notes.append("synchronises")
    if e.get("backend"):
        notes.append(f"backend {e['backend']}")
    if e.get("steps", 1) > 1:
        notes.append(f"{e['steps']} steps per call")
    return ", ".join(notes)


def render_decode(benchmarks: list, saved: dict | None = None) -> list[str]:
    """The decoding section of the report: lines of markdown.

    benchmarks: the pytest-benchmark entries of benchmarks/test_bench_decode.py
    (``extra_info["suite"] == "decode"``). saved: {fullname: median seconds}
    of a saved run, for a ``vs saved`` column (None: no column). Per kind,
    one row per (P, N, entrant) with us/step and, for each kvcompress
    entrant, ``vs recompress`` and ``vs streaming``: the peer's us/step /
    this us/step; a summary first (the fastest step per kind and N).
    """
    configs = defaultdict(dict)                    # (kind, P, N) -> entrant -> benchmark
    for b in benchmarks:
        e = b["extra_info"]
        configs[(e["kind"], e["prefix"], e["N"])][e["entrant"]] = b
    if not configs:
        return []
    first = benchmarks[0]["extra_info"]
    out = ["## Decoding", "",
           f"One decoding step (`kvcompress.decode.decode_step`): N streams, each holding a prefix of P - 1 tokens "
           f"(handed over with `DecodeCache.add`), receive one token each; that token, P - 1, completes a window of "
           f"every stream. H = {first['H']}, D = {first['D']}, L = {first['L']}, S = {first['S']}, padding "
           f"{first['padding']!r}, {first['dtype']} on {first['device']}. `us/step` = median time per call over "
           "rounds of back-to-back calls, the device synchronised only at the ends of a round, divided by the steps "
           "per call. Eager (`torch`, `triton`, ...): host and device overlap as in a decoding loop; `+graph`: the "
           "step captured once in a CUDA graph, replayed. Peers: `recompress` = the default backend's full pass over "
           "all N prefixes of P tokens (what a step replaces without a cache), `streaming` = "
           "`kvcompress.streaming.step` with the same one token per stream (S steps per call, one of which "
           "completes a window). `vs recompress` = recompress's us/step / this us/step (> 1: the step is faster); "
           "`vs streaming` likewise. Every entrant passed the gate (its tokens of that step against the exact "
           "last windows) before it was timed.", ""]
    if saved is not None:
        out += ["`vs saved` = the saved run's time / this time.", ""]

    out += ["### Decoding summary (fastest step per kind and N)", "",
            "| kind | N | P | fastest step | us/step | vs recompress | vs streaming |", "|---|---|---|---|---|---|---|"]
    for (kind, P, N), entrants in configs.items():
        mine = [b for b in entrants.values() if _ours(b)]
        if not mine:
            continue
        b = min(mine, key=_us_per_step)
        out.append(f"| {kind} | {N} | {P} | {b['extra_info']['entrant']} | {_fmt_us(_us_per_step(b))} | "
                   f"{_ratio(entrants.get('recompress'), b)} | {_ratio(entrants.get('streaming'), b)} |")
    out.append("")

    by_kind = defaultdict(list)
    for key in configs:
        by_kind[key[0]].append(key)
    for kind, keys in by_kind.items():
        head = ["N", "P", "entrant", "us/step", "vs recompress", "vs streaming", "notes"]
        head += ["vs saved"] if saved is not None else []
        out += [f"### Decoding: {kind}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in sorted(keys, key=lambda k: (k[1], k[2])):
            entrants = configs[key]

            def order(item):               # eager steps, replayed steps, then the peers in DECODE_PEERS' order
                name, b = item
                peer = DECODE_PEERS.index(name) if name in DECODE_PEERS else -1
                return (not _ours(b), peer, name.endswith("+graph"), name)

            for name, b in sorted(entrants.items(), key=order):
                e = b["extra_info"]
                mine = _ours(b)
                row = [str(e["N"]), str(e["prefix"]), name, _fmt_us(_us_per_step(b)),
                       _ratio(entrants.get("recompress"), b) if mine else "",
                       _ratio(entrants.get("streaming"), b) if mine else "", _decode_notes(e)]
                if saved is not None:
                    row.append(f"{saved[b['fullname']] / b['stats']['median']:.3g}x" if b["fullname"] in saved
                               else "")
                out.append("| " + " | ".join(row) + " |")
        labels = sorted({(b["extra_info"]["entrant"], b["extra_info"]["label"]) for k in keys
                         for b in configs[k].values()})
        out += ["", "Entrants: " + "; ".join(f"`{n}` = {lab}" for n, lab in labels) + ".", ""]
    return out


def plot(data: dict, path: Path) -> str:
    """The roofline plot (achieved TFLOP/s against arithmetic intensity, one
    panel per direction, the measured ceilings as roofs). Returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no roofline plot (pip install matplotlib)"
    ceil = data.get("kvcompress", {}).get("ceilings")
    # the compression benchmarks (a decoding step has no cost model: it is reported in us/step)
    points = [b["extra_info"] for b in data.get("benchmarks", [])
              if b.get("extra_info", {}).get("median_s") and "flops" in b["extra_info"]]
    if not ceil or not points:
        return "no timed benchmarks: no roofline plot"
    bw, peak = ceil["bandwidth_gbps"] * 1e9, ceil["matmul_tflops"] * 1e12
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    names = sorted({e["entrant"] for e in points}, key=lambda n: (n in PEER_ORDER, n))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    from .kinds import KINDS_BY_NAME
    markers = dict(zip(KINDS_BY_NAME, "osD^vPX*"))
    ai = [e["flops"] / e["bytes"] for e in points]
    lo, hi = min(ai) / 2, max(max(ai) * 2, peak / bw * 4)
    for ax, direction in zip(axes, ("fwd", "fwd+bwd")):
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], "k-", lw=1.5, label="roof (measured)")
        for e in points:
            if e["direction"] != direction:
                continue
            ax.scatter(e["flops"] / e["bytes"], e["tflops"], color=colors[e["entrant"]],
                       marker=markers.get(e["kind"], "o"), s=36, edgecolors="none",
                       alpha=1.0 if e["family"] == "kvcompress" else 0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (flop / byte, minimum traffic)")
        ax.set_title(direction)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("achieved TFLOP/s")
    handles = [plt.Line2D([], [], color=colors[n], marker="o", ls="", label=n) for n in names]
    handles += [plt.Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()]
    axes[1].legend(handles=handles, loc="lower right", fontsize=8)
    info = data.get("kvcompress", {})
    fig.suptitle(f"kvcompress roofline: {info.get('gpu') or info.get('cpu')} ({info.get('dtype')}); "
                 f"copy {ceil['bandwidth_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.3g} TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"roofline plot: {path}"


def _find_saved(storage: str, which: str, base: Path) -> dict | None:
    """The saved run ``which`` (a run number, a name fragment, or "" for the
    latest) in a file:// pytest-benchmark storage (relative to ``base``), or None."""
    root = base / Path(storage.removeprefix("file://"))
    files = sorted(root.glob("*/*.json"))
    if which:
        num = f"{int(which):04d}_" if which.isdigit() else None
        files = [f for f in files if (f.name.startswith(num) if num else which in f.name)]
    return json.loads(files[-1].read_text()) if files else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvcompress-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Options not listed here go to pytest with --pytest-args.")
    ap.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="input dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--kinds", default=None, metavar="LIST", help="comma list of kinds (default: all)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="sizes", const="quick", help="one small shape")
    size.add_argument("--record", action="store_const", dest="sizes", const="record",
                      help="the record of docs/bench/: T 8192, 65536, 131072 and D 128, 192 on CUDA")
    size.add_argument("--full", action="store_const", dest="sizes", const="full", help="more sequence lengths")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="time the seed under torch.compile too (auto: on unless --check-only)")
    ap.add_argument("--compile-budget", type=float, default=None, metavar="S",
                    help="seconds of torch.compile warm-up in total (default: 120 on cuda, none on cpu)")
    ap.add_argument("--deadline", type=float, default=None, metavar="S",
                    help="skip what remains after S seconds (default: 300 on cuda, none on cpu)")
    ap.add_argument("--check-only", action="store_true",
                    help="correctness only, nothing timed (pytest-benchmark's --benchmark-disable)")
    ap.add_argument("--benchmark-save", default=None, metavar="NAME",
                    help="save this run in the storage (pytest-benchmark)")
    ap.add_argument("--benchmark-compare", nargs="?", const="", default=None, metavar="NUM",
                    help="compare with saved run NUM (default: the latest) in the storage (pytest-benchmark)")
    ap.add_argument("--benchmark-storage", default=None, metavar="URI",
                    help="pytest-benchmark storage (default: file://OUT/storage; relative to OUT)")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="the decoding benchmarks (one step of N streams, benchmarks/test_bench_decode.py; "
                         "default: on; only them: -k test_bench_decode)")
    ap.add_argument("--render", nargs="+", default=None, metavar="DIR",
                    help="run nothing: merge the runs in these output directories (their bench.json and "
                         "outcomes.json, one machine) into one bench.md, bench.json and roofline.png in --out")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting benchmarks")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments, one string")
    args = ap.parse_args(argv)
    if args.render:
        return _render_dirs([Path(d) for d in args.render], Path(args.out))

    try:
        import pytest
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise SystemExit("kvcompress-bench needs the test extra (pytest, pytest-benchmark): "
                         "pip install -e '.[test]'") from None
    import torch

    root = _checkout()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    storage = args.benchmark_storage or f"file://{out / 'storage'}"
    json_path = out / "bench.json"
    if json_path.exists():
        json_path.unlink()
    compile_budget = args.compile_budget if args.compile_budget is not None else (120.0 if gpu else 0.0)
    deadline = args.deadline if args.deadline is not None else (300.0 if gpu else 0.0)
    pargs = [str(root / SUITE), "-q", "-p", "no:cacheprovider", "--no-header", "--tb=short", f"--rootdir={root}",
             f"--kvbench-device={device}", f"--kvbench-sizes={args.sizes or 'default'}",
             f"--kvbench-compile={args.compile}", f"--kvbench-compile-budget={compile_budget}",
             f"--kvbench-deadline={deadline}", f"--benchmark-storage={storage}", "--benchmark-sort=name"]
    if args.dtype:
        pargs.append(f"--kvbench-dtype={args.dtype}")
    if args.kinds:
        pargs.append(f"--kvbench-kinds={args.kinds}")
    if args.check_only:
        pargs.append("--benchmark-disable")
    else:
        pargs.append(f"--benchmark-json={json_path}")
    if args.benchmark_save:
        pargs.append(f"--benchmark-save={args.benchmark_save}")
    if args.benchmark_compare is not None:
        pargs.append("--benchmark-compare" + (f"={args.benchmark_compare}" if args.benchmark_compare else ""))
    if not args.decode:
        pargs.append(f"--ignore={root / SUITE / DECODE_MODULE}")
    if args.keyword:
        pargs += ["-k", args.keyword]
    pargs += args.pytest_args.split()
    # the saved run to compare with, read before this run adds itself to the storage
    compared = _find_saved(storage, args.benchmark_compare, out) if args.benchmark_compare is not None \
        and storage.startswith("file://") else None

    outcomes = _Outcomes()
    sys.path.insert(0, str(root))
    # pytest-benchmark names its storage relative to the working directory (and
    # fails when the storage lies outside it): run from the output directory
    cwd = os.getcwd()
    os.chdir(out)
    try:
        code = pytest.main(pargs, plugins=[outcomes])
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - outcomes.t0
    if code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.NO_TESTS_COLLECTED):
        sys.stderr.write(f"kvcompress-bench: pytest stopped with {code!r}\n")
        return int(code)
    summary = (f"{len(outcomes.passed)} passed, {len(outcomes.failed)} failed, {len(outcomes.skipped)} not measured "
               f"in {seconds:.0f} s")
    if args.check_only:
        text = f"# kvcompress benchmarks: correctness only (nothing timed)\n\n{summary}\n"
        text += "".join(f"- FAILED `{n}`: {r}\n" for n, r in outcomes.failed)
    else:
        data = json.loads(json_path.read_text()) if json_path.exists() else {"benchmarks": []}
        text = render(data, outcomes, compared) + f"\n{summary}.\n"
        print(plot(data, out / "roofline.png"))
    (out / "bench.md").write_text(text)
    (out / "outcomes.json").write_text(json.dumps(outcomes.to_json(seconds), indent=1))
    print(text)
    print(f"kvcompress-bench: wrote {out / 'bench.md'}" + ("" if args.check_only else f", {json_path}"))
    return 0 if code == pytest.ExitCode.OK else 1


def _render_dirs(dirs: list[Path], out: Path) -> int:
    """``--render``: one report from the runs in ``dirs`` (``merge_runs``)."""
    runs, outs = [], []
    for d in dirs:
        if not (d / "bench.json").is_file():
            raise SystemExit(f"kvcompress-bench --render: {d / 'bench.json'} does not exist")
        runs.append(json.loads((d / "bench.json").read_text()))
        if (d / "outcomes.json").is_file():
            outs.append(json.loads((d / "outcomes.json").read_text()))
    try:
        data = merge_runs(runs)
    except ValueError as e:
        raise SystemExit(f"kvcompress-bench --render: {e}") from None
    outcomes = _Outcomes.from_json(outs) if outs else None
    text = render(data, outcomes)
    if outs:
        text += (f"\n{len(outcomes.passed)} passed, {len(outcomes.failed)} failed, {len(outcomes.skipped)} not "
                 f"measured in {sum(o['seconds'] for o in outs):.0f} s over {len(outs)} runs.\n")
    if len(outs) < len(runs):
        text += f"\n({len(runs) - len(outs)} of the runs had no outcomes.json: their failures are not listed.)\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data))
    (out / "bench.md").write_text(text)
    print(plot(data, out / "roofline.png"))
    print(text)
    print(f"kvcompress-bench: wrote {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
