"""Import layering, read from the source (AST, nothing is imported): the library never reaches up to the CLI.

Forbidden edges: a command module (train/commands/) → train/cli.py, which dispatches to them; parallel/ or
data_prep/ → train/; train/evaluate/ → a command module. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"train": "longtune.train", "parallel": "longtune.parallel", "data_prep": "longtune.data_prep"}

CLI = "longtune.train.cli"
COMMANDS = "longtune.train.commands"
TRAIN = "longtune.train"
EVALUATE = "longtune.train.evaluate"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    folder, *rest = path.relative_to(root).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, list[str]]]:
    """(line, candidates) for every import statement in `path`: `import X` → [X]; `from X import a` →
    [X, X.a] (a may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out.append((node.lineno, [source, *(f"{source}.{alias.name}" for alias in node.names)]))
    return out


def forbidden(importer: str, imported: str) -> str | None:
    """Why the edge importer → imported breaks the layering, or None."""
    if _within(importer, COMMANDS) and _within(imported, CLI):
        return "a command module imports the dispatcher"
    if (_within(importer, PACKAGES["parallel"]) or _within(importer, PACKAGES["data_prep"])) \
            and _within(imported, TRAIN):
        return "parallel/ and data_prep/ are below train/"
    if _within(importer, EVALUATE) and _within(imported, COMMANDS):
        return "the evaluation library imports a command module"
    return None


def layering_violations(root: Path = ROOT) -> list[str]:
    found = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            importer = module_name(path, root)
            for line, candidates in imported_modules(path, importer):
                for imported in candidates:
                    why = forbidden(importer, imported)
                    if why:
                        found.append(f"{path.relative_to(root)}:{line}: {importer} imports {imported} ({why})")
                        break
    return found


def test_no_import_reaches_up_a_layer():
    violations = layering_violations()
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_the_check_finds_each_kind_of_back_edge(tmp_path):
    planted = {
        "train/cli.py": "",
        "train/commands/__init__.py": "",
        "train/commands/eval.py": "from ..cli import COMMANDS\n",
        "train/commands/plan.py": "def main():\n    from longtune.train import cli\n",
        "train/evaluate/__init__.py": "",
        "train/evaluate/suite.py": "from ..commands import eval\n",
        "parallel/dims.py": "import longtune.train.recipe\n",
        "data_prep/cli.py": "from longtune.train.cli import main\n",
    }
    for name, text in planted.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(layering_violations(tmp_path))
    for where in ("train/commands/eval.py:1", "train/commands/plan.py:2", "train/evaluate/suite.py:1",
                  "parallel/dims.py:1", "data_prep/cli.py:1"):
        assert where in found, found
