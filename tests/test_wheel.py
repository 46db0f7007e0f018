"""Wheel smoke test (docs/WHEELS.md): scripts/build_wheel.sh makes a one-arch manylinux wheel from
the sdist, pip installs it into a fresh venv beside torch 2.13.0, and ff_kernels._C loads from
outside the source tree; the sdist installs as pure Python where nvcc is absent.

Needs nvcc (skipped without it, a failure under FF_KERNELS_REQUIRE_EXTENSION=1, as in CI) and pip
access to the build requirements. About 2-3 minutes on 2 cores: marked slow, and run by CI all the
same (README's `python -m pytest` selects every test).

The fresh venvs see the running interpreter's torch and the other dependencies through a .pth line
naming a folder of links to them (ff_kernels itself and pip/setuptools are left out), which saves
installing 900 MB of torch per run. FF_KERNELS_WHEEL_SMOKE_TORCH=install pip installs
torch==2.13.0 into them instead. FF_KERNELS_WHEEL_SMOKE_ARCHS picks the arch (default 90);
FF_KERNELS_WHEEL_SMOKE_WHEELHOUSE=DIR reuses the wheel, sdist and build_wheel.log of an earlier run.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_wheel.sh"
ARCHS = os.environ.get("FF_KERNELS_WHEEL_SMOKE_ARCHS", "90")
TORCH = "2.13.0"

pytestmark = pytest.mark.slow


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _need(condition, reason):
    if not condition:
        if os.environ.get("FF_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"FF_KERNELS_REQUIRE_EXTENSION=1 but {reason}")
        pytest.skip(reason)


def _run(cmd, timeout, **kw):
    """stdout of a command that must succeed (the assertion shows both streams' ends)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, (f"{cmd} exited {res.returncode}\n--- stdout\n{res.stdout[-6000:]}"
                                 f"\n--- stderr\n{res.stderr[-6000:]}")
    return res.stdout


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _fresh_venv(path):
    """A new venv that sees torch 2.13.0 (see the module docstring) and no ff_kernels."""
    _run([sys.executable, "-m", "venv", str(path)], timeout=120)
    py = path / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                timeout=60).strip()
    torch_spec = None
    try:
        import torch
        torch_spec = torch.__version__.split("+")[0]
    except ImportError:
        pass
    if os.environ.get("FF_KERNELS_WHEEL_SMOKE_TORCH") == "install" or torch_spec != TORCH:
        _run([str(py), "-m", "pip", "install", "-q", f"torch=={TORCH}"], timeout=900)
    else:  # links to this interpreter's packages, less ff_kernels itself and the packaging tools
        deps = path / "deps"
        deps.mkdir()
        skip = ("ff_kernels", "__editable__", "pip", "setuptools", "wheel", "_distutils_hack")
        for src in dict.fromkeys([Path(torch.__file__).resolve().parents[1],
                                  Path(sysconfig.get_paths()["purelib"]),
                                  Path(sysconfig.get_paths()["platlib"])]):
            for entry in src.iterdir():
                name = entry.name
                if (name.startswith(skip) or name.endswith(".pth") or name == "__pycache__"
                        or (deps / name).exists()):
                    continue
                (deps / name).symlink_to(entry)
        Path(site, "ff_kernels_smoke_deps.pth").write_text(f"{deps}\n")
    return py


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """Run scripts/build_wheel.sh once for one arch: (repaired wheel, sdist, its output)."""
    reuse = os.environ.get("FF_KERNELS_WHEEL_SMOKE_WHEELHOUSE")  # a previous run's output (debugging)
    if reuse:
        out, log = Path(reuse), Path(reuse, "build_wheel.log").read_text()
    else:
        _need(SCRIPT.is_file(), "scripts/build_wheel.sh not present (tests run outside the source tree)")
        _need(_find_nvcc() is not None, "nvcc not found: the wheel smoke test builds the extension")
        out = tmp_path_factory.mktemp("wheelhouse")
        env = _clean_env(FF_KERNELS_CUDA_ARCHS=ARCHS, PYTHON=sys.executable)
        env.pop("FF_KERNELS_CMAKE_ARGS", None)
        log = _run(["bash", str(SCRIPT), str(out)], timeout=1200, env=env, cwd=out)
        (out / "build_wheel.log").write_text(log)
    wheels = list(out.glob("ff_kernels-*.whl"))
    sdists = list(out.glob("ff_kernels-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (sorted(out.iterdir()), log)
    return wheels[0], sdists[0], log


def test_wheel_is_manylinux_2_28_or_older(wheelhouse):
    wheel, _, log = wheelhouse
    plat = wheel.name[:-len(".whl")].split("-")[-1]
    tags = plat.split(".")
    assert tags and all(re.fullmatch(r"manylinux_2_(\d+)_x86_64", t) for t in tags), wheel.name
    assert max(int(re.search(r"_2_(\d+)_", t).group(1)) for t in tags) <= 28, wheel.name
    # The script's own checks passed and said what they found:
    assert re.search(r"highest GLIBC symbol version 2\.(\d+)", log), log
    assert f"SASS for sm_{ARCHS} " in log and f"PTX for sm_{ARCHS} " in log, log


def test_wheel_module_symbols(wheelhouse, tmp_path):
    """Independent of the script: glibc <= 2.28, no libstdc++/cudart/torch dependency, one export."""
    objdump, readelf = shutil.which("objdump"), shutil.which("readelf")
    _need(objdump and readelf, "objdump/readelf (binutils) not installed")
    wheel, _, _ = wheelhouse
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if re.fullmatch(r"ff_kernels/_C\..*\.so", n)]
        so = z.extract(name, tmp_path)
    dyn = _run([objdump, "-T", so], timeout=60)
    glibc = [tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([0-9.]+)", dyn)]
    assert glibc and max(glibc) <= (2, 28), max(glibc)
    assert not re.search(r"GLIBCXX_|CXXABI_", dyn), "libstdc++ must be linked statically"
    exported = [line.split()[-1] for line in dyn.splitlines()
                if re.search(r"\s(g|w)\s", line) and "*UND*" not in line and ".text" in line]
    assert exported == ["PyInit__C"], exported
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        _run([readelf, "-d", so], timeout=60))
    assert not [lib for lib in needed if re.search(r"torch|c10|cudart|stdc\+\+", lib)], needed


SMOKE = textwrap.dedent("""
    import json, os, sys
    import torch
    import ff_kernels
    from ff_kernels import _ext
    out = {"file": ff_kernels.__file__, "status": ff_kernels.backend_status(),
           "ext_status": _ext.extension_status()}
    mod, reason = _ext.load_extension()
    out["ext_reason"] = reason
    if mod is not None:
        import ff_kernels._C as _C
        out.update(c_file=_C.__file__, archs=_C.compiled_archs(), version=_C.version(),
                   runtime=_C.cuda_runtime_version(), devices=list(_C.device_count()))
        try:
            _C._check_cuda(2, "cudaMalloc")
        except RuntimeError as err:  # a C++ exception through the static libstdc++
            out["check_cuda"] = str(err)
    torch.manual_seed(0)
    x_pos, x_neg = torch.randn(6, 8), torch.randn(5, 8)
    w, b = torch.randn(4, 8) * 0.3, torch.zeros(4)
    step = ff_kernels.ff_layer_step(x_pos, x_neg, w, b)
    assert step.y.shape == (11, 4) and step.grad_weight.shape == (4, 8), step
    assert bool(torch.isfinite(step.loss)) and bool(torch.isfinite(step.grad_weight).all())
    out["loss"] = float(step.loss)
    print(json.dumps(out))
""")


def _smoke(py, cwd):
    import json
    return json.loads(_run([str(py), "-c", SMOKE], timeout=300, cwd=cwd,
                           env=_clean_env()).strip().splitlines()[-1])


def test_wheel_installs_and_loads_outside_the_tree(wheelhouse, tmp_path):
    wheel, _, _ = wheelhouse
    py = _fresh_venv(tmp_path / "venv")
    _run([str(py), "-m", "pip", "install", "-q", str(wheel)], timeout=600, cwd=tmp_path,
         env=_clean_env())
    res = _smoke(py, cwd=tmp_path)
    venv = str((tmp_path / "venv").resolve())
    assert res["file"].startswith(venv) and res["c_file"].startswith(venv), res
    assert not res["ext_reason"], res
    assert res["archs"] == ARCHS and res["version"] == "0.1.0" and res["runtime"] >= 13000, res
    assert res["ext_status"].startswith("cuda extension 0.1.0"), res
    assert "cudaMalloc failed" in res["check_cuda"], res
    cuda = res["status"]["cuda"]
    count, why = res["devices"]
    # no GPU: the module loaded and says why it sees none; with a GPU: available
    assert (cuda == "available") if count else cuda.startswith("ff_kernels._C sees no CUDA device"), res


def test_sdist_without_nvcc_installs_pure_python(wheelhouse, tmp_path):
    _, sdist, _ = wheelhouse
    py = _fresh_venv(tmp_path / "venv")
    no_nvcc_path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                   if d and not os.access(Path(d) / "nvcc", os.X_OK))
    env = _clean_env(CUDA_HOME=str(tmp_path / "no-cuda"), PATH=no_nvcc_path)
    env.pop("FF_KERNELS_BUILD_CUDA", None)  # CI forces the extension; here nvcc is simply absent
    env.pop("CUDA_PATH", None)
    res = subprocess.run([str(py), "-m", "pip", "install", "-v", str(sdist)], timeout=600,
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "skipping the CUDA extension, installing pure Python: nvcc not found" in log, log[-6000:]
    assert "ff_kernels-0.1.0-py3-none-any.whl" in log, log[-6000:]
    res = _smoke(py, cwd=tmp_path)
    assert res["file"].startswith(str((tmp_path / "venv").resolve())), res
    assert "extension not built" in res["ext_reason"], res
    assert "extension not built" in res["status"]["cuda"], res
    site = Path(res["file"]).parent
    assert not list(site.glob("_C*.so")), list(site.iterdir())
