"""Where the Triton backend runs and what the device offers.

- ``INTERPRET``, ``DEVICES``, ``DTYPES``, ``triton_available()``: under
  ``TRITON_INTERPRET=1`` (how CI runs kernels on CPU tensors) the backend
  also accepts CPU tensors; ``auto_devices=("cuda",)`` in each registration
  keeps backend="auto" from ever picking the interpreter.
- ``supports_call``: the registry predicate (B*H fits a grid axis).
- ``num_sms(device, cpu=)``: streaming multiprocessors, the unit grids are
  sized in.
- ``dot_f32(dtype)``, ``tf32_intermediate(dtype)``: the numerics that depend
  on the platform and the dtype.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEVICES", "DTYPES", "INTERPRET", "MAX_GRID_YZ", "dot_f32", "num_sms", "supports_call",
           "tf32_intermediate", "triton_available"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# computed once: dynamo traces a function returning a constant without a graph break
_AVAILABLE = INTERPRET or torch.cuda.is_available()


def triton_available() -> bool:
    """Whether Triton kernels can run here: a CUDA device, or the interpreter."""
    return _AVAILABLE


MAX_GRID_YZ = 65535   # CUDA's limit on grid axes 1 and 2; the kernels put B*H on axis 2


def supports_call(x: torch.Tensor, *args, **kwargs) -> bool:
    """The registry's per-call predicate: the kernels handle B*H <= 65535
    (backend="auto" falls back to torch beyond; backend="triton" raises)."""
    return x.shape[0] * x.shape[1] <= MAX_GRID_YZ


_SMS: dict = {}


def num_sms(device: torch.device, *, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA ``device``, cached per device (the
    property query costs host time on every call).

    cpu: the count to answer on the CPU (the interpreter), chosen by the
    caller: there it only shapes how a test-sized problem splits its work
    (2 makes the pooling backward's programs loop over several tiles; mlp's
    forward F splits were tuned with 4), and results depend on it bit for bit.
    """
    if device.type != "cuda":
        return cpu
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to float32.

    Triton 3.9's interpreter returns garbage for bfloat16 ``tl.dot`` (errors
    ~1e10; tests/test_triton.py::test_interpreter_bf16_dot_defect watches
    it). A bfloat16 product is exact in float32, so upcasting computes the
    same value the GPU's native bfloat16 dot (float32 accumulation) does.
    """
    return INTERPRET and dtype == torch.bfloat16


def tf32_intermediate(dtype: torch.dtype) -> bool:
    """Whether a kernel keeps an intermediate that feeds a second tensor-core
    dot (the MLP hidden layer, attention_pool's logit gradient) in float32
    rounded to tf32 (``lang.round_tf32``) rather than in the input dtype.

    True for float16: its unit roundoff is tf32's (2**-11), but its range is
    not: an intermediate of size 2**-14 or less would be rounded into
    float16's subnormals, an absolute error of up to 2**-25 that the tolerance
    model (relative to the intermediate's magnitude) does not allow. tf32 has
    float32's exponent range, and a tf32 x float16 product is exact in
    float32, so the dot runs on tensor cores (input_precision="tf32") at the
    error the model grants the input dtype. bfloat16 shares float32's
    exponent range: its intermediates are stored as bfloat16.
    """
    return dtype == torch.float16
