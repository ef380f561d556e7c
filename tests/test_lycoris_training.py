"""Training every LyCORIS algorithm on the tiny model (network_module = "lycoris.kohya", algo=... in
network_args): the host model comes back bit-identical, the file holds for every module exactly the
keys and shapes LyCORIS' own module class has for that layer, its metadata is what sd-scripts writes
for LyCORIS, and the file loads back into the network that was trained."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import assert_same_as, make_dataset, snapshot
from torch import nn

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.network.files import load_lora
from lora_train.network.network import network_from_file
from lora_train.train.config import TrainConfig

lycoris_wrapper = pytest.importorskip("lycoris.wrapper", reason="lycoris-lora is the reference (requirements-dev.txt)")

RUNS = {
    # id: network_args
    "locon": ["algo=locon"],
    "loha": ["algo=loha", "use_tucker=True"],
    "lokr": ["algo=lokr", "factor=4"],
    "ia3": ["algo=ia3", "preset=ia3"],
    "full": ["algo=full", "preset=attn-mlp"],
    "glora": ["algo=glora", "preset=attn-only"],
    "diag-oft": ["algo=diag-oft", "constraint=0.5", "rescaled=True"],
    "boft": ["algo=boft", "preset=unet-transformer-only"],
    "dora-lora": ["algo=lora", "dora_wd=True"],
    "dora-loha": ["algo=loha", "dora_wd=True", "preset=unet-convblock-only"],
    "dora-lokr": ["algo=lokr", "dora_wd=True", "wd_on_output=True"],
    "dylora": ["algo=dylora", "block_size=2"],
    "norm": ["algo=loha", "train_norm=True", "preset=attn-mlp"],
}


GLORA_SWAP = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lyco") / "data", count=2, repeats=1)


def _config(tmp_path, data, args, **extra) -> TrainConfig:
    return TrainConfig().update({
        "train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "lyco", "resolution": "64",
        "network_module": "lycoris.kohya", "network_args": args, "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-2,
        "max_train_steps": 1, "train_batch_size": 2, "seed": 5, **extra})


def _layer_like(target: nn.Module) -> nn.Module:
    """A standalone layer with the target's shape, for LyCORIS' module to wrap."""
    if isinstance(target, nn.Conv2d):
        return nn.Conv2d(target.in_channels, target.out_channels, target.kernel_size, target.stride, target.padding,
                         bias=target.bias is not None)
    return nn.Linear(target.in_features, target.out_features, bias=target.bias is not None)


def _lycoris_keys(algo: str, name: str, target: nn.Module, options: dict) -> dict[str, tuple]:
    if isinstance(target, (nn.LayerNorm, nn.GroupNorm)):  # train_norm: LyCORIS' NormModule whatever the algo
        from lycoris.modules.norms import NormModule

        return {k: tuple(v.shape) for k, v in NormModule(name, target, 1.0).state_dict().items()}
    cls = lycoris_wrapper.network_module_dict[algo]
    accepted = inspect.signature(cls.__init__).parameters
    module = cls(name, _layer_like(target), 1.0, **{k: v for k, v in options.items() if k in accepted})
    keys = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if algo == "dylora" and isinstance(target, nn.Conv2d):  # LyCORIS writes a conv's lora_up 2-D; sd-scripts and we (out, rank, 1, 1)
        keys["lora_up.weight"] += (1, 1)
    return keys


@pytest.mark.parametrize("run", list(RUNS))
def test_each_algorithm_trains_and_writes_what_lycoris_writes(run, tiny_adapter, tiny_model, dataset, tmp_path):
    args = RUNS[run]
    before = snapshot(tiny_model)
    trainer = job.build_trainer(_config(tmp_path, dataset, args), tiny_adapter)
    path = trainer.run()
    assert_same_as(tiny_model, before)
    tensors, md = load_lora(path)
    recorded = json.loads(md["ss_network_args"])
    algo = recorded["algo"]
    assert md["ss_network_module"] == "lycoris.kohya" and algo == args[0].split("=")[1]
    assert ("dora_wd=True" in args) == (recorded.get("dora_wd") == "True")

    targets = {t.name: t.module for t in tiny_adapter.file_targets()}
    modules = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tuple(value.shape)
    assert modules and set(modules) <= set(targets)
    convs = [n for n in modules if isinstance(targets[n], nn.Conv2d) and targets[n].kernel_size != (1, 1)]
    assert ("conv_dim" in recorded) == bool(convs), "conv_dim is recorded when the preset trained 3x3 convs"
    for name, keys in modules.items():
        target = targets[name]
        conv3x3 = isinstance(target, nn.Conv2d) and target.kernel_size != (1, 1)
        options = {"lora_dim": int(recorded["conv_dim"]) if conv3x3 else 4,
                   "alpha": float(recorded["conv_alpha"]) if conv3x3 else 2.0,
                   "use_tucker": "use_tucker=True" in args, "factor": 4 if run == "lokr" else -1,
                   "weight_decompose": "dora_wd=True" in args, "wd_on_out": recorded.get("wd_on_output") == "True",
                   "constraint": 0.5 if run == "diag-oft" else 0, "rescaled": run == "diag-oft",
                   "train_on_input": run == "ia3" and name.endswith(("_ff_net_2", "_mlp_fc2")),
                   "block_size": 2}
        want = _lycoris_keys(algo, name, target, options)
        if algo == "glora":  # A1111 v1.10 reads LyCORIS 2.x's names, which LyCORIS 3+ swapped (network/glora.py)
            want = {GLORA_SWAP.get(k, k): v for k, v in want.items()}
        assert keys == want, name

    trained = trainer.network
    rebuilt = network_from_file(path, tiny_adapter.file_targets())
    assert set(rebuilt.lora_modules) == set(trained.lora_modules)
    moved = 0.0
    for name, module in trained.lora_modules.items():
        if module.algorithm == "DyLoRA":  # its files are LoRA / LoCon: what it trains, any tool loads
            assert rebuilt.lora_modules[name].algorithm in ("LoRA", "LoCon")
            module.eval()  # the full rank, as the file holds it
        else:
            assert type(rebuilt.lora_modules[name]) is type(module)
        assert torch.allclose(rebuilt.lora_modules[name].delta(), module.delta(), atol=1e-6), name
        moved = max(moved, float(module.delta().detach().abs().max()))
    assert moved > 0, "one step at lr 1e-2 changes the weights"


def test_dora_resumes_exactly(tiny_adapter, dataset, tmp_path):
    """DoRA's magnitude and LoKr's factors go through the state like LoRA's: two steps == one + one resumed."""
    args = ["algo=lokr", "dora_wd=True"]
    full = job.build_trainer(_config(tmp_path / "a", dataset, args, max_train_steps=2), tiny_adapter).run()
    first = job.build_trainer(_config(tmp_path / "b", dataset, args, max_train_steps=1, save_state=True), tiny_adapter).run()
    resumed = job.build_trainer(_config(tmp_path / "b", dataset, args, max_train_steps=2, resume=str(first.with_name("lyco-state")),
                                        output_name="resumed"), tiny_adapter).run()
    a, b = load_lora(full)[0], load_lora(resumed)[0]
    assert a.keys() == b.keys() and any(k.endswith("dora_scale") for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("args,says", [
    (["algo=lycoris_magic"], "network_args algo 'lycoris_magic' is not one LoRA Train trains"),
    (["algo=loha", "preset=attn_mlp"], "did you mean 'attn-mlp'"),
    (["algo=boft", "preset=unet-transformer-only"], None),  # fine on the tiny model: its channel counts split
])
def test_bad_algorithms_and_presets_are_refused_with_the_reason(args, says, tiny_adapter, dataset, tmp_path):
    if says is None:
        job.build_network(_config(tmp_path, dataset, args), tiny_adapter, seed=0)
        return
    with pytest.raises(UserError, match=says):
        job.build_network(_config(tmp_path, dataset, args), tiny_adapter, seed=0)


def test_lycoris_options_need_the_lycoris_module(tiny_adapter, dataset, tmp_path):
    cfg = _config(tmp_path, dataset, ["algo=loha"], network_module="networks.lora")
    with pytest.raises(UserError, match='set network_module = "lycoris.kohya"'):
        job.build_network(cfg, tiny_adapter, seed=0)


def test_a_file_with_a_wrong_shape_or_a_missing_part_names_module_and_key(tiny_adapter, dataset, tmp_path):
    from safetensors.torch import save_file

    path = job.build_trainer(_config(tmp_path, dataset, ["algo=loha"]), tiny_adapter).run()
    tensors, md = load_lora(path)
    key = next(k for k in tensors if k.endswith(".hada_w1_b"))
    module = key.split(".")[0]
    targets = tiny_adapter.lora_targets(conv=True)
    wrong = dict(tensors, **{key: torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])})
    save_file(wrong, str(tmp_path / "wrong.safetensors"), md)
    with pytest.raises(UserError, match=rf"{module}\.hada_w[12]_[ab]: shape"):
        network_from_file(tmp_path / "wrong.safetensors", targets)
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, str(tmp_path / "missing.safetensors"), md)
    with pytest.raises(UserError, match=rf"{module}: hada_w1_b missing"):
        network_from_file(tmp_path / "missing.safetensors", targets)


