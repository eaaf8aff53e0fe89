"""The benchmark suite (docs/benchmarks.md): every kind x registered backend
x representative configuration, beside the peers a user would pick instead,
correctness checked before anything is timed. ``kvcompress-bench`` runs it."""
