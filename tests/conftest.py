import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ff_kernels.backends as backends  # noqa: E402

@pytest.fixture(scope="module")
def ext():
    """The compiled ff_kernels._C: skipped when absent, a failure under FF_KERNELS_REQUIRE_EXTENSION=1."""
    from ff_kernels._ext import load_extension
    mod, reason = load_extension()
    if mod is None:
        if os.environ.get("FF_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"FF_KERNELS_REQUIRE_EXTENSION=1 but {reason}")
        pytest.skip(reason)
    return mod


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none visible")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output a backend allocates starts as NaN in every test."""
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)
    yield


@pytest.fixture(autouse=True)
def fresh_seed():
    """A fresh seed per test, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield seed
