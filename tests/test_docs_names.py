"""Every name the documentation mentions exists: in README.md, docs/architecture.md and the other
Markdown documents (docs/*.md, configs/, benchmarks/), each dotted name ``gpconv.x.y`` resolves (the
longest importable module, then attributes), each repository path (``gpconv/...``, ``docs/...``,
``benchmarks/...``, ``configs/...``, ``tests/...``) exists, and each relative Markdown link points at
a file (and at a heading of it, for ``#anchor`` links). And the package's imports follow the layers
docs/architecture.md describes."""

import ast
import importlib
import re
import types
from pathlib import Path
from typing import List

import pytest

from conftest import ROOT

DOCUMENTS = ([ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "configs").glob("*.md"))
             + sorted((ROOT / "benchmarks").rglob("*.md")))
DOTTED_NAME = re.compile(r"(?<![\w.])gpconv(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(?<![\w./-])(?:gpconv|docs|benchmarks|configs|tests)/[\w./-]*")
# the package's folders named without "gpconv/" (as in the data-flow diagram of docs/architecture.md)
PACKAGE_PATH = re.compile(r"(?<![\w./-])(?:core|models|experiments|cli)/[\w./-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)


def resolve(dotted: str) -> object:
    """The object ``dotted`` names, read as Python reads it: an attribute where the object has one
    (``gpconv.convert`` is the function), else a submodule of this repository's package. Raises
    ImportError / AttributeError when it does not exist."""
    parts = dotted.split(".")
    found = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        if hasattr(found, part):
            found = getattr(found, part)
            continue
        if not isinstance(found, types.ModuleType):
            raise AttributeError(f"{'.'.join(parts[:depth - 1])} has no attribute {part!r}")
        found = importlib.import_module(".".join(parts[:depth]))
        if not Path(found.__file__).resolve().is_relative_to(ROOT / "gpconv"):
            raise ImportError(f"{found.__name__} is not in this repository ({found.__file__})")
    return found


def heading_anchors(document: Path) -> set:
    """GitHub's anchors of the document's headings: lower case, punctuation dropped, spaces -> '-'."""
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            for title in HEADING.findall(document.read_text())}


