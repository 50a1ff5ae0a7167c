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
