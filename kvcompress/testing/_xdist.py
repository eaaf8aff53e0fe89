"""pytest-xdist support of the kvcompress plugin.

``python -m pytest -n N ...`` runs the property suite over N worker
processes and gives the same results as one process:

- Measurements and coverage. Each worker hands its report stats
  (kvcompress/testing/report.py) and its coverage records
  (kvcompress/testing/coverage.py) to the controller at the end of its
  session (``config.workeroutput``); the controller merges them as each
  worker goes down (``pytest_testnodedown``). The report JSON
  (``--kvcompress-report``), the coverage table and the ci profile's check
  that every promised feature was drawn are the controller's, over the whole
  run. A worker writes no report and never fails on its own partial coverage
  (one worker may draw only left padding, another only valid). A worker that
  crashes takes its measurements with it: its tests are reported as crashed.
- One GPU per worker. When the controller sees CUDA GPUs, worker gwN gets
  ``CUDA_VISIBLE_DEVICES`` = the N-th of them modulo their count: gw0 the
  first, gw1 the second, ..., gw(count) the first again. "Visible" means the
  entries of the controller's ``CUDA_VISIBLE_DEVICES`` when it is set (up to
  the first negative one, as CUDA reads it), else ``0 .. device_count - 1``.
  The variable is set in the worker's environment before the worker imports
  anything (execnet's ``env:`` spec key), so it holds even where a conftest
  initialises CUDA at import. A ``--tx`` spec that sets
  ``env:CUDA_VISIBLE_DEVICES`` itself is left alone, as are remote specs.
  ``-n`` a multiple of the GPU count spreads the workers evenly; Triton's
  compilation of each drawn shape is CPU work, so several workers a GPU keep
  it busy.

Per-test time limits come from pytest-timeout (``--timeout SECONDS``; its
signal method fails only the test that ran over) and a whole-session limit
from its ``--session-timeout`` (no test starts after it; the run ends as
interrupted, with its summary, junitxml and report). Machine-readable
results: ``--junitxml PATH`` and ``--kvcompress-report PATH``.

A property too slow for one process's time limit runs as K independent
parts with ``--dist each``: every worker runs every selected test, each
drawing its own random examples, and the merged report sums them::

    KVCOMPRESS_PART_EXAMPLES=200 python -m pytest -n 5 --dist each \\
        kvcompress/testing/properties/test_gradients.py -k "mlp and triton" \\
        --kvcompress-profile thorough-part --kvcompress-report parts.json

(1000 examples in all, 5 parts of 200; a failure prints its own
``@reproduce_failure`` blob).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pytest

_KEY = "kvcompress"   # our entry in config.workeroutput


def install(config) -> None:
    """Register the xdist hooks of the kvcompress plugin on ``config``: the
    worker's side in a worker, the controller's side in a session that
    distributes tests (``-n``, ``--dist``, ``--tx``); nothing otherwise."""
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(_Worker(), "kvcompress-xdist-worker")
    elif config.getoption("dist", "no") != "no":
        config.pluginmanager.register(_Controller(config), "kvcompress-xdist-controller")


# -- one GPU per worker ----------------------------------------------------------

def visible_devices(environ: Mapping[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The CUDA devices a worker may be given, as ``CUDA_VISIBLE_DEVICES``
    entries: those of ``environ["CUDA_VISIBLE_DEVICES"]`` when set (up to the
    first negative entry: CUDA ignores the rest), else ``0 ..
    device_count - 1`` (``device_count``: default torch.cuda.device_count(),
    0 without torch). ``environ`` defaults to os.environ."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        out = []
        for entry in (e.strip() for e in environ["CUDA_VISIBLE_DEVICES"].split(",")):
            if not entry or entry.startswith("-"):
                break
            out.append(entry)
        return out
    if device_count is None:
        try:
            import torch
        except ImportError:
            return []
        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def gpu_for_worker(worker_id: str, devices: Sequence[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` of worker ``worker_id`` ("gwN"): the N-th
    of ``devices`` modulo their count; None without devices.

    Raises ValueError for an id that is not "gw" and a number."""
    if not worker_id.startswith("gw") or not worker_id[2:].isdigit():
        raise ValueError(f"not a pytest-xdist worker id: {worker_id!r}")
    if not devices:
        return None
    return devices[int(worker_id[2:]) % len(devices)]


def assign_gpus(specs, devices: Sequence[str]) -> None:
    """Set ``env:CUDA_VISIBLE_DEVICES`` on the local (popen) execnet specs
    of the workers, by ``gpu_for_worker``, where the spec does not set it."""
    for spec in specs:
        if not spec.popen or "CUDA_VISIBLE_DEVICES" in spec.env or spec.id is None:
            continue
        gpu = gpu_for_worker(spec.id, devices)
        if gpu is not None:
            spec.env["CUDA_VISIBLE_DEVICES"] = gpu


# -- the two sides ---------------------------------------------------------------

class _Worker:
    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session):
        """Hand the report stats and coverage to the controller, before the
        plugin's own pytest_sessionfinish would write the report or fail the
        session on this worker's partial coverage."""
        from . import coverage, report

        config = session.config
        config.workeroutput[_KEY] = {"active": getattr(config, "_kvcompress_impls", None) is not None,
                                     "report": report.stats(), "coverage": coverage.export()}
        coverage.clear()   # the controller's now: nothing missing here
        path = os.environ.pop("KVCOMPRESS_REPORT", None)   # the controller writes it
        try:
            return (yield)
        finally:
            if path is not None:
                os.environ["KVCOMPRESS_REPORT"] = path


class _Controller:
    def __init__(self, config):
        self.config = config

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, config, specs):
        assign_gpus(specs, visible_devices())

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        # pop: xdist may report a node down twice (finished, then interrupted)
        out = getattr(node, "workeroutput", None) or {}
        payload = out.pop(_KEY, None)
        if payload is None:
            return
        from . import coverage, report

        report.merge(payload["report"])
        coverage.merge(payload["coverage"])
        if payload["active"] and getattr(self.config, "_kvcompress_impls", None) is None:
            # the controller collects nothing, so the plugin's summary and
            # session end would take this session for one without properties
            from .plugin import _impls

            _impls(self.config)
