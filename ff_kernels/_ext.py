"""Loader for the compiled CUDA backend ff_kernels._C (optional: absent in a pure-Python install).

No torch import here: the module is plain pybind11 and this file only reports whether it loads.
"""

import functools
import importlib

from ._version import __version__


@functools.lru_cache(maxsize=None)
def load_extension():
    """Return (module, reason): (ff_kernels._C, "") when usable, else (None, why not). Cached."""
    try:
        _C = importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}._C":  # _C itself was found but needs a missing module
            return None, f"ff_kernels._C failed to import: {err}"
        return None, ("extension not built (nvcc not found at install time, or "
                      "FF_KERNELS_BUILD_CUDA=0); reinstall with CUDA_HOME set to build it")
    except (ImportError, OSError) as err:  # e.g. undefined symbol, wrong Python ABI, bad ELF
        return None, f"ff_kernels._C failed to load: {err}"
    # A stale .so left in the source tree (editable installs) would not match the Python side.
    if _C.version() != __version__:
        return None, (f"ff_kernels._C is version {_C.version()} but the package is {__version__}: "
                      "rebuild it (pip install -e . or pip install .)")
    return _C, ""


def extension_status():
    """One human-readable line on the CUDA backend's state, for backend listings and bug reports."""
    mod, reason = load_extension()
    if mod is None:
        return f"cuda extension unavailable: {reason}"
    rt = mod.cuda_runtime_version()
    count, why = mod.device_count()
    devices = f"{count} device(s)" if count else f"no device ({why})"
    return (f"cuda extension {mod.version()} (CUDA runtime {rt // 1000}.{rt % 1000 // 10}, "
            f"archs {mod.compiled_archs()}): {devices}")
