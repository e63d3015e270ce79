"""realtime/ is a house of parts, each importing only the parts below it
(README, "The parts"). Read from the source, so a new import that crosses
the line fails here before anyone builds on it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "realtime"

# Django's own names stay at the top of the app.
DJANGO_MODULES = {"__init__", "apps", "models", "admin"}
DJANGO_PACKAGES = {"migrations", "management", "templates"}

# What each part may import, lowest first: the README's table. ``models``
# is Django's, and any part may read it.
MAY_IMPORT: dict[str, set[str]] = {
    "models": set(),
    "store": {"models"},
    "services": {"store"},
    "fanout": {"store"},
    "tools": {"store", "services"},
    "turns": {"store", "services", "fanout", "tools"},
    "rpc": {"store", "services", "fanout", "tools", "turns"},
    "lifecycle": {"store", "services", "fanout", "tools", "turns", "rpc"},
    "transport": {"rpc", "lifecycle"},
    "admin": {"models"},
    "apps": set(),
    "management": {"rpc"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(inner) for inner in ast.walk(node))
    return hidden


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports at run time: at the top or inside a
    function, never under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    hidden = _type_checking_nodes(tree)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _part(module: str) -> str | None:
    names = module.split(".")
    return names[1] if names[0] == "realtime" and len(names) > 1 else None


def _sources() -> list[Path]:
    return [path for path in APP.rglob("*.py") if "migrations" not in path.relative_to(APP).parts]


def _part_imports() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) → the importing modules."""
    crossings: dict[tuple[str, str], list[str]] = {}
    for path in _sources():
        module = _module_name(path)
        source_part = _part(module)
        for imported in _imported_modules(path):
            target_part = _part(imported)
            if source_part and target_part and target_part != source_part:
                crossings.setdefault((source_part, target_part), []).append(module)
    return crossings


def test_realtime_holds_only_djangos_modules_and_its_parts():
    loose = sorted(path.stem for path in APP.glob("*.py") if path.stem not in DJANGO_MODULES)
    assert loose == []
    parts = {path.parent.name for path in APP.glob("*/__init__.py")} - DJANGO_PACKAGES
    assert len(parts) >= 5
    assert parts <= MAY_IMPORT.keys(), f"a part the layering does not name: {parts - MAY_IMPORT.keys()}"


def test_each_part_imports_only_the_parts_below_it():
    forbidden = {
        f"{source} imports {target} (in {', '.join(sorted(set(modules)))})"
        for (source, target), modules in _part_imports().items()
        if target not in MAY_IMPORT[source]
    }
    assert forbidden == set()


def test_the_parts_import_no_circle():
    """The allowed imports form no circle, so neither can the real ones."""
    order: list[str] = []
    remaining = {part: set(below) for part, below in MAY_IMPORT.items()}
    while remaining:
        ready = sorted(part for part, below in remaining.items() if below <= set(order))
        assert ready, f"a circle among {sorted(remaining)}"
        order.extend(ready)
        for part in ready:
            del remaining[part]


def test_identitys_core_imports_nothing_from_realtime():
    core = ["client_identity", "policy", "headers", "header_values", "scope", "http_clients"]
    for name in core:
        imported = _imported_modules(ROOT / "identity" / f"{name}.py")
        assert not any(module.split(".")[0] == "realtime" for module in imported), name
