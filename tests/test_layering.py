"""conan_core is the library: importing all of it must not import Prefect."""

import pkgutil
import subprocess
import sys

import conan_core


def test_conan_core_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(conan_core.__path__, "conan_core.")]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
            "print(bad[:5]); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_io_readers_never_imports_the_catalog():
    """The catalog reads with the readers, never the other way (no import circle, not even a lazy one)."""
    import ast
    from pathlib import Path

    import conan_core.io.readers as readers

    tree = ast.parse(Path(readers.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith("conan_core.io.catalog") for name in imported), imported
