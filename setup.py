"""Build script: CMake + Ninja build of the pybind11 module ff_kernels._C when nvcc is available.

Environment:
  FF_KERNELS_BUILD_CUDA=1|0    force the CUDA extension (error without nvcc) or skip it (pure Python);
                               unset: build it iff nvcc is found ($CUDA_HOME/bin/nvcc, else on PATH).
  FF_KERNELS_CUDA_ARCHS        CMAKE_CUDA_ARCHITECTURES, default "80;90" (A100, H100).
  FF_KERNELS_CUTLASS_DIR       optional CUTLASS include dir (else the nvidia-cutlass package, if any).
  CMAKE_BUILD_PARALLEL_LEVEL   compile jobs, default 2.
  FF_KERNELS_NVCC_THREADS      archs nvcc compiles at once per .cu file (nvcc --threads), default 1.
  FF_KERNELS_CMAKE_ARGS        extra CMake arguments (shell words), e.g. "-DFF_KERNELS_PORTABLE_LINK=OFF".
Portable wheels for clusters (manylinux_2_28, all default archs): scripts/build_wheel.sh, docs/WHEELS.md.
Static metadata lives in pyproject.toml; this file only adds the extension.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"


class BuildConfigError(RuntimeError):
    """The environment asks for something this machine cannot build."""


def find_nvcc(env=os.environ):
    """Path of nvcc: $CUDA_HOME/bin (or $CUDA_PATH/bin) first, then PATH; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which("nvcc", path=env.get("PATH", ""))


def cuda_build_decision(env=os.environ):
    """Return (build: bool, reason: str, nvcc: str | None); raise BuildConfigError on a bad request."""
    flag = env.get("FF_KERNELS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise BuildConfigError(f"FF_KERNELS_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "FF_KERNELS_BUILD_CUDA=0", None
    nvcc = find_nvcc(env)
    if nvcc is None:
        where = f"CUDA_HOME={env.get('CUDA_HOME', '<unset>')!s}, and on PATH"
        if flag == "1":
            raise BuildConfigError(
                "FF_KERNELS_BUILD_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin with "
                f"{where}). Install the CUDA toolkit and set CUDA_HOME (or put nvcc on PATH), "
                "or set FF_KERNELS_BUILD_CUDA=0 for a pure-Python install.")
        return False, f"nvcc not found ({where}); set CUDA_HOME to build the CUDA backend", None
    forced = " (FF_KERNELS_BUILD_CUDA=1)" if flag == "1" else ""
    return True, f"nvcc found at {nvcc}{forced}", nvcc


def _tool(module, attr, name):
    """cmake/ninja from their pip packages (build requirements), else from PATH."""
    try:
        mod = __import__(module)
        cand = Path(getattr(mod, attr)) / name
        if cand.is_file():
            return str(cand)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise BuildConfigError(f"{name} not found: pip install {module} (it is a build requirement)")
    return found


def _cutlass_dir():
    """CUTLASS headers: FF_KERNELS_CUTLASS_DIR, else the nvidia-cutlass wheel's copy; '' when absent."""
    explicit = os.environ.get("FF_KERNELS_CUTLASS_DIR", "")
    if explicit:
        return explicit
    try:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.submodule_search_locations:
        return ""
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return str(inc) if (inc / "cutlass" / "cutlass.h").is_file() else ""


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists; setuptools compiles nothing itself."""

    def __init__(self, name, nvcc):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        # get_ext_fullpath gives build/lib... for wheels; setuptools copies it into ff_kernels/
        # of the source tree itself for editable installs (inplace), so one path serves both.
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        archs = os.environ.get("FF_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).strip() or DEFAULT_ARCHS
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        args = [
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DFF_KERNELS_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DFF_KERNELS_CUTLASS_DIR={_cutlass_dir()}",
        ]
        threads = os.environ.get("FF_KERNELS_NVCC_THREADS", "").strip()
        if threads:
            args.append(f"-DFF_KERNELS_NVCC_THREADS={threads}")
        args += shlex.split(os.environ.get("FF_KERNELS_CMAKE_ARGS", ""))
        # A cache made with another interpreter/compiler/toolchain (e.g. a previous isolated build
        # env, since deleted) cannot be reconfigured in place: start that build dir afresh.
        stamp = build_dir / "ff_kernels_config.json"
        key = hashlib.sha256(json.dumps([cmake] + args).encode()).hexdigest()
        if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != key):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, check=True)
        stamp.write_text(key)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        if not out.is_file():
            raise BuildConfigError(f"CMake finished but {out} was not produced")
        print(f"ff_kernels: built CUDA extension {out.name} (archs {archs}, {jobs} jobs)")


def main():
    try:
        build, reason, nvcc = cuda_build_decision()
    except BuildConfigError as err:
        sys.exit(f"error: ff_kernels: {err}")
    if build:
        print(f"ff_kernels: building the CUDA extension ff_kernels._C: {reason}")
    else:
        print(f"ff_kernels: skipping the CUDA extension, installing pure Python: {reason}")
    # No ext_modules when skipped, so the wheel is a py3-none-any pure-Python wheel.
    setup(ext_modules=[CMakeExtension("ff_kernels._C", nvcc)] if build else [],
          cmdclass={"build_ext": CMakeBuild})


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    main()
