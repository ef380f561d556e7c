"""scale_weight_norms on LyCORIS' algorithms: after one max-norm pass, our module and LyCORIS 4.1.3's
(the oracle, its `apply_max_norm`) on the same weights report the same norm and make the same output.
A limit under the module's norm scales it; one over it leaves it as it was."""

import types

import pytest
import torch
from lycoris.modules.locon import LoConModule

import test_network_loha as loha_t
import test_network_lokr as lokr_t
import test_network_oft as oft_t
from lora_train.network.locon import LoCon
from lora_train.network.lora import LoRA
from lora_train.network.oft import DiagOFT
from lora_train.train import max_norm
from network_oracle import lyco_target, make_input, randomise, targets, with_module


def _locon(kind, dora=None):
    org, part = targets()[kind]
    theirs = LoConModule("lora_te_x", lyco_target(org, part), 1.0, lora_dim=4, alpha=3.0,
                         weight_decompose=dora is not None, wd_on_out=True if dora is None else dora)
    randomise(theirs, 1, magnitudes=("dora_scale",))
    ours = (LoCon if kind == "conv3x3" else LoRA)("lora_te_x", org, 4, 3.0, part=part)
    if dora is not None:
        ours.enable_dora(wd_on_out=dora)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, org, part


PAIRS = {
    "locon-linear": lambda: _locon("linear"),
    "locon-conv3x3": lambda: _locon("conv3x3"),
    "locon-dora-linear": lambda: _locon("linear", dora=False),
    "loha-linear": lambda: loha_t._pair("linear"),
    "loha-conv3x3-tucker": lambda: loha_t._pair("conv3x3", use_tucker=True),
    "lokr-linear": lambda: lokr_t._pair("linear", 4),
    "lokr-conv3x3": lambda: lokr_t._pair("conv3x3", 4, decompose_both=True),
    "diag-oft-linear": lambda: oft_t._pair(DiagOFT, "linear", 4),
}


@pytest.mark.parametrize("below", [True, False], ids=["scaled", "left"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_max_norm_is_lycoris_apply_max_norm(name, below):
    ours, theirs, org, part = PAIRS[name]()
    assert part is None
    with torch.no_grad():
        before = max_norm._tensor(ours).norm().item()
    limit = before * (0.4 if below else 1.5)
    scaled, their_norm = theirs.apply_max_norm(limit)
    stats = max_norm.apply(types.SimpleNamespace(lora_modules={"x": ours}), limit)
    assert bool(scaled) == below and float(stats["max_norm/keys_scaled"]) == float(below)
    assert float(stats["max_norm/max_key_norm"]) == pytest.approx(float(their_norm), rel=1e-5)
    assert float(stats["max_norm/max_key_norm"]) == pytest.approx(limit if below else before, rel=1e-5)
    x = make_input(org, 2, conv=(2, 5), seq=(3, 2), rows=(2, 3), dtype=next(org.parameters()).dtype)
    with torch.no_grad():
        assert torch.allclose(with_module(ours, org, x), theirs(x), atol=1e-5)


def test_algorithms_without_a_max_norm_are_named_and_left_alone(tiny_adapter, tmp_path):
    from lora_train.app import job
    from lora_train.errors import UserError

    from test_loop_options import config_for

    cfg = config_for(tmp_path, network_module="lycoris.kohya", network_args=["algo=ia3"], scale_weight_norms=1.0)
    with pytest.raises(UserError, match="IA3 modules have no max-norm"):
        job.build_trainer(cfg, tiny_adapter).run()
    cfg = config_for(tmp_path, network_module="lycoris.kohya", network_args=["algo=loha", "train_norm=True"], scale_weight_norms=1.0,
                     max_train_steps=1)
    trainer = job.build_trainer(cfg, tiny_adapter)
    trainer.run()
    norms = sum(m.algorithm == "Norm" for m in trainer.network.lora_modules.values())
    assert norms and [n for n in trainer.notes if "scale_weight_norms" in n] == [
        f"scale_weight_norms leaves the {norms} Norm modules alone (e.g. {next(iter(n for n, m in trainer.network.lora_modules.items() if m.algorithm == 'Norm'))}), as LyCORIS does"]
