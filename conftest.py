"""This repository's pytest configuration.

The property suite's options (``--impl``, ``--domain``, ``--kvcompress-profile``,
``--emulated``, ``--xfails-file``, ...), its Hypothesis profiles and its
parametrization come from the kvcompress pytest plugin
(kvcompress/testing/plugin.py), loaded through its ``pytest11`` entry point
exactly as in any project that installs ``kvcompress[test]``. This file only
gives this repository's own tests (tests/, benchmarks/) the same Hypothesis
profile as the properties, and their environment.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvcompress.testing._env import configure

configure()   # before anything imports triton
# The suite runs thousands of tiny ops, where OpenMP start-up and spinning
# threads cost more than they save (and oversubscribe a shared machine);
# benchmarks/conftest.py gives the benchmarks their threads back.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)   # after the plugin has read --kvcompress-profile
def pytest_configure(config):
    from hypothesis import settings

    from kvcompress.testing.plugin import profile_settings

    settings.register_profile("kvcompress-repo", profile_settings())
    settings.load_profile("kvcompress-repo")
