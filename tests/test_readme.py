"""The README's Python blocks run as written.  A block whose first line is a comment starting
with "# needs" (a GPU, a downloaded checkpoint) is only compiled; every other block is
executed, each in a fresh namespace and an empty working directory."""

import re
from pathlib import Path

import pytest

from lift_tiny import one_thread  # noqa: F401

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def _first_line(block: str) -> str:
    return block.strip().splitlines()[0]


def test_the_readme_has_python_blocks_and_runs_most():
    assert len(BLOCKS) >= 3
    assert sum(not _first_line(b).startswith("# needs") for b in BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[_first_line(b)[:40] for b in BLOCKS])
def test_readme_block(block, tmp_path, monkeypatch):
    code = compile(block, f"README.md block {_first_line(block)!r}", "exec")
    if _first_line(block).startswith("# needs"):
        return
    monkeypatch.chdir(tmp_path)
    exec(code, {"__name__": "__readme__"})
