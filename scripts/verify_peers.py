"""Verify the public peer kernels through their adapters and write a Markdown report.

For every adapter in kvcompress.testing.adapters (XunhaoLai's Triton NSA
kernels, fla-core's mean_pooling, the seed's compress networks) this runs
the shipped property suite (``pytest --pyargs kvcompress.testing.properties
--impl KIND=adapter``) on the given device and dtypes, one pytest session
per adapter, several at a time, each bounded by ``--session-timeout``, and
writes to ``--out``:

- ``peers.md``: per kernel and dtype, its declared domain
  (``Domain.describe()``), examples run, worst error / tolerance (forward
  and gradients), pass/fail; each failure with its shrunk case; kernels
  that could not run, and why (a missing package, an incompatible Triton);
- per adapter: ``<name>.log`` (pytest's output), ``<name>.xml`` (JUnit),
  ``<name>.json`` (the suite's per-property measurements).

Before its session, each adapter is called once on a tiny input inside its
domain; one that raises there is reported as not runnable (with the error)
and its session is skipped.

On a CUDA machine with the peers importable (docs/verifying.md)::

    PYTHONPATH=.peers/nsa-triton python scripts/verify_peers.py --out /tmp/peers

takes about 5 minutes on an H200 (ci profile, float32,float16,bfloat16).
Exit status: 0 when every session that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _plugin_args() -> list[str]:
    """``-p kvcompress.testing.plugin`` unless an installed kvcompress
    registers it through its pytest11 entry point (a source checkout on
    PYTHONPATH does not)."""
    for ep in importlib.metadata.entry_points(group="pytest11"):
        if ep.value == "kvcompress.testing.plugin":
            return []
    return ["-p", "kvcompress.testing.plugin"]


def _import_path() -> list[str]:
    """Folders to put first on the sessions' PYTHONPATH: this checkout, and
    where kvcompress is not installed (a checkout on PYTHONPATH, as on the
    lent GPU), a folder in which ``kvcompress_reference`` links to
    reference/ (setup.py ships that folder under this name)."""
    paths = [str(ROOT)]
    if importlib.util.find_spec("kvcompress_reference") is None and (ROOT / "reference").is_dir():
        shim = Path(tempfile.mkdtemp(prefix="kvcompress-ref-"))
        (shim / "kvcompress_reference").symlink_to(ROOT / "reference", target_is_directory=True)
        paths.append(str(shim))
        sys.path.insert(0, str(shim))
    return paths


def _timeout_args(seconds: int) -> list[str]:
    """pytest-timeout's --session-timeout (the session ends by itself, with
    its JUnit file and report) where it is installed."""
    return [f"--session-timeout={seconds}"] if importlib.util.find_spec("pytest_timeout") else []


def _adapters(selected):
    from kvcompress.testing.adapters import ADAPTERS

    out = []
    for peer, entries in ADAPTERS.items():
        if selected and peer not in selected:
            continue
        for kind, target in entries:
            out.append((peer, kind, target, target.split(":")[1]))
    return out


def _resolve(target):
    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


def preflight(kind: str, target: str, device: str, dtypes: list[str]) -> str | None:
    """Call the adapter once on a tiny input inside its domain: None if it
    runs, else the error (one line)."""
    from kvcompress.testing import domain_of
    from kvcompress.testing.cases import Case, make_inputs
    from kvcompress.testing.records import RECORDS

    try:
        fn = _resolve(target)
        d = domain_of(fn)
        dtype = next((t for t in dtypes if t in d.dtypes), None)
        if dtype is None:
            return f"none of the dtypes {dtypes} is in its domain ({'/'.join(d.dtypes)})"
        L = d.block_sizes[0] if d.block_sizes else 4
        S = L if d.strides != "any" else max(1, L // 2)
        H, D = 2, 8 * d.head_dim_multiple
        G = {"shared": 1}.get(d.groups, H)
        case = Case(kind=kind, dtype=dtype, B=1, H=H, G=G, T=3 * L, D=D, block_size=L, stride=S,
                    padding=d.paddings[0], D_out=D, F=4, activation=d.activations[0])
        inputs = make_inputs(case, RECORDS[kind], device)
        y = RECORDS[kind].call(fn, case, inputs)
        if tuple(y.shape) != (case.B, case.H, case.W, D):
            return f"output shape {tuple(y.shape)}, expected {(case.B, case.H, case.W, D)}"
        return None
    except Exception as e:   # noqa: BLE001 -- reported, not raised: the kernel is listed as not runnable
        msg = f"{type(e).__name__}: {e}".splitlines()
        return " ".join(line.strip() for line in msg[:3])[:400]


def run_session(name, kind, target, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "kvcompress.testing.properties", *_plugin_args(),
           "-q", "-p", "no:cacheprovider", "--tb=short", "-W", "ignore",
           "--impl", f"{kind}={target}", "--impl-device", args.device, "--impl-dtypes", args.dtypes,
           "--kvcompress-profile", args.profile, "--kvcompress-report", str(out / f"{name}.json"),
           f"--junitxml={out / (name + '.xml')}", *_timeout_args(args.session_timeout)]
    if args.xfails_file:
        cmd += ["--xfails-file", args.xfails_file]
    if args.k:
        cmd += ["-k", args.k]
    path = [*args.import_path, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.pop("KVCOMPRESS_REPORT", None)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.session_timeout + 120).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"rc": rc, "seconds": time.perf_counter() - t0, "command": " ".join(cmd)}


def parse_junit(path: Path) -> list[dict]:
    """[{name, outcome, text}] from a JUnit file (outcome passed, failed,
    skipped, xfailed)."""
    if not path.exists():
        return []
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome, text = "failed", child.text or child.get("message") or ""
            elif child.tag == "skipped":
                outcome = "xfailed" if (child.get("type") or "").endswith("xfail") else "skipped"
                text = child.get("message") or ""
        cases.append({"name": tc.get("name"), "outcome": outcome, "text": text})
    return cases


def shrunk_case(text: str, limit: int = 40) -> str:
    """The part of a failure that reproduces it: the suite's message (the
    error, the shrunk Case, the rerun line), the other shrunk draws and
    Hypothesis's @reproduce_failure line."""
    lines = [line.strip().removeprefix("E").strip() for line in text.splitlines()]
    out = []
    start = next((i for i, line in enumerate(lines)
                  if re.match(r"[\w.]*(Error|Exception|FailedHealthCheck)\b", line)), None)
    if start is not None:
        for line in lines[start:start + limit]:
            if line:
                out.append(line)
            if line.startswith(("rerun:", "assert ")):
                break
    out += [line for line in lines if re.match(r"Draw \d+ \((?!case\))", line)]
    out += [line for line in lines if "reproduce_failure(" in line][:1]
    out = list(dict.fromkeys(out)) or [line for line in lines if line][-limit:]
    return "\n".join(out[:limit])


