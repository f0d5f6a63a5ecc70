"""The package keeps to the public extension points of Lightning, jsonargparse and Optuna.

Every use of another package's private member (an attribute ``x._name`` that the package does not
define itself, an import of a private name or module, an override of a base class's private method)
is listed here with the reason it is needed; a new one fails this test, and so does an upstream
release that drops one of these (the module-level imports fail first).
"""

import ast
import importlib
import inspect
from pathlib import Path

import fmnist_lightning

PACKAGE = Path(fmnist_lightning.__file__).parent
#: (file, what) -> why. Optuna's optimize() runs heartbeats and fails stale trials for storages that are
#: BaseHeartbeat, a class optuna exports under no public name; its journal storage lacks heartbeats.
ALLOWED = {
    ("studies/storage.py", "import from optuna.storages._heartbeat"): "the heartbeat interface of optimize()",
    ("studies/storage.py", "override BaseHeartbeat._get_stale_trial_ids"): "BaseHeartbeat's abstract hook",
}


def private_uses() -> set[tuple[str, str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    trees = {f: ast.parse(f.read_text()) for f in files}
    own: set[str] = set()  # every name the package defines: its own private members are its business
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
    uses = set()
    for file, tree in trees.items():
        name = file.relative_to(PACKAGE).as_posix()
        module = "fmnist_lightning." + name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("fmnist_lightning"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    uses.add((name, f"import from {node.module}"))
                uses |= {(name, f"import {a.name} from {node.module}") for a in node.names if a.name.startswith("_")}
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and node.attr not in own and not (isinstance(node.value, ast.Name) and node.value.id == "os"):
                uses.add((name, f"attribute .{node.attr}"))
            if isinstance(node, ast.ClassDef):
                cls = getattr(importlib.import_module(module), node.name)
                methods = [m for m in node.body if isinstance(m, ast.FunctionDef) and m.name.startswith("_")]
                for item in (m for m in methods if not m.name.startswith("__")):
                    for base in inspect.getmro(cls)[1:]:
                        if not base.__module__.startswith("fmnist_lightning") and item.name in vars(base):
                            uses.add((name, f"override {base.__name__}.{item.name}"))
                            break
    return uses


def test_private_members_of_other_packages_are_only_the_listed_ones():
    assert private_uses() == set(ALLOWED)
