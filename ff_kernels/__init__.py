"""ff_kernels: fused Forward-Forward layer steps for PyTorch (the design: docs/DESIGN.md)."""

from . import backends as _backends  # registers the reference backend
from ._version import __version__
from .backends import (FFStepOutput, SGDUpdate, available_backends, backend_status,
                       register_backend)
from .config import FFConfig
from .nn import FFLinear, FFNet, FFReadout
from .ops import ff_layer_forward, ff_layer_step, sgd_update_

__all__ = [
    "FFConfig", "FFStepOutput", "SGDUpdate", "FFLinear", "FFNet", "FFReadout", "ff_layer_step", "ff_layer_forward", "sgd_update_",
    "available_backends", "backend_status", "register_backend", "__version__",
]
