"""The compiled module ff_kernels._C and the build decision in setup.py.

Without the extension these tests skip with the reason, except when FF_KERNELS_REQUIRE_EXTENSION=1
(CI, which has nvcc): then a missing or broken extension is a failure.
"""

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ff_kernels._ext import extension_status
from ff_kernels._version import __version__

ROOT = Path(__file__).resolve().parents[1]



def test_module_imports_without_gpu(ext):
    assert ext.__name__ == "ff_kernels._C"
    assert "cuda extension 0.1.0" in extension_status()


def test_version_matches_package(ext):
    assert ext.version() == __version__ == "0.1.0"
    try:
        from importlib.metadata import PackageNotFoundError, version
        assert version("ff_kernels") == __version__  # pyproject.toml agrees with _version.py
    except PackageNotFoundError:
        pass  # running from a source tree that was never pip-installed


def test_cuda_runtime_version(ext):
    assert ext.cuda_runtime_version() >= 11000  # CUDART_VERSION encoding: 1000*major + 10*minor


def test_device_count_without_gpu_gives_reason(ext):
    torch = pytest.importorskip("torch", reason="torch not installed")
    count, reason = ext.device_count()
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count() and count > 0
    else:
        assert count == 0
        assert isinstance(reason, str) and reason.strip(), "a zero count must say why"


def test_check_cuda_raises_runtime_error(ext):
    ext._check_cuda(0, "cudaMemsetAsync")  # cudaSuccess: no exception
    with pytest.raises(RuntimeError, match=r"cudaMalloc failed: .*out of memory"):
        ext._check_cuda(2, "cudaMalloc")  # 2 = cudaErrorMemoryAllocation


def test_no_dynamic_torch_or_cudart(ext):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed: cannot list the module's NEEDED entries")
    out = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out.stdout)
    assert needed, out.stdout  # parsing worked: a module always needs libc
    bad = [lib for lib in needed if re.search(r"torch|c10|cudart", lib)]
    assert not bad, f"_C must not link these dynamically: {bad}"


def test_compiled_archs_match_request(ext):
    # CI builds and tests with the same FF_KERNELS_CUDA_ARCHS (default "80;90").
    asked = os.environ.get("FF_KERNELS_CUDA_ARCHS", "80;90")
    split = lambda s: {a for a in re.split(r"[;,\s]+", s) if a}
    assert split(ext.compiled_archs()) == split(asked)


# ---- the build decision (setup.py), no compiler run -------------------------------------------

@pytest.fixture(scope="module")
def setup_py():
    path = ROOT / "setup.py"
    if not path.is_file():
        pytest.skip("setup.py not present (tests run outside the source tree)")
    pytest.importorskip("setuptools", reason="setuptools not installed")
    spec = importlib.util.spec_from_file_location("ff_kernels_setup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() only runs under __main__
    return mod


def _fake_nvcc(directory):
    nvcc = directory / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return nvcc


def test_forced_build_without_nvcc_is_a_clear_error(setup_py, tmp_path):
    env = {"FF_KERNELS_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path / "no-cuda"), "PATH": str(tmp_path)}
    with pytest.raises(setup_py.BuildConfigError, match=r"nvcc was not found.*CUDA_HOME"):
        setup_py.cuda_build_decision(env)


def test_forced_build_without_nvcc_fails_setup_py(setup_py, tmp_path):
    # The real entry point: `python setup.py` exits non-zero with the message, before any build.
    env = {"FF_KERNELS_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path), "PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "FF_KERNELS_BUILD_CUDA=1 but nvcc was not found" in res.stderr


def test_skip_and_auto_decisions(setup_py, tmp_path):
    decide = setup_py.cuda_build_decision
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = _fake_nvcc(bin_dir)
    build, reason, _ = decide({"FF_KERNELS_BUILD_CUDA": "0", "PATH": str(bin_dir)})
    assert not build and "FF_KERNELS_BUILD_CUDA=0" in reason
    build, reason, _ = decide({"PATH": str(tmp_path)})  # unset and no nvcc: pure Python
    assert not build and "nvcc not found" in reason
    assert decide({"PATH": str(bin_dir)}) == (True, f"nvcc found at {nvcc}", str(nvcc))
    # CUDA_HOME wins over PATH
    assert decide({"CUDA_HOME": str(tmp_path), "PATH": "/nonexistent"})[2] == str(nvcc)
    with pytest.raises(setup_py.BuildConfigError, match="must be 0, 1 or unset"):
        decide({"FF_KERNELS_BUILD_CUDA": "yes"})
