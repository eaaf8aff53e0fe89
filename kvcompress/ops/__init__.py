"""Built-in backends, one folder per kind; importing registers them."""

from .attention_pool import torch_impl as _ap_torch  # noqa: F401
from .linear import torch_impl as _linear_torch  # noqa: F401
from .mean_pool import torch_impl as _mean_torch  # noqa: F401
from .mlp import torch_impl as _mlp_torch  # noqa: F401
from .weighted_pool import torch_impl as _weighted_torch  # noqa: F401

try:  # the Triton backends need triton (the "triton" extra); without it only the torch paths register
    import triton as _triton  # noqa: F401
except ImportError:
    _triton = None
if _triton is not None:
    from .attention_pool import triton_impl as _ap_triton  # noqa: F401
    from .linear import triton_impl as _linear_triton  # noqa: F401
    from .mean_pool import triton_impl as _mean_triton  # noqa: F401
    from .mlp import triton_impl as _mlp_triton  # noqa: F401
    from .weighted_pool import triton_impl as _weighted_triton  # noqa: F401
