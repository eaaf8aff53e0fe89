"""The verification harness: cases, strategies, the tolerance model, one
record per kind, and the implementations under test. Contributors reuse
these modules (``from tests.harness import strategies``)."""
