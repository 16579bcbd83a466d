"""What an installation says about itself (lift_kernels.install): build_info, --version, the
extras and their errors, the transformers range, an unbuilt source tree.  The installed
wheel itself is checked by tests/installed_check.py (`make test-install`)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import warnings
from pathlib import Path

import pytest

import lift_kernels
from lift_kernels import cli, install

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_the_tested_transformers_range_and_the_extras():
    deps = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in
            _pyproject()["dependencies"]}
    assert deps["transformers"] == "transformers" + install.TRANSFORMERS_RANGE
    for needed in ("torch", "tokenizers", "safetensors", "tqdm"):
        assert needed in deps, needed
    extras = _pyproject()["optional-dependencies"]
    for extra, module in install.EXTRAS.items():
        assert any(req.startswith(module) for req in extras[extra]), (extra, extras[extra])


def test_build_info_reports_the_build_and_the_libraries_found():
    import torch

    info = lift_kernels.build_info()
    assert info["version"] == lift_kernels.__version__
    assert info["torch"] == torch.__version__
    assert info["transformers_tested"] == install.TRANSFORMERS_RANGE
    assert set(info["extras"]) == set(install.EXTRAS)
    if info["extension"]:
        assert info["extension_version"] == lift_kernels.__version__
        assert info["backends_compiled"] == (["cpu", "cuda"] if info["cuda"] else ["cpu"])
    else:
        assert "make build" in info["extension_error"] and info["backends_compiled"] == []


def test_version_option_prints_the_build(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lift-kernels {lift_kernels.__version__}\n")
    info = lift_kernels.build_info()
    assert f"torch {info['torch']}" in out and "compiled backends: " in out
    if info["extension"]:
        assert "compiled backends: " + ", ".join(info["backends_compiled"]) in out


def _hide(monkeypatch, module):
    """Make `module` look uninstalled to install.has_extra."""
    real = install.importlib.util.find_spec
    monkeypatch.setattr(install.importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))


def test_missing_extra_fails_before_any_work_with_its_exit_code_and_json(monkeypatch, capsys,
                                                                         tmp_path):
    _hide(monkeypatch, "peft")
    # The document does not exist: exit code 9, not 3, shows the check ran before any work.
    argv = ["absorb", "--model", "demo", "--document", str(tmp_path / "absent.txt"),
            "--out", str(tmp_path / "m.safetensors"), "--adapter", "lora"]
    assert cli.main(argv + ["--json"]) == cli.EXIT_CODES["missing_extra"] == 9
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report == {"error": "missing_extra", "exit_code": 9, "message": report["message"]}
    assert "peft" in report["message"] and "pip install 'lift-kernels[lora]'" in report["message"]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lift-kernels absorb: error: --adapter lora")


def test_demo_json_file_gets_the_error(monkeypatch, tmp_path):
    _hide(monkeypatch, "triton")
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--backend", "triton", "--json", str(out)]) == 9
    report = json.loads(out.read_text())
    assert report["error"] == "missing_extra" and "lift-kernels[triton]" in report["message"]


def test_missing_extra_reaches_the_python_api(monkeypatch):
    from lift_kernels.lift import LiftConfig, adapters

    _hide(monkeypatch, "peft")
    with pytest.raises(install.MissingExtraError, match=r"lift-kernels\[lora\]"):
        adapters.attach(object(), LiftConfig(adapter="lora"))
    assert install.missing_extra("lora", "x") == (
        "x needs peft, which is not installed: pip install 'lift-kernels[lora]'")
    with pytest.raises(ValueError, match="extra must be one of"):
        install.has_extra("plots")


@pytest.mark.parametrize("version,inside", [
    ("5.0.0", True), ("5.0", True), ("5.24.0", True), ("5.24.9.post1", True),
    ("4.57.1", False), ("5.25.0", False), ("5.25.0.dev0", False), ("6.0", False)])
def test_version_range(version, inside):
    assert install.in_range(version, ">=5.0,<5.25") is inside


def test_transformers_outside_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(install, "_warned_transformers", False)
    monkeypatch.setattr(install, "_version_of", lambda name: "5.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        install.check_transformers_version()  # in range: silent
    monkeypatch.setattr(install, "_version_of", lambda name: "5.99.0")
    with pytest.warns(RuntimeWarning, match=r"tested with transformers >=5\.0,<5\.25; found 5\.99"):
        install.check_transformers_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        install.check_transformers_version()  # once per process


def test_replace_attention_checks_the_transformers_version(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(install, "_warned_transformers", False)
    monkeypatch.setattr(install, "_version_of", lambda name: "4.57.0")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)
    with pytest.warns(RuntimeWarning, match="found 4.57.0"):
        lift_kernels.replace_attention(transformers.LlamaForCausalLM(config))


def test_source_tree_without_the_extension_says_how_to_build(tmp_path):
    """A checkout without lift_kernels._C imports, warns how to build it, and build_info and
    --version say so."""
    shutil.copytree(ROOT / "lift_kernels", tmp_path / "lift_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (tmp_path / "csrc").mkdir()
    (tmp_path / "setup.py").write_text("")
    code = ("import lift_kernels; from lift_kernels import cli; "
            "print(lift_kernels.build_info()['extension_error']); cli.main(['--version'])")
    # -S: no .pth files, so an editable install's import hook cannot reach the real tree;
    # the site directories (torch, transformers) go on the path after the copy instead.
    path = [str(tmp_path), *(p for p in sys.path if p.endswith("-packages"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lift_kernels._C is not built" in done.stderr and "make build" in done.stderr
    assert "make build" in done.stdout and "compiled backends: none" in done.stdout


def test_sdist_holds_what_a_build_needs(tmp_path):
    """`python -m build` builds the wheel from the sdist: every tracked source the build
    reads must be in it, and no build output."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files to compare with")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                           "--outdir", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (sdist,) = tmp_path.glob("lift_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "lift_kernels"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    needed = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", *tracked}
    assert not needed - names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".pyc"))]
