"""The `conan` command. Each command group lives in its own `conan_cli/*_cmd.py` module, which
adds its commands to `app` when imported; `_register` imports them all."""

from __future__ import annotations

import importlib
import pkgutil

import typer

from conan_core.paths import offline_env

offline_env()

app = typer.Typer(help="conan: Conan-embedding training pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _register() -> None:
    import conan_cli

    for module in sorted(pkgutil.iter_modules(conan_cli.__path__), key=lambda m: m.name):
        if module.name.endswith("_cmd"):
            importlib.import_module(f"conan_cli.{module.name}")


_register()
