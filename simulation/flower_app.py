"""The Flower App directory that ``flwr run`` builds its FAB from.

The launcher submits the simulation apps as a Flower App: a directory with the
packages' Python files and a ``pyproject.toml`` declaring the components and the
run config (:data:`simulation.config.DEFAULTS`). It is written from the installed
packages, so it works from a source checkout and from a wheel alike.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from .config import DEFAULTS
from .superlink import toml_value

__all__ = ["COMPONENTS", "PACKAGES", "write_app_dir"]

#: The packages the apps import (copied into the app directory).
PACKAGES = ("flwr_invariant", "simulation", "baselines")
#: ``[tool.flwr.app.components]``: the same as in this repository's ``pyproject.toml``.
COMPONENTS = {"serverapp": "simulation.server_app:app", "clientapp": "simulation.client_app:app"}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def pyproject_text(clientapp: str = "") -> str:
    """The app's ``pyproject.toml``; ``clientapp`` replaces the ClientApp component."""
    try:
        version = metadata.version("flwr-invariant")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    components = {**COMPONENTS, **({"clientapp": clientapp} if clientapp else {})}
    lines = [
        "[project]",
        'name = "flwr-invariant"',
        f"version = {json.dumps(version)}",
        'description = "Invariant Aggregator backdoor experiments"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "flwr-invariant"',
        "",
        "[tool.flwr.app.components]",
        *(f"{key} = {json.dumps(value)}" for key, value in components.items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in DEFAULTS.items()),
    ]
    return "\n".join(lines) + "\n"


def write_app_dir(destination: Path, clientapp: str = "", extra_modules: Iterable[Path] = ()) -> Path:
    """Write the Flower App into ``destination``; returns it.

    ``clientapp``: another ``module:attribute`` ClientApp, e.g. from one of
    ``extra_modules`` (Python files copied to the app's top level).
    """
    destination.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        root = _package_dir(package)
        for source in root.rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            target = destination / package / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    (destination / "pyproject.toml").write_text(pyproject_text(clientapp), encoding="utf-8")
    for module in extra_modules:
        (destination / module.name).write_bytes(module.read_bytes())
    return destination