def test_config_from_the_file_trains_the_same_network(tiny_adapter, dataset, tmp_path):
    """config-from-lora: the file's ss_network_args give back the module, algorithm and DoRA (with
    the direction of its norm), so retraining from the recovered config writes the same keys."""
    from lora_train.network.kind import network_kind
    from lora_train.train.from_metadata import config_from_metadata

    path = job.build_trainer(_config(tmp_path, dataset, ["algo=lokr", "factor=4", "dora_wd=True"]), tiny_adapter).run()
    tensors, md = load_lora(path)
    recovered, _notes = config_from_metadata(md)
    kind = network_kind(recovered.network)
    assert (kind.module, kind.algo, kind.dora, kind.wd_on_out, kind.options.get("factor")) == ("lycoris.kohya", "lokr", True, False, 4)
    recovered.update({"train_data_dir": str(dataset), "output_dir": str(tmp_path / "again"), "max_train_steps": 1,
                      "pretrained_model_name_or_path": None})
    again = job.build_trainer(recovered, tiny_adapter).run()
    assert {k: v.shape for k, v in load_lora(again)[0].items()} == {k: v.shape for k, v in tensors.items()}


def test_ia3_on_convolutions_says_a1111_cannot_apply_them(tiny_adapter, dataset, tmp_path):
    trainer = job.build_trainer(_config(tmp_path, dataset, ["algo=ia3"]), tiny_adapter)  # preset full: convs too
    trainer.run()
    assert any("A1111 v1.10 cannot apply" in n for n in trainer.notes), trainer.notes
    quiet = job.build_trainer(_config(tmp_path / "b", dataset, ["algo=ia3", "preset=ia3"]), tiny_adapter)
    quiet.run()
    assert not any("A1111 v1.10 cannot apply" in n for n in quiet.notes)


def test_sd_scripts_dylora_writes_a_lora_with_its_unit(tiny_adapter, dataset, tmp_path):
    cfg = _config(tmp_path, dataset, ["unit=2"], network_module="networks.dylora", max_train_steps=2)
    trainer = job.build_trainer(cfg, tiny_adapter)
    path = trainer.run()
    tensors, md = load_lora(path)
    assert md["ss_network_module"] == "networks.dylora" and json.loads(md["ss_network_args"]) == {"unit": "2"}
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert {type(m).__name__ for m in trainer.network.lora_modules.values()} == {"DyLoRA"}
