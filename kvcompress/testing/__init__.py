"""kvcompress's property suite, shipped for anyone's kernel (docs/verifying.md).

- ``pytest --pyargs kvcompress.testing.properties --impl KIND=module:callable``
  (the pytest plugin ``kvcompress.testing.plugin`` is loaded through its
  ``pytest11`` entry point) and ``kvcompress-verify --impl ...`` run every
  conformance property on a callable with the reference's signature.
- ``Domain`` and ``declare_domain``: what an implementation supports; the
  strategies draw only inside it.
- ``assert_matches_reference``: one check against the loop reference within
  the tolerance model, in the spirit of ``torch.testing.assert_close``.
- The harness modules (``cases``, ``strategies``, ``tolerance``,
  ``gradients``, ``records``, ``windows``) for writing more properties.

Names load on first use, so importing the plugin imports neither torch nor
Hypothesis.
"""

from __future__ import annotations

import importlib

from .domain import Domain, declare_domain, domain_of

__all__ = ["Domain", "assert_matches_reference", "declare_domain", "domain_of"]


def __getattr__(name: str):
    if name == "assert_matches_reference":
        return importlib.import_module(f"{__name__}.assertions").assert_matches_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
