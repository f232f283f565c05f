"""The layering of the top-level modules, which import-linter cannot check: it analyses
packages only (.importlinter holds the rules for the packages: core, web, cli, infra,
handlers, supervisor).

Every import counts, a late one inside a function too, and so do the imports of what a
module imports."""
import ast
import configparser
import glob
import os


from conftest import ROOT

OURS = ({os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))}
        | {os.path.basename(os.path.dirname(path))
           for path in glob.glob(os.path.join(ROOT, "*", "__init__.py"))})
# The modules the product fixes at the top, beside the packages: the Flask app (which may
# import anything of ours), the models (nothing), the HTTP client users copy (nothing, so
# it runs anywhere) and gunicorn's configuration.
TOP_LEVEL = {"app", "models", "client", "gunicorn.conf"}


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


def test_the_client_imports_nothing_of_ours():
    assert imports("client") == set()


def test_every_package_of_ours_is_under_the_import_contracts():
    """A new package must be named in .importlinter, or no contract would ever see it."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, ".importlinter"))
    checked = set(config["importlinter"]["root_packages"].split())
    packages = OURS - {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))}
    assert packages - {"bench"} == checked
    assert OURS - packages <= TOP_LEVEL
