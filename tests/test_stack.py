"""The installed stack, and the dependency rule: core maths imports no framework."""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_imports_no_framework():
    code = (
        "import sys, sgexp.models, sgexp.diffusion, sgexp.flops;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'mlflow', 'optuna') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "module",
    [
        "lightning",
        "hydra",
        "optuna",
        "mlflow",
        "webdataset",
        "cleanfid",
        "torchmetrics",
        "rich",
        "mlxtend.data",
        "sklearn",
        "plotly",
        "torchvision",
    ],
)
def test_stack_is_importable(module):
    importlib.import_module(module)


def test_installed_versions_match_constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version.strip()
    for package in ("torch", "torchvision", "lightning", "hydra-core", "optuna", "mlflow", "webdataset", "clean-fid"):
        assert importlib.metadata.version(package) == pins[package], package
