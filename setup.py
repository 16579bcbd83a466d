"""Builds lift_kernels._C with CMake (ninja generator, pybind11).

Environment: LIFT_KERNELS_CUDA=0/1 forces the CUDA part off/on (default: on when nvcc is
found); LIFT_KERNELS_CUDA_ARCHS="80;90a" picks the architectures; MAX_JOBS caps parallelism.
Each build reads them afresh: nothing sticks in the CMake cache from an earlier build.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def read_version() -> str:
    text = (ROOT / "lift_kernels" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _tool(name: str) -> str:
    """The absolute path of a build tool: the one on PATH (pip's isolated build puts its own
    cmake and ninja first there), else the one the `cmake`/`ninja` packages installed beside
    this interpreter or its base (a virtual environment that is not activated)."""
    beside = os.pathsep.join((sysconfig.get_path("scripts"), os.path.join(sys.base_prefix, "bin")))
    found = shutil.which(name) or shutil.which(name, path=beside)
    if found is None:
        raise RuntimeError(f"{name} is neither on PATH nor in {beside}: pip install {name}")
    return str(Path(found).resolve())


def build_dir_for(toolchain: dict) -> Path:
    """The CMake build folder of this toolchain (interpreter, cmake, ninja, pybind11).

    A CMake cache remembers the tools that configured it, and pip's build isolation deletes
    its temporary cmake and ninja after the build; so each toolchain gets its own folder
    (an editable install and `make build` reuse theirs and rebuild incrementally), and the
    folders of toolchains whose tools are gone are removed.  Build options are not part of
    the key: every configure passes all of them (build_extension)."""
    key = hashlib.sha256(json.dumps(toolchain, sort_keys=True).encode()).hexdigest()[:12]
    root = ROOT / "build"
    for old in root.glob("cmake-*/lift-toolchain.json"):
        tools = json.loads(old.read_text())
        if not all(Path(tools[t]).exists() for t in ("python", "cmake", "ninja")):
            shutil.rmtree(old.parent, ignore_errors=True)
    build_dir = root / f"cmake-{sys.implementation.cache_tag}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lift-toolchain.json").write_text(json.dumps(toolchain, indent=1))
    return build_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        toolchain = {"python": sys.executable, "cmake": _tool("cmake"), "ninja": _tool("ninja"),
                     "pybind11": pybind11.get_cmake_dir()}
        build_dir = build_dir_for(toolchain)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={toolchain['pybind11']}",
            f"-DCMAKE_MAKE_PROGRAM={toolchain['ninja']}",
            f"-DLIFT_KERNELS_VERSION={read_version()}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        # Every option on every configure: an unset variable removes its cached value, so the
        # CMakeLists.txt default applies again (no option sticks from an earlier build).
        cuda = os.environ.get("LIFT_KERNELS_CUDA")
        if cuda not in (None, "", "0", "1"):
            raise ValueError(f"LIFT_KERNELS_CUDA must be 0 or 1 (or unset), got {cuda!r}")
        args.append(f"-DLIFT_KERNELS_CUDA={'ON' if cuda == '1' else 'OFF'}" if cuda
                    else "-ULIFT_KERNELS_CUDA")
        archs = os.environ.get("LIFT_KERNELS_CUDA_ARCHS")
        args.append(f"-DLIFT_KERNELS_CUDA_ARCHS={archs}" if archs else "-ULIFT_KERNELS_CUDA_ARCHS")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([toolchain["cmake"], str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([toolchain["cmake"], "--build", ".", "-j", jobs], cwd=build_dir,
                       check=True)


setup(
    version=read_version(),
    ext_modules=[CMakeExtension("lift_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
