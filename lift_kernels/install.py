"""What this installation holds: the compiled extension, the optional extras, the tested
transformers range.  Every "is X installed, and which version" question is answered here.

    build_info()                  version, compiled backends, CUDA archs, run-time libraries
    require_extra("lora", what)   raises MissingExtraError naming the extra to install
    check_transformers_version()  warns once when transformers is outside TRANSFORMERS_RANGE
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import warnings
from pathlib import Path

from . import __version__

# The transformers versions the HF integration is tested with (`make test` runs the newest,
# `make test-compat` the lowest).  pyproject.toml's dependency says the same
# (tests/test_install.py checks that they agree).
TRANSFORMERS_RANGE = ">=5.0,<5.25"

# Optional extras (pyproject.toml's [project.optional-dependencies]): name -> the module it
# brings.  The core install (torch, transformers, tokenizers, safetensors) runs the CLI, the
# demo, the benchmark and replace_attention without any of them.
EXTRAS = {
    "plot": "matplotlib",   # the demo's gate heatmap, the benchmark's --plot
    "lora": "peft",         # the LoRA adapter (absorb --adapter lora)
    "triton": "triton",     # the triton backend (bundled with CUDA builds of torch)
}

_SOURCE_TREE = Path(__file__).resolve().parent.parent
BUILD_HINT = ("build it in the source tree with `make build` (or `pip install -e .`), or "
              "install a wheel: `pip install lift-kernels`")


class MissingExtraError(ImportError):
    """An optional package a command needs is not installed; the message names the extra."""

    def __init__(self, extra: str, what: str):
        self.extra, self.module = extra, EXTRAS[extra]
        super().__init__(f"{what} needs {self.module}, which is not installed: "
                         f"pip install 'lift-kernels[{extra}]'")


def has_extra(extra: str) -> bool:
    """Whether the module of `extra` (a key of EXTRAS) is importable, without importing it."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return importlib.util.find_spec(EXTRAS[extra]) is not None


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtraError("{what} needs ...") when `extra` is not installed."""
    if not has_extra(extra):
        raise MissingExtraError(extra, what)


def missing_extra(extra: str, what: str) -> str | None:
    """For optional output (a plot): None when `extra` is installed, else the one line to
    print ("{what} needs ..., which is not installed: pip install ...")."""
    return None if has_extra(extra) else str(MissingExtraError(extra, what))


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_warned_transformers = False


def _release(version: str) -> tuple:
    """The leading numbers of a version string: "5.24.0.dev0" -> (5, 24, 0)."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def in_range(version: str, spec: str) -> bool:
    """Whether `version` satisfies `spec`, comma-separated ">=A" and "<B" bounds (the only
    forms TRANSFORMERS_RANGE uses; `packaging` is not a dependency of the GPU check)."""
    checks = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b}
    release = _release(version)
    for bound in spec.split(","):
        op, number = re.match(r"\s*(>=|<)\s*(\d+(?:\.\d+)*)\s*$", bound).groups()
        width = max(len(release), number.count(".") + 1)
        pad = lambda t: t + (0,) * (width - len(t))  # noqa: E731  (5.0 == 5.0.0)
        if not checks[op](pad(release), pad(_release(number))):
            return False
    return True


def check_transformers_version() -> None:
    """Warn once per process when the installed transformers is outside TRANSFORMERS_RANGE."""
    global _warned_transformers
    found = _version_of("transformers")
    if _warned_transformers or found is None or in_range(found, TRANSFORMERS_RANGE):
        return
    _warned_transformers = True
    warnings.warn(f"lift-kernels is tested with transformers {TRANSFORMERS_RANGE}; found "
                  f"{found}, which may not work", RuntimeWarning, stacklevel=3)


def in_source_tree() -> bool:
    """Whether the package is imported from a checkout (csrc/ beside it), not an install."""
    return (_SOURCE_TREE / "csrc").is_dir() and (_SOURCE_TREE / "setup.py").is_file()


def extension():
    """(lift_kernels._C, None), or (None, why it cannot be imported and how to build it)."""
    try:
        from . import _C
    except ImportError as e:
        return None, f"lift_kernels._C is not built ({e}): {BUILD_HINT}"
    return _C, None


def build_info() -> dict:
    """What this installation holds: the package version; the compiled extension's build
    (`extension`: its path or None, `extension_error` why not, `backends_compiled`, and
    from _C itself `extension_version`, `compiler`, `openmp`, `cuda`, `cuda_archs`,
    `cuda_version`); and the torch, triton and transformers found at run time (None when
    not installed)."""
    import torch

    module, error = extension()
    info = {"version": __version__, "extension": None, "extension_error": error,
            "backends_compiled": [], "extension_version": None, "compiler": None,
            "openmp": False, "cuda": False, "cuda_archs": "", "cuda_version": ""}
    if module is not None:
        built = module.build_info()
        info.update(extension=module.__file__, extension_version=built.pop("version"), **built)
        info["backends_compiled"] = ["cpu", "cuda"] if info["cuda"] else ["cpu"]
    info.update(python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, triton=_version_of("triton"),
                transformers=_version_of("transformers"),
                transformers_tested=TRANSFORMERS_RANGE,
                extras={name: has_extra(name) for name in EXTRAS})
    return info


def describe(info: dict) -> str:
    """build_info() as the lines `lift-kernels --version` prints."""
    if info["extension"]:
        compiled = ", ".join(info["backends_compiled"])
        if info["cuda"]:
            compiled += f" (CUDA {info['cuda_version']}, archs {info['cuda_archs']})"
        compiled += f"; OpenMP {'on' if info['openmp'] else 'off'}; {info['compiler']}"
    else:
        compiled = f"none: {info['extension_error']}"
    missing = [f"{name} ({EXTRAS[name]})" for name, ok in info["extras"].items() if not ok]
    return "\n".join([
        f"lift-kernels {info['version']}",
        f"compiled backends: {compiled}",
        f"python {info['python']}, torch {info['torch']}"
        + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (CPU)")
        + f", triton {info['triton'] or 'not installed'}, transformers "
          f"{info['transformers'] or 'not installed'} (tested {info['transformers_tested']})",
        "extras not installed: " + (", ".join(missing) if missing else "none"),
    ])


def warn_if_unbuilt() -> None:
    """At import from a checkout without lift_kernels._C: say how to build it (an installed
    wheel always carries it)."""
    if in_source_tree():
        module, error = extension()
        if module is None:
            warnings.warn(f"{error}; until then the cpu and cuda backends are unavailable",
                          RuntimeWarning, stacklevel=3)
