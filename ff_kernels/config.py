"""FFConfig: the math of one Forward-Forward layer step (DESIGN.md section 1), validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

GOODNESS = ("sum", "mean")
NORMS = ("l2", "rms", "none")
LOSSES = ("softplus", "symba")


@dataclass(frozen=True)
class FFConfig:
    """What one layer computes; every backend reads the same fields.

    goodness: "sum" (g = sum_j h_j^2) or "mean" (g = sum_j h_j^2 / N).
    theta:    the goodness threshold of the softplus loss. With ``theta_per_unit`` the threshold
              is ``theta * N`` (Hinton's code uses threshold = layer width: goodness "sum", theta 1,
              theta_per_unit True), so one config serves layers of different widths.
    norm:     output normalisation, "l2" (y = h / (|h| + eps)), "rms" (y = h / (|h| / sqrt(N) + eps))
              or "none".
    loss:     "softplus" (FF logistic loss) or "symba" (SymBa; needs B+ = B-, rows paired by index).
    alpha:    SymBa's scale (> 0); unused by softplus.
    """

    goodness: str = "mean"
    theta: float = 2.0
    norm: str = "l2"
    eps: float = 1e-4
    loss: str = "softplus"
    alpha: float = 4.0
    theta_per_unit: bool = False

    def __post_init__(self):
        _choice("goodness", self.goodness, GOODNESS)
        _choice("norm", self.norm, NORMS)
        _choice("loss", self.loss, LOSSES)
        for name in ("theta", "eps", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"FFConfig.{name} must be a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"FFConfig.{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if self.eps <= 0:
            raise ValueError(f"FFConfig.eps must be > 0, got {self.eps}")
        if self.alpha <= 0:
            raise ValueError(f"FFConfig.alpha must be > 0, got {self.alpha}")
        if not isinstance(self.theta_per_unit, bool):
            raise TypeError("FFConfig.theta_per_unit must be a bool")

    def threshold(self, n_features: int) -> float:
        """The goodness threshold of a layer with ``n_features`` outputs."""
        return self.theta * n_features if self.theta_per_unit else self.theta

    @classmethod
    def pytorch_recipe(cls) -> "FFConfig":
        """The popular PyTorch FF recipe: mean goodness, theta 2, l2 norm (train with Adam, lr 0.03)."""
        return cls(goodness="mean", theta=2.0, norm="l2", eps=1e-4, loss="softplus")

    @classmethod
    def hinton(cls) -> "FFConfig":
        """Hinton's own code: sum goodness, threshold = layer width, rms norm (SGD lr 0.01,
        momentum 0.9, weight decay 0.001)."""
        return cls(goodness="sum", theta=1.0, theta_per_unit=True, norm="rms", eps=1e-4, loss="softplus")


def _choice(field: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"FFConfig.{field} must be one of {allowed}, got {value!r}")
