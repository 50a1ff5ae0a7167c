"""The Flower app declared in pyproject.toml matches the code."""

import importlib
import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from simulation.config import DEFAULTS, resolve_config

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
APP = PYPROJECT["tool"]["flwr"]["app"]


def test_run_config_mirrors_the_defaults():
    assert APP["config"] == DEFAULTS
    assert resolve_config(APP["config"])["task"] == "linear"  # the documented `flwr run .` experiment


def test_components_are_flower_apps():
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, _, name = APP["components"][key].partition(":")
        assert isinstance(getattr(importlib.import_module(module), name), kind)


def test_server_side_data_sizes_are_validated() -> None:
    for key in ("fltrust-root-size", "deepsight-probe-size"):
        with pytest.raises(ValueError, match=key):
            resolve_config({key: 0})


def test_crfl_settings_are_validated() -> None:
    for key, bad in (
        ("crfl-sigma", 0.0),
        ("crfl-clip-start", -1.0),
        ("crfl-clip-max", 0.0),
        ("crfl-clip-growth", -0.1),
    ):
        with pytest.raises(ValueError, match=key):
            resolve_config({key: bad})


def test_the_app_bundle_leaves_the_results_out_and_fits_flowers_limit() -> None:
    import io
    import zipfile

    from flwr.cli import build
    from flwr.common.constant import FAB_MAX_SIZE

    root = Path(__file__).parents[1]
    if hasattr(build, "build_fab_from_disk"):  # a Flower that reads `fab-exclude` (flwr 1.2x: build_fab)
        bundle = build.build_fab_from_disk(root)
        names = zipfile.ZipFile(io.BytesIO(bundle)).namelist()
        assert not [name for name in names if name.startswith("docs/")]  # run outputs are no part of the app
    else:
        bundle = build.build_fab(root)[0]
        names = zipfile.ZipFile(io.BytesIO(bundle)).namelist()
    assert "simulation/server_app.py" in names and "flwr_invariant/strategy.py" in names
    assert len(bundle) < FAB_MAX_SIZE / 4, (
        f"the FAB is {len(bundle):,} bytes; Flower refuses over {FAB_MAX_SIZE:,}"
    )
