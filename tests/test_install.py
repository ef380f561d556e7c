"""install.py, run the way the WebUI runs it (as __main__, in a process where `import launch` gives the
host's launch module), against a stand-in for that module and a fake package index."""

import importlib.metadata
import importlib.util
import re
import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"
HOST_PACKAGES = ("torch", "torchvision", "transformers", "gradio", "protobuf", "numpy", "safetensors", "accelerate")
NEVER = ("torch", "torchvision", "transformers", "gradio", "protobuf")


def load():
    """install.py as a module, without running main()."""
    spec = importlib.util.spec_from_file_location("lora_train_install", INSTALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run():
    runpy.run_path(str(INSTALL), run_name="__main__")


def pip_name(args: str) -> str:
    m = re.fullmatch(r'install --no-deps "([A-Za-z0-9_.-]+)==[^"]+"', args)
    assert m, f"unexpected pip call: {args}"
    return m.group(1)


class FakeLaunch(types.ModuleType):
    """The parts of A1111's `launch` module install.py may use."""

    def __init__(self, installed=None, skip_install=False):
        super().__init__("launch")
        self.args = types.SimpleNamespace(skip_install=skip_install)
        self.calls: list[str] = []
        self.installed = installed  # when a set, run_pip "installs" into it

    def run_pip(self, command, desc=None, live=False):
        self.calls.append(command)
        if self.installed is not None:
            self.installed.add(pip_name(command))

    def is_installed(self, package):
        return self.installed is None or package in self.installed


@pytest.fixture
def launch(monkeypatch):
    fake = FakeLaunch()
    monkeypatch.setitem(sys.modules, "launch", fake)
    return fake


@pytest.fixture
def cuda(monkeypatch):
    """Set torch's answer to torch.cuda.is_available(); None = torch does not even import."""
    import torch

    def set_to(value):
        if value is None:
            monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
        else:
            monkeypatch.setitem(sys.modules, "torch", torch)
            monkeypatch.setattr(torch.cuda, "is_available", lambda: value)

    set_to(False)
    return set_to


def fake_index(monkeypatch, absent):
    """importlib.metadata.distribution that knows nothing of `absent` (a set run_pip may fill back)."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name in absent:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def fake_venv(monkeypatch, installed):
    """importlib.metadata.distribution that knows only `installed` (a set run_pip may add to)."""

    def distribution(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_installs_only_what_is_missing_without_deps(launch, cuda, monkeypatch):
    fake_index(monkeypatch, {"prodigyopt", "lion-pytorch"})
    run()
    assert launch.calls == ['install --no-deps "lion-pytorch==0.2.5"', 'install --no-deps "prodigyopt==1.1.2"']


@pytest.mark.parametrize("present, expected", [
    (set(), ['install --no-deps "onnxruntime==1.17.3"']),
    ({"onnxruntime-gpu"}, []),  # never the CPU wheel beside a GPU build
    ({"onnxruntime-directml"}, []),
    ({"onnxruntime"}, []),
])
def test_onnxruntime_only_when_no_build_of_it_is_there(launch, cuda, monkeypatch, present, expected):
    variants = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon", "onnxruntime-openvino"}
    fake_index(monkeypatch, variants - present)
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: types.SimpleNamespace(name=name) if name in present else real(name))
    run()
    assert launch.calls == expected


def test_nothing_to_do_when_everything_is_there(launch, cuda):
    run()  # this venv has every package (bitsandbytes aside: no CUDA here)
    assert launch.calls == []


def test_nothing_to_do_with_cuda_when_everything_is_there(launch, cuda, monkeypatch):
    cuda(True)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: types.SimpleNamespace(name=name))
    run()
    assert launch.calls == []


def test_every_requirement_is_pinned_and_none_is_the_hosts(launch):
    module = load()
    assert module.PACKAGES and module.CUDA_PACKAGES
    for dist, requirement in module.PACKAGES + module.CUDA_PACKAGES:
        assert requirement.startswith(dist + "==")
        assert dist not in HOST_PACKAGES
        assert module.requirement_name(requirement) not in NEVER
    assert set(NEVER) <= module.HOST_OWNED
    assert launch.calls == []  # loading the file (not as __main__) installs nothing


@pytest.mark.parametrize("has_cuda, expected", [(True, ["bitsandbytes"]), (False, []), (None, [])])
def test_bitsandbytes_only_where_cuda_exists(launch, cuda, monkeypatch, has_cuda, expected):
    cuda(has_cuda)
    fake_index(monkeypatch, {"bitsandbytes"})
    run()
    assert [pip_name(c) for c in launch.calls] == expected
    assert all(c.startswith("install --no-deps ") for c in launch.calls)
    if expected:
        assert launch.calls == ['install --no-deps "bitsandbytes==0.43.3"']


def test_torch_is_not_imported_when_bitsandbytes_is_there(launch, monkeypatch):
    fake_index(monkeypatch, set())
    module = load()
    monkeypatch.setattr(module, "cuda_available", lambda: pytest.fail("asked torch about CUDA for nothing"))
    monkeypatch.setattr(module, "missing", lambda dist: False)
    assert module.main() == []


@pytest.mark.parametrize("has_cuda", [True, False])
def test_idempotent_from_an_empty_venv(cuda, monkeypatch, has_cuda):
    cuda(has_cuda)
    installed: set[str] = set()  # nothing of ours yet
    fake = FakeLaunch(installed)  # its run_pip installs into the fake venv
    monkeypatch.setitem(sys.modules, "launch", fake)
    fake_venv(monkeypatch, installed)
    module = load()

    run()
    first = [pip_name(c) for c in fake.calls]
    expected = {dist for dist, _ in module.PACKAGES} | {"onnxruntime"} | ({"bitsandbytes"} if has_cuda else set())
    assert set(first) == expected and len(first) == len(expected)
    assert all(c.startswith("install --no-deps ") for c in fake.calls)
    assert installed == expected

    fake.calls.clear()
    run()  # the next WebUI start
    assert fake.calls == []
    assert installed == expected


@pytest.mark.parametrize("how", ["argv", "launch.args"])
def test_skip_install_does_nothing(cuda, monkeypatch, how):
    cuda(True)
    fake = FakeLaunch(skip_install=how == "launch.args")
    monkeypatch.setitem(sys.modules, "launch", fake)
    if how == "argv":
        monkeypatch.setattr(sys, "argv", [str(INSTALL), "--skip-install"])
    module = load()
    fake_index(monkeypatch, {dist for dist, _ in module.PACKAGES + module.CUDA_PACKAGES})
    run()
    assert fake.calls == []


def test_a_host_package_can_never_reach_pip(launch, cuda, monkeypatch):
    cuda(True)
    module = load()
    sneaky = [("torch", "torch==2.3.0"), ("torchvision", "torchvision"), ("transformers", "Transformers>=4.30"),
              ("gradio", "gradio[oauth]==4.0"), ("protobuf", "protobuf ~= 4.25"), ("gradio-client", "gradio_client==1.0")]
    monkeypatch.setattr(module, "PACKAGES", module.PACKAGES + sneaky)
    monkeypatch.setattr(module, "CUDA_PACKAGES", module.CUDA_PACKAGES + [("torch", "torch==2.3.0+cu121")])
    fake_index(monkeypatch, {dist for dist, _ in module.PACKAGES + module.CUDA_PACKAGES})
    installed = module.main()
    assert installed and launch.calls
    for call in launch.calls:
        assert module.requirement_name(pip_name(call)) not in NEVER
        assert not any(re.search(rf'"{name}\b', call, re.I) for name in NEVER), call


def test_one_failing_package_does_not_stop_the_others(cuda, monkeypatch):
    cuda(True)

    class Failing(FakeLaunch):
        def run_pip(self, command, desc=None, live=False):
            self.calls.append(command)
            if "bitsandbytes" in command or "lion" in command:
                raise RuntimeError(f"Couldn't install {desc}")

    fake = Failing()
    monkeypatch.setitem(sys.modules, "launch", fake)
    module = load()
    fake_index(monkeypatch, {"lion-pytorch", "prodigyopt", "bitsandbytes"})
    with pytest.raises(RuntimeError, match="lion-pytorch==0.2.5, bitsandbytes==0.43.3"):
        module.main()
    assert [pip_name(c) for c in fake.calls] == ["lion-pytorch", "prodigyopt", "bitsandbytes"]


def test_requirement_names():
    module = load()
    assert module.requirement_name("Torch==2.1") == "torch"
    assert module.requirement_name("gradio[oauth]>=3") == "gradio"
    assert module.requirement_name("gradio_client") == "gradio-client"
    assert module.requirement_name("protobuf ~= 3.20") == "protobuf"
    assert module.requirement_name("torch @ https://x/torch.whl") == "torch"
    assert module.requirement_name("lion-pytorch==0.2.5") == "lion-pytorch"
