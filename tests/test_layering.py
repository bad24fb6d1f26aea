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
