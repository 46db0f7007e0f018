"""Independent eager implementations of the Forward-Forward sources the presets follow, and a backprop
baseline, written from each source's description (DESIGN.md section 1) for the learning-quality
comparison (tests/test_learning.py, bench/learning_table.py).

They never import ff_kernels: each is plain PyTorch (autograd where its source uses autograd, hand
gradients where its source writes them out), so a bug in the package cannot hide in its own oracle.
Every ``train_*`` function takes the same tensors (images in [0, 1], rows of K features; integer
labels) and returns a ``Result``.
"""

from .common import Result, live_fraction
from .hinton_ff import train_hinton
from .loewex_ff import train_loewex
from .mlp import train_mlp
from .recipe_ff import train_recipe

def train_recipe_uniform(*args, **kwargs):
    """The recipe with a wrong label drawn uniformly among the other classes (as ff_kernels draws
    them) instead of the source's permutation, which leaves ~10 % of negatives with their true label."""
    return train_recipe(*args, negatives="uniform", **kwargs)


IMPLEMENTATIONS = {"recipe": train_recipe, "recipe-uniform": train_recipe_uniform, "hinton": train_hinton,
                   "loewex": train_loewex, "mlp": train_mlp}

__all__ = ["Result", "live_fraction", "train_recipe", "train_recipe_uniform", "train_hinton", "train_loewex", "train_mlp",
           "IMPLEMENTATIONS"]
