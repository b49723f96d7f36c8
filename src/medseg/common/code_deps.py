"""Which source files a stage's code is: a module and every ``medseg`` module it imports, transitively, at module level
or inside functions, read from the source (nothing is imported or run).

One source for two consumers: ``dvc.yaml``'s code deps (``tests/test_dvc_deps.py`` derives each stage's closure and
compares it with the stage's deps, so an edit to any module a stage runs makes ``dvc repro`` rerun it) and the code
part of train's resume digest (:func:`medseg.training.resume.training_code`).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection
from pathlib import Path

__all__ = ["module_closure", "PACKAGE_ROOT"]

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds medseg/ (src/ in a checkout)


def module_file(name: str) -> Path | None:
    """``medseg.x.y`` -> its file (a module, or a package's ``__init__.py``); None if it is not a module."""
    path = PACKAGE_ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


@functools.cache
def _imports(path: Path) -> frozenset[str]:
    """Every ``medseg`` module the file at ``path`` imports, anywhere in it, absolute or relative."""
    dotted = ".".join(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    package = dotted.removesuffix(".__init__") if path.name == "__init__.py" else dotted.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from medseg import plots`
    return frozenset(name for name in found if name.split(".")[0] == "medseg" and module_file(name))


def module_closure(module: str, stop: Collection[str] = ()) -> list[str]:
    """Files of ``module`` and of everything it imports within ``medseg``, transitively, as sorted paths relative to
    :data:`PACKAGE_ROOT` (``medseg/training/train.py``). Importing ``medseg.a.b`` runs ``medseg/a/__init__.py`` too. Modules in
    ``stop`` are not followed (neither they nor what only they import are in the result). The top-level
    ``medseg/__init__.py`` (a version string) is left out."""
    top = PACKAGE_ROOT / "medseg" / "__init__.py"
    todo, seen = [module], set()
    while todo:
        parts = todo.pop().split(".")
        for depth in range(2, len(parts) + 1):
            name = ".".join(parts[:depth])
            path = module_file(name)
            if path is None or path in seen or name in stop:
                continue
            seen.add(path)
            todo += sorted(_imports(path))
    return sorted(p.relative_to(PACKAGE_ROOT).as_posix() for p in seen if p != top)


def dvc_deps(module: str, prefix: str = "src/") -> list[str]:
    """:func:`module_closure` as ``dvc.yaml`` deps: ``src/medseg/x.py``, with a package folder in one entry
    (``src/medseg/ingest``) when the closure holds every module of it."""
    files = module_closure(module)
    packages = sorted({f.rpartition("/")[0] for f in files} - {"medseg"})
    whole = [p for p in packages
             if {q.relative_to(PACKAGE_ROOT).as_posix() for q in (PACKAGE_ROOT / p).rglob("*.py")} <= set(files)]
    return [prefix + p for p in whole] + [prefix + f for f in files if f.rpartition("/")[0] not in whole]


if __name__ == "__main__":  # python -m medseg.common.code_deps medseg.training.train ...: the deps lines each stage needs
    import sys

    for name in sys.argv[1:]:
        print(f"{name}:", *(f"  - {dep}" for dep in dvc_deps(name)), sep="\n")
