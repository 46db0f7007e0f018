"""Build the CPU-emulated ff_kernels._C: the unmodified csrc kernels and python_bindings compiled as
host C++ by g++ against the stub CUDA headers in tests/cuda_emu/include (see README.md there).

    python -m tests.cuda_emu.build          # prints the path of the built module

The output goes to build/cuda_emu/<hash>/ under the repository root, keyed by a hash of every
source, header, flag and the compiler/Python/pybind11 identity, so a rerun with nothing changed
costs nothing. The translation units compile in parallel; the module is moved into place
atomically, so concurrent builders (pytest-xdist workers) are safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INCLUDE = HERE / "include"
OUT_BASE = ROOT / "build" / "cuda_emu"

# (source, optimisation): the kernels at -O2 (they run a lot of emulated threads), the pybind11
# bindings at -O0 (compile time dominates there).
SOURCES = [
    (ROOT / "csrc" / "ff_layer.cu", "-O2"),
    (ROOT / "csrc" / "probe.cu", "-O0"),
    (ROOT / "python_bindings" / "module.cpp", "-O0"),
    (HERE / "emu_runtime.cpp", "-O0"),
    (HERE / "emu_selftest.cpp", "-O0"),
]


class EmulatorBuildError(RuntimeError):
    """g++ failed; the message carries its output."""


def compiler() -> str | None:
    """The C++ compiler: $FF_EMU_CXX, else g++ on PATH; None when absent."""
    cxx = os.environ.get("FF_EMU_CXX") or "g++"
    return shutil.which(cxx)


def _version() -> str:
    ns: dict = {}
    exec((ROOT / "ff_kernels" / "_version.py").read_text(), ns)
    return ns["__version__"]


def _pybind11_includes() -> list[str]:
    import pybind11

    return ["-I" + sysconfig.get_paths()["include"], "-I" + pybind11.get_include()]


def _common_flags() -> list[str]:
    # The emulator's include dir comes first: it shadows the CUDA headers. The namespace rename keeps
    # the C++ types of this module distinct from the real _C's in pybind11's process-wide type
    # registry, so both can be loaded in one test session.
    # -fno-strict-aliasing: CUDA code reinterprets shared memory as vector types (float4, uint4),
    # which nvcc defines to work; g++'s type-based alias analysis must not assume otherwise.
    return ["-std=c++20", "-g0", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing",
            "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-class-memaccess",
            "-DFF_KERNELS_CPU_EMULATION", f'-DFF_KERNELS_VERSION="{_version()}"',
            "-Dff_kernels=ff_kernels_cpu_emulation",
            f"-I{INCLUDE}", f"-I{ROOT / 'csrc'}", *_pybind11_includes(), *_arch_flags(),
            *_extra_flags()]


def _arch_flags() -> list[str]:
    """-mf16c on x86-64: __half (_Float16) conversions in hardware instead of libgcc calls, which
    otherwise take a quarter of the emulated fp16 kernels' time (same rounding: to nearest even)."""
    import platform

    return ["-mf16c"] if platform.machine().lower() in ("x86_64", "amd64") else []


def _extra_flags() -> list[str]:
    """$FF_EMU_CXXFLAGS, e.g. "-fsanitize=address" (README: running under a sanitizer)."""
    return os.environ.get("FF_EMU_CXXFLAGS", "").split()


def _inputs() -> list[Path]:
    files = {src for src, _ in SOURCES}
    files |= set((ROOT / "csrc").glob("*.h")) | set((ROOT / "csrc").glob("*.cuh"))
    files |= set(INCLUDE.glob("*.h")) | {Path(__file__).resolve()}
    return sorted(files)


def module_path(cxx: str) -> Path:
    """Where the module for the current sources lands (it may not exist yet)."""
    h = hashlib.sha256()
    for f in _inputs():
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    import pybind11

    ident = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([ident, sys.version, pybind11.__version__, str(_common_flags()),
                        str(SOURCES)]).encode())
    return OUT_BASE / h.hexdigest()[:16] / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def build(cxx: str | None = None, verbose: bool = False) -> Path:
    """Build (or reuse) the emulated module; return its path. Raises EmulatorBuildError."""
    cxx = cxx or compiler()
    if cxx is None:
        raise EmulatorBuildError("no C++ compiler: g++ not on PATH (set FF_EMU_CXX)")
    out = module_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = _common_flags()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        procs = []
        for src, opt in SOURCES:
            obj = Path(tmp) / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            cmd = [cxx, *flags, opt, "-c", *lang, str(src), "-o", str(obj)]
            if verbose:
                print(" ".join(cmd), flush=True)
            procs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True)))
        objs = []
        for cmd, obj, p in procs:
            log, _ = p.communicate()
            if p.returncode != 0:
                raise EmulatorBuildError(f"{' '.join(cmd)}\nfailed ({p.returncode}):\n{log}")
            if verbose and log:
                print(log, flush=True)
            objs.append(str(obj))
        tmp_so = Path(tmp) / out.name
        cmd = [cxx, "-shared", "-pthread", *_extra_flags(), *objs, "-o", str(tmp_so)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise EmulatorBuildError(f"{' '.join(cmd)}\nfailed ({p.returncode}):\n{p.stdout}{p.stderr}")
        os.replace(tmp_so, out)
    return out


def load(path: Path):
    """Import the emulated module from path (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location("ff_kernels_cpu_emulation._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
