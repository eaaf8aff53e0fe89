"""What every Triton kernel of kvcompress shares, one module per job
(docs/triton.md explains the design). Importing this package imports none
of them; each module imports only what its job needs.

- ``env``: where the backend runs (``INTERPRET``, ``DEVICES``, ``DTYPES``,
  ``triton_available``, ``supports_call``), what the device offers
  (``num_sms``) and the numerics that follow from it (``dot_f32``,
  ``tf32_intermediate``).
- ``alloc``: ``empty``/``empty_like``, every kernel output's allocation,
  NaN-filled under ``KVCOMPRESS_POISON=1``.
- ``plan``: ``SeqPlan``/``seq_plan``, the windowing of one call as kernel
  arguments; ``total_windows_arg``, ``windows_or_dynamic``.
- ``launch``: ``jit_kernel``, ``Launcher`` (autotuning), keyword launches
  (``kernel_args``, ``strides``), interpreter tiles (``small_tiles``) and
  the size arithmetic of grids (``cdiv``, ``next_pow2``, ``fill_factor``).
- ``lang``: ``@triton.jit`` helpers the kernels call (``chunk_rows``,
  ``window_rows``, ``window_gemm``, ``search_sorted``, ``round_tf32``).
- ``gemv``: ``head_gemv``, the per-head constants that fold ``pe``
  through the linear parts.

The ``torch.library`` wiring of every kind (custom op, fake, autograd,
eager path) is ``kvcompress/ops/_custom_op.py``.
"""
