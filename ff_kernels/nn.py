"""Modules on top of the ops: one FF layer (FFLinear) and a stack trained layer by layer (FFNet)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .config import FFConfig
from .data import embed_labels
from .ops import ff_layer_forward, ff_layer_step


class FFLinear(nn.Module):
    """One Forward-Forward layer: y, g = relu(x W^T + b) normalised, and its goodness."""

    def __init__(self, in_features: int, out_features: int, config: Optional[FFConfig] = None,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config if config is not None else FFConfig()
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.momentum_buffers = None  # created by the first fused SGD step with momentum
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so FF and backprop baselines start alike.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def train_step(self, x_pos, x_neg, lr: Optional[float] = None, momentum: float = 0.0,
                   weight_decay: float = 0.0, optimizer: Optional[torch.optim.Optimizer] = None):
        """One local step. With ``lr``: fused SGD in place. With ``optimizer`` (over this layer's
        parameters): gradients land in ``.grad`` and the optimizer steps. With neither: gradients
        are returned only. Returns the op's FFStepOutput."""
        if optimizer is not None and lr is not None:
            raise ValueError("give either lr (fused SGD) or optimizer, not both")
        bias = self.bias.data if self.bias is not None else None
        if lr is None:
            out = ff_layer_step(x_pos, x_neg, self.weight.data, bias, self.config, backend=self.backend)
            if optimizer is not None:
                self.weight.grad = out.grad_weight
                if self.bias is not None:
                    self.bias.grad = out.grad_bias
                optimizer.step()
            return out
        out = ff_layer_step(x_pos, x_neg, self.weight.data, bias, self.config, lr=lr, momentum=momentum,
                            weight_decay=weight_decay,
                            momentum_buffers=self.momentum_buffers if momentum else None,
                            backend=self.backend)
        if momentum:
            self.momentum_buffers = out.momentum_buffers
        return out

    def forward(self, x):
        """(normalised output y, goodness g)."""
        bias = self.bias.data if self.bias is not None else None
        return ff_layer_forward(x, self.weight.data, bias, self.config, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, config={self.config}"


OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]


class FFNet(nn.Module):
    """A stack of FF layers; each trains on the previous layer's normalised, detached output.

    optimizer: "sgd" (the fused in-place update: lr, momentum, weight_decay), "adam"
    (torch.optim.Adam per layer through the gradient mode), or a callable
    ``params -> torch.optim.Optimizer`` called once per layer.
    """

    def __init__(self, sizes: Sequence[int], config: Union[FFConfig, Sequence[FFConfig], None] = None,
                 optimizer: OptimizerSpec = "sgd", lr: float = 0.03, momentum: float = 0.0,
                 weight_decay: float = 0.0, bias: bool = True, backend: str = "auto",
                 skip_first_goodness: bool = False, device=None, dtype=None):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes must list the input width and at least one layer, got {list(sizes)}")
        configs = list(config) if isinstance(config, (list, tuple)) else [config] * (len(sizes) - 1)
        if len(configs) != len(sizes) - 1:
            raise ValueError(f"config lists {len(configs)} layers but sizes defines {len(sizes) - 1}")
        self.layers = nn.ModuleList(
            FFLinear(k, n, c, bias=bias, backend=backend, device=device, dtype=dtype)
            for k, n, c in zip(sizes[:-1], sizes[1:], configs))
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.skip_first_goodness = skip_first_goodness
        self.optimizers = None
        if optimizer == "adam":
            self.optimizers = [torch.optim.Adam(l.parameters(), lr=lr, weight_decay=weight_decay)
                               for l in self.layers]
        elif callable(optimizer):
            self.optimizers = [optimizer(l.parameters()) for l in self.layers]
        elif optimizer != "sgd":
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable, got {optimizer!r}")

    @classmethod
    def pytorch_recipe(cls, sizes: Sequence[int], **kwargs) -> "FFNet":
        """The popular PyTorch recipe: mean goodness, theta 2, l2 norm, Adam lr 0.03."""
        kwargs = {"config": FFConfig.pytorch_recipe(), "optimizer": "adam", "lr": 0.03, **kwargs}
        return cls(sizes, **kwargs)

    @classmethod
    def hinton(cls, sizes: Sequence[int], **kwargs) -> "FFNet":
        """Hinton's settings: sum goodness, threshold = width, rms norm, SGD lr 0.01, momentum 0.9,
        weight decay 0.001, first layer's goodness skipped when predicting."""
        kwargs = {"config": FFConfig.hinton(), "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 0.001, "skip_first_goodness": len(sizes) > 2, **kwargs}
        return cls(sizes, **kwargs)

    def train_step(self, x_pos, x_neg) -> list:
        """One step of every layer, bottom up; returns each layer's FFStepOutput."""
        outs = []
        for i, layer in enumerate(self.layers):
            if self.optimizers is not None:
                out = layer.train_step(x_pos, x_neg, optimizer=self.optimizers[i])
            else:
                out = layer.train_step(x_pos, x_neg, lr=self.lr, momentum=self.momentum,
                                       weight_decay=self.weight_decay)
            outs.append(out)
            x_pos, x_neg = out.y_pos, out.y_neg
        return outs

    @torch.no_grad()
    def goodness(self, x) -> torch.Tensor:
        """Goodness of every layer, [B, L] (float32, float64 for float64 weights)."""
        gs = []
        for layer in self.layers:
            x, g = layer(x)
            gs.append(g)
        return torch.stack(gs, dim=1)

    @torch.no_grad()
    def predict(self, x, num_classes: int, skip_first_goodness: Optional[bool] = None) -> torch.Tensor:
        """The label whose embedding gives the highest total goodness (all candidates in one batch)."""
        skip = self.skip_first_goodness if skip_first_goodness is None else skip_first_goodness
        b = x.shape[0]
        labels = torch.arange(num_classes, device=x.device).repeat_interleave(b)
        g = self.goodness(embed_labels(x.repeat(num_classes, 1), labels, num_classes))
        if skip and g.shape[1] > 1:
            g = g[:, 1:]
        return g.sum(dim=1).view(num_classes, b).argmax(dim=0)