def missing_names(document: Path) -> List[str]:
    """The dotted names, paths and links of ``document`` that do not exist, each with the reason."""
    text = document.read_text()
    problems = []
    for name in sorted(set(DOTTED_NAME.findall(text))):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            problems.append(f"{name}: {type(error).__name__}: {error}")
    for path in sorted({match.rstrip(".") for match in REPO_PATH.findall(text)}):
        if not (ROOT / path).exists():
            problems.append(f"{path}: no such file or folder in the repository")
    for path in sorted({match.rstrip(".") for match in PACKAGE_PATH.findall(text)}):
        if not (ROOT / "gpconv" / path).exists():
            problems.append(f"{path}: no such file or folder in gpconv/")
    for target in sorted(set(LINK.findall(text))):
        if re.match(r"^[a-z]+:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part) if file_part else document
        if not linked.exists():
            problems.append(f"link {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            problems.append(f"link {target}: no heading with that anchor")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in DOCUMENTS])
def test_every_name_in_the_document_exists(document):
    problems = missing_names(document)
    assert not problems, f"{document.relative_to(ROOT)} names what does not exist:\n" + "\n".join(problems)


def test_documents_mention_names_and_paths():
    """The check has something to check: the documents do name modules, objects and paths."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    names, paths = set(DOTTED_NAME.findall(text)), set(REPO_PATH.findall(text))
    assert {"gpconv.core.block.GroupedPointwiseConv2d", "gpconv.models.register_model"} <= names
    assert {"gpconv/core/plan.py", "gpconv/experiments/data/", "configs/"} <= paths
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


def test_wrong_names_are_reported(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text(
        "# Title here\n"
        "`gpconv.core.block.GroupedPointwiseConv2d` and `gpconv.core.plan.make_plan(1, 2)` exist,\n"
        "`gpconv.core.block.NoSuchBlock`, `gpconv.core.no_such_module.make_plan` and\n"
        "`gpconv.models.create_model.no_attribute` do not; gpconv/core/plan.py and gpconv/models/ exist,\n"
        "gpconv/no_such_file.py and docs/no_such_page.md do not, core/block.py does, core/nothing.py not.\n"
        "[ok](#title-here) [bad](#no-heading)\n"
        f"[ok]({ROOT / 'docs' / 'training.md'}) [bad](missing.md)\n")
    problems = "\n".join(missing_names(document))
    for wrong in ("gpconv.core.block.NoSuchBlock", "gpconv.core.no_such_module.make_plan",
                  "gpconv.models.create_model.no_attribute", "gpconv/no_such_file.py", "docs/no_such_page.md",
                  "core/nothing.py", "link #no-heading", "link missing.md"):
        assert wrong in problems
    assert len(missing_names(document)) == 8, problems


def test_resolve_follows_modules_then_attributes():
    import gpconv
    from gpconv.core import block

    assert resolve("gpconv") is gpconv
    assert resolve("gpconv.core.block") is block
    assert resolve("gpconv.core.block.GroupedPointwiseConv2d") is block.GroupedPointwiseConv2d
    assert resolve("gpconv.convert") is gpconv.convert  # the function, not the module gpconv.core.convert
    assert callable(gpconv.convert)
    with pytest.raises(ImportError):
        resolve("gpconv.core.no_such_module")
    with pytest.raises(AttributeError):
        resolve("gpconv.core.block.GroupedPointwiseConv2d.no_such_attribute")


# The layers of docs/architecture.md ("Layers and their dependencies") and the layers each may import.
ALLOWED_IMPORTS = {
    "io": {"io"},
    "core": {"core", "io"},  # io: render_table (gpconv.summarize)
    "models": {"core", "models"},
    "export": {"core", "io", "export"},
    "hub": {"core", "io", "hub"},  # the interop layer: gpconv/hub.py and gpconv/pruning.py
    "pruning": {"core", "pruning"},
    "experiments": {"core", "models", "io", "experiments"},
    "cli": {"core", "models", "io", "export", "hub", "pruning", "experiments", "cli", "api"},
}
# Imports that go up a layer today and are being removed (issue 14): delete an entry once it is gone.
KNOWN_UPWARD_IMPORTS = set()


def layer_of(module: str) -> str:
    """The layer of a module of the package (``gpconv.layers`` is part of the core)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in ("core", "layers"):
        return "core"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def gpconv_imports(path: Path) -> set:
    """The ``gpconv`` modules (or module attributes) that the file at ``path`` imports, absolute names."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module[: -len(".__init__")]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.split(".")[0] == "gpconv")
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name.split(".")[0] == "gpconv":
                imported.add(name)
    return imported


def upward_imports() -> set:
    """``(module, imported)`` pairs of the package where a layer imports one it may not."""
    found = set()
    for path in sorted((ROOT / "gpconv").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
        if module == "gpconv":
            continue  # the public API imports core, models and export's entry point
        for name in gpconv_imports(path):
            if layer_of(name) not in ALLOWED_IMPORTS[layer_of(module)]:
                found.add((module, name))
    return found


def test_imports_follow_the_layers():
    found = upward_imports()
    unexpected, fixed = found - KNOWN_UPWARD_IMPORTS, KNOWN_UPWARD_IMPORTS - found
    assert not unexpected, "imports against docs/architecture.md's layers: " + ", ".join(
        f"{module} imports {name}" for module, name in sorted(unexpected))
    assert not fixed, f"no longer imported, remove from KNOWN_UPWARD_IMPORTS: {sorted(fixed)}"


def test_upward_imports_are_found():
    assert gpconv_imports(ROOT / "gpconv" / "core" / "block.py") >= {"gpconv.layers", "gpconv.core.plan"}
    assert "gpconv.models" in gpconv_imports(ROOT / "gpconv" / "models" / "__init__.py")
    assert layer_of("gpconv.layers") == layer_of("gpconv.core.plan") == "core"
    assert "core" not in ALLOWED_IMPORTS["io"] and "experiments" not in ALLOWED_IMPORTS["core"]
