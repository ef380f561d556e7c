"""install.py, run the way the WebUI runs it, against a stand-in for the host's `launch` module."""

import importlib.metadata
import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"
HOST_PACKAGES = ("torch", "transformers", "gradio", "protobuf", "numpy", "safetensors", "accelerate")


@pytest.fixture
def pip_calls(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda args, desc: calls.append(args)))
    return calls


def test_installs_only_what_is_missing_without_deps(pip_calls, monkeypatch):
    real = importlib.metadata.distribution
    absent = {"prodigyopt", "lion-pytorch"}

    def distribution(name):
        if name in absent:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    runpy.run_path(str(INSTALL))
    assert pip_calls == ['install --no-deps "lion-pytorch==0.2.5"', 'install --no-deps "prodigyopt==1.1.2"']


def test_nothing_to_do_when_everything_is_there(pip_calls):
    runpy.run_path(str(INSTALL))  # this venv has every package already
    assert pip_calls == []


def test_every_requirement_is_pinned_and_none_is_the_hosts(pip_calls):
    packages = runpy.run_path(str(INSTALL))["PACKAGES"]
    assert packages
    for dist, requirement in packages:
        assert requirement.startswith(dist + "==")
        assert dist not in HOST_PACKAGES
