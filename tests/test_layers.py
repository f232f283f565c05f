"""The layering of the top-level modules, which import-linter cannot check: it analyses
packages only (.importlinter holds the rules for handlers/ and supervisor/).

Every import counts, a late one inside a function too, and so do the imports of what a
module imports: the core must not reach the web through a module in between."""
import ast
import glob
import os

import pytest

from conftest import ROOT

OURS = ({os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))}
        | {os.path.basename(os.path.dirname(path))
           for path in glob.glob(os.path.join(ROOT, "*", "__init__.py"))})
CORE = ("jobs", "schedules", "audit", "auth")
WEB = {"app", "openapi", "documents"}


def imports(name):
    """Our modules and packages that the module or package `name` imports."""
    path = os.path.join(ROOT, f"{name}.py")
    files = [path] if os.path.exists(path) else glob.glob(
        os.path.join(ROOT, name, "**", "*.py"), recursive=True)
    found = set()
    for file in files:
        with open(file) as source:
            for node in ast.walk(ast.parse(source.read())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.partition(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    found.add(node.module.partition(".")[0])
    return (found & OURS) - {name}


def reachable(name):
    """Everything of ours that importing `name` may import, directly or through others."""
    seen, pending = set(), [name]
    while pending:
        for imported in imports(pending.pop()) - seen:
            seen.add(imported)
            pending.append(imported)
    return seen


def test_models_import_nothing_of_ours():
    assert imports("models") == set()


@pytest.mark.parametrize("module", CORE)
def test_core_reaches_no_web_cli_or_supervisor_module(module):
    assert reachable(module) & (WEB | {"cli", "supervisor"}) == set()
