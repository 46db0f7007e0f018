"""FFConfig: the math of one Forward-Forward layer step (DESIGN.md section 1), validated once."""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass, fields

GOODNESS = ("sum", "mean")
NORMS = ("l2", "rms", "none")
LOSSES = ("softplus", "symba")
PEER_NORMS = ("none", "hinton", "loewex")


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
    peer_norm: "none", "hinton" or "loewex": peer normalisation (DESIGN section 1.7). A running
              mean m [N] of the positive rows' activities (``peer_mean`` of the op, a module buffer
              starting at 0.5) is updated with each batch, m <- rho m + (1 - rho) mean_pos h, and every
              positive row gets dL/dz_ij += kappa (m_j - mean(m)), dead units included. Hinton's code:
              kappa = lambda / B+; loeweX: kappa = lambda (2/N) (1 - rho) / B+ (the gradient of
              lambda mean_j (mean(m) - m_j)^2 through the running mean).
    peer_lambda, peer_rho: lambda (>= 0) and rho (in [0, 1)) of the peer term.
    """

    goodness: str = "mean"
    theta: float = 2.0
    norm: str = "l2"
    eps: float = 1e-4
    loss: str = "softplus"
    alpha: float = 4.0
    theta_per_unit: bool = False
    peer_norm: str = "none"
    peer_lambda: float = 0.03
    peer_rho: float = 0.9

    def __post_init__(self):
        _choice("goodness", self.goodness, GOODNESS)
        _choice("norm", self.norm, NORMS)
        _choice("loss", self.loss, LOSSES)
        _choice("peer_norm", self.peer_norm, PEER_NORMS)
        for name in ("theta", "eps", "alpha", "peer_lambda", "peer_rho"):
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
        if self.peer_lambda < 0:
            raise ValueError(f"FFConfig.peer_lambda must be >= 0, got {self.peer_lambda}")
        if not 0 <= self.peer_rho < 1:
            raise ValueError(f"FFConfig.peer_rho must be in [0, 1), got {self.peer_rho}")
        object.__setattr__(self, "_op_string",
                           ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)))

    def threshold(self, n_features: int) -> float:
        """The goodness threshold of a layer with ``n_features`` outputs."""
        return self.theta * n_features if self.theta_per_unit else self.theta

    def peer_kappa(self, n_features: int, n_pos: int) -> float:
        """kappa of the peer term dL/dz_ij += kappa (m_j - mean m) for a layer of ``n_features``
        outputs trained on ``n_pos`` positive rows (0 when peer normalisation is off)."""
        if self.peer_norm == "hinton":
            return self.peer_lambda / n_pos
        if self.peer_norm == "loewex":
            return self.peer_lambda * (2.0 / n_features) * (1.0 - self.peer_rho) / n_pos
        return 0.0

    def op_string(self) -> str:
        """The config as the one string argument of the torch.library ops (see library.py); built
        once, so torch.compile reads a constant instead of tracing the formatting."""
        return self._op_string

    @staticmethod
    def from_op_string(text: str) -> "FFConfig":
        """Inverse of ``op_string`` (cached: a layer passes the same string every step)."""
        return _parse_op_string(text)

    @classmethod
    def pytorch_recipe(cls) -> "FFConfig":
        """The popular PyTorch FF recipe: mean goodness, theta 2, l2 norm (train with Adam, lr 0.03)."""
        return cls(goodness="mean", theta=2.0, norm="l2", eps=1e-4, loss="softplus")

    @classmethod
    def hinton(cls) -> "FFConfig":
        """Hinton's own code: sum goodness, threshold = layer width, rms norm, his peer
        normalisation (lambda 0.03, rho 0.9). Trained with SGD lr 0.01, momentum 0.9, dampening
        0.9 and decoupled weight decay 0.001 (``FFNet.hinton``)."""
        return cls(goodness="sum", theta=1.0, theta_per_unit=True, norm="rms", eps=1e-4, loss="softplus",
                   peer_norm="hinton", peer_lambda=0.03, peer_rho=0.9)

    @classmethod
    def loewex(cls) -> "FFConfig":
        """loeweX/Forward-Forward: Hinton's layer with the peer loss lambda mean_j (mean m - m_j)^2
        differentiated through the running mean (lambda 0.03, rho 0.9). Trained with SGD lr 1e-3,
        momentum 0.9, coupled weight decay 3e-4 (``FFNet.loewex``)."""
        return cls(goodness="sum", theta=1.0, theta_per_unit=True, norm="rms", eps=1e-4, loss="softplus",
                   peer_norm="loewex", peer_lambda=0.03, peer_rho=0.9)


@functools.lru_cache(maxsize=256)
def _parse_op_string(text: str) -> FFConfig:
    items = (item.split("=", 1) for item in text.split(";"))
    return FFConfig(**{name: ast.literal_eval(value) for name, value in items})


def _choice(field: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"FFConfig.{field} must be one of {allowed}, got {value!r}")