def _dtype_of(test_name: str, dtypes: list[str]) -> str:
    inside = test_name[test_name.find("[") + 1:test_name.rfind("]")]
    return next((d for d in dtypes if inside.endswith("-" + d) or f"-{d}-" in inside), "*")


def rows_for(name, kind, target, junit, stats, dtypes):
    impl_id = f"{kind}-{target}"
    rows = []
    for dt in dtypes:
        tests = [c for c in junit if _dtype_of(c["name"], dtypes) in (dt, "*")]
        if not tests:
            continue
        conf = stats.get(f"matches_reference|{impl_id}|{dt}", {})
        real = stats.get(f"matches_reference_in_realistic_regime|{impl_id}|{dt}", {})
        grad = stats.get(f"gradients|{impl_id}|{dt}", {})
        failed = [c["name"].split("[")[0] for c in tests if c["outcome"] == "failed"]
        rows.append({"dtype": dt, "examples": conf.get("examples", 0) + real.get("examples", 0),
                     "worst": max(conf.get("worst_ratio", float("nan")), real.get("worst_ratio", float("nan"))),
                     "grad": grad.get("worst_ratio") if grad else None, "failed": failed,
                     "ran": sum(c["outcome"] != "skipped" for c in tests),
                     "xfailed": sum(c["outcome"] == "xfailed" for c in tests)})
    return rows


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for mod in ("torch", "triton", "fla", "native_sparse_attention_pytorch"):
        try:
            m = importlib.import_module(mod)
            v = getattr(m, "__version__", None)
            if v is None:
                v = importlib.metadata.version({"fla": "fla-core",
                                                "native_sparse_attention_pytorch": "native-sparse-attention-pytorch"}
                                               .get(mod, mod))
            parts.append(f"{mod} {v}")
        except Exception:   # noqa: BLE001
            parts.append(f"{mod} (not importable)")
    try:
        import torch

        if torch.cuda.is_available():
            parts.insert(0, f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    except Exception:   # noqa: BLE001
        pass
    return ", ".join(parts)


def _fmt(v):
    return "-" if v is None or v != v else f"{v:.3f}"


def write_report(out: Path, args, results) -> bool:
    from kvcompress.testing import domain_of

    ok = True
    md = ["# Peer kernels through kvcompress's property suite",
          "",
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {_versions()}.",
          f"Device `{args.device}`, dtypes `{args.dtypes}`, Hypothesis profile `{args.profile}`"
          + (f", `-k {args.k}`" if args.k else "") + ". Generated by `scripts/verify_peers.py`.",
          "",
          "Error columns: the worst |error| over the tolerance bound of kvcompress/testing/tolerance.py "
          "(forward: the conformance and realistic-regime properties; gradients: every gradient); "
          "pass means every property run for that dtype passed.",
          "",
          "| kernel (adapter) | kind | declared domain | dtype | examples | err/tol | grad err/tol | result |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    failures, not_run = [], []
    for r in results:
        try:
            dom = domain_of(_resolve(r["target"])).describe()
        except Exception as e:   # noqa: BLE001
            dom = f"(unavailable: {type(e).__name__})"
        label = f"`{r['peer']}:{r['target'].split(':')[1]}`"
        if r.get("preflight"):
            ok = False
            not_run.append((label, r["preflight"]))
            md.append(f"| {label} | {r['kind']} | {dom} | - | 0 | - | - | not runnable |")
            continue
        junit = parse_junit(out / f"{r['name']}.xml")
        stats = json.loads((out / f"{r['name']}.json").read_text()) if (out / f"{r['name']}.json").exists() else {}
        rows = rows_for(r["name"], r["kind"], r["target"], junit, stats, args.dtypes.split(","))
        log = (out / f"{r['name']}.log").read_text(errors="replace") if (out / f"{r['name']}.log").exists() else ""
        if r["session"]["rc"] not in (0, 1) or not rows:
            ok = False
            not_run.append((label, f"pytest session ended with {r['session']['rc']} after "
                                   f"{r['session']['seconds']:.0f} s; see {r['name']}.log"))
        elif "session-timeout" in log:
            ok = False
            not_run.append((label, f"stopped at the session timeout ({args.session_timeout} s): the properties "
                                   f"after the {len(junit)} that ran did not run; see {r['name']}.log"))
        for row in rows:
            res = "pass" if not row["failed"] else "FAIL: " + ", ".join(sorted(set(row["failed"])))
            if row["xfailed"]:
                res += f" ({row['xfailed']} known failures)"
            ok = ok and not row["failed"]
            md.append(f"| {label} | {r['kind']} | {dom} | {row['dtype']} | {row['examples']} | {_fmt(row['worst'])} "
                      f"| {_fmt(row['grad'])} | {res} |")
        failures += [(label, c) for c in junit if c["outcome"] == "failed"]
    if not_run:
        md += ["", "## Not run", ""]
        md += [f"- {label}: {why}" for label, why in not_run]
    if failures:
        md += ["", "## Failures, with their shrunk cases", ""]
        for label, c in failures:
            md += [f"### {label} `{c['name']}`", "", "```", shrunk_case(c["text"]), "```", ""]
    md += ["", "## Sessions", ""]
    md += [f"- `{r['name']}`: exit {r['session']['rc']}, {r['session']['seconds']:.0f} s"
           for r in results if r.get("session")]
    (out / "peers.md").write_text("\n".join(md) + "\n")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for peers.md and the per-adapter logs")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--profile", default="ci", help="kvcompress profile (dev, ci, thorough)")
    ap.add_argument("--peers", default="", help="comma list of nsa_triton, fla, seed (default: all)")
    ap.add_argument("-k", default=None, help="pytest -k selection of properties")
    ap.add_argument("--jobs", type=int, default=8, help="pytest sessions at a time (Triton compiles on the CPU)")
    ap.add_argument("--session-timeout", type=int, default=300, help="seconds per adapter's session")
    ap.add_argument("--xfails-file", default=None, help="known failures (pytest --xfails-file)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    args.import_path = _import_path()
    selected = [p for p in args.peers.split(",") if p]
    dtypes = args.dtypes.split(",")
    results = []
    for peer, kind, target, attr in _adapters(selected):
        name = f"{peer}-{attr}"
        why = preflight(kind, target, args.device, dtypes)
        print(f"{name}: " + ("runs" if why is None else f"not runnable: {why}"), flush=True)
        results.append({"name": name, "peer": peer, "kind": kind, "target": target, "preflight": why})
    todo = [r for r in results if not r["preflight"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_session, r["name"], r["kind"], r["target"], args, out): r for r in todo}
        for f in concurrent.futures.as_completed(futures):
            r = futures[f]
            r["session"] = f.result()
            print(f"{r['name']}: pytest exit {r['session']['rc']} in {r['session']['seconds']:.0f} s", flush=True)
    ok = write_report(out, args, results)
    print(f"report: {out / 'peers.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
