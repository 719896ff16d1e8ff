"""The documentation runs: every ```python block of README.md, and the blocks of docs/*.md marked
``<!-- runnable -->`` on the line before, executed in order in one namespace per document.

A block that imports a module that cannot be imported here (an extra that is not installed) is skipped;
torchvision 0.28.0 beside the CPU torch imports, through conftest.py (tests/_torchvision_compat.py).
"""

import functools
import importlib
import re
import traceback
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import ROOT

README = ROOT / "README.md"
RUNNABLE = "<!-- runnable -->"
DOCUMENTS = [README] + sorted((ROOT / "docs").glob("*.md"))
IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.MULTILINE)


def python_blocks(path: Path) -> List[Tuple[int, str]]:
    """``(line number, code)`` of the document's runnable python blocks: all of them in README.md, the
    ones preceded by the runnable marker elsewhere."""
    lines = path.read_text().splitlines()
    blocks, start, keep = [], None, False
    for number, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            start = number + 1
            keep = path == README or (number > 0 and lines[number - 1].strip() == RUNNABLE)
        elif start is not None and line.strip() == "```":
            if keep:
                blocks.append((start + 1, "\n".join(lines[start:number])))
            start = None
    return blocks


def missing_module(code: str):
    """The first module ``code`` imports that cannot be imported here, or None."""
    for name in IMPORT.findall(code):
        try:
            importlib.import_module(name)
        except Exception:  # a torchvision built for another torch raises RuntimeError, not ImportError
            return name
    return None


@functools.lru_cache(maxsize=None)
def outcomes(path: Path) -> Tuple[Tuple[str, str], ...]:
    """Run the document's blocks in order; per block ``("ok" | "skip" | "error", detail)``."""
    namespace: dict = {"__name__": "__readme__"}
    results = []
    for line, code in python_blocks(path):
        missing = missing_module(code)
        if missing is not None:
            results.append(("skip", f"needs {missing}, which cannot be imported here"))
            continue
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            results.append(("ok", ""))
        except Exception:
            results.append(("error", traceback.format_exc()))
    return tuple(results)


CASES = [(path, index, line) for path in DOCUMENTS for index, (line, _) in enumerate(python_blocks(path))]


@pytest.mark.parametrize("path,index,line", CASES, ids=[f"{p.name}:{line}" for p, _, line in CASES])
def test_documentation_block_runs(path, index, line):
    status, detail = outcomes(path)[index]
    if status == "skip":
        pytest.skip(detail)
    assert status == "ok", f"{path.name} block at line {line} failed:\n{detail}"


def test_blocks_are_found(tmp_path):
    assert len(python_blocks(README)) >= 4
    assert any(path.name == "convert.md" for path, _, _ in CASES)
    document = tmp_path / "doc.md"
    document.write_text(f"```python\nskipped = 1\n```\n{RUNNABLE}\n```python\nx = 1\ny = x + 1\n```\n")
    assert python_blocks(document) == [(6, "x = 1\ny = x + 1")]
    assert missing_module("import gpconv\nfrom no_such_module_here import x") == "no_such_module_here"
