"""kohya_ss GUI JSON, lora-scripts TOML and `train --dry-run`.

Expected values come from what kohya_ss' `train_model` and lora-scripts' GUI pass to sd-scripts
(read in their sources), worked out by hand for the small configs here: tests/fixtures/kohya_ss_lokr.json
is written for these tests in kohya_ss' format, not copied from it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import tomllib

from conftest import make_dataset
from lora_train.cli import main
from lora_train.errors import UserError
from lora_train.train.config import TrainConfig

KOHYA = Path(__file__).parent / "fixtures" / "kohya_ss_lokr.json"


def _write_json(tmp_path: Path, data: dict, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_kohya_ss_json_reads_as_kohya_ss_passes_it():
    config = TrainConfig.from_file(KOHYA)
    n, o, t = config.network, config.optimizer, config.training
    # LoRA_type LyCORIS/LoKr: lycoris.kohya with algo=lokr and the LoKr fields in network_args
    assert (n.network_module, n.algo, n.preset, n.factor, n.use_tucker) == ("lycoris.kohya", "lokr", "attn-only", 4, False)
    assert (n.conv_dim, n.conv_alpha, n.network_dim, n.network_alpha) == (1, 1.0, 8, 4.0)
    assert n.train_on_input is False  # an iA3 field: kohya_ss does not pass it for LoKr
    assert config.dataset.resolution == "64,64"  # max_resolution
    assert (t.max_train_epochs, t.max_train_steps) == (3, 1600)  # epoch, with max_train_steps 0 (unset)
    assert o.optimizer_type == "AdamW" and o.optimizer_args == ["weight_decay=0.05", "betas=(0.9,0.98)"]
    # text_encoder_lr 0 with unet_lr set: UNet only
    assert n.network_train_unet_only and not n.network_train_text_encoder_only
    assert (o.learning_rate, o.unet_lr, o.text_encoder_lr) == (0.001, 0.002, None)
    assert o.lr_scheduler_num_cycles == 3  # empty: kohya_ss passes the epoch count
    assert o.lr_warmup_steps == pytest.approx(0.1)  # 10 %
    assert o.max_grad_norm == 1.0  # kohya_ss drops a 0, so sd-scripts' default holds
    assert (t.multires_noise_iterations, t.multires_noise_discount, t.noise_offset) == (6, 0.3, None)
    assert t.seed == 7 and config.dataset.caption_extension == ".txt"  # additional_parameters
    assert config.sampling.sample_prompts is None  # sampling is off
    notes = "\n".join(config.notes)
    for said in ("noise_offset=0.1: not used with noise_offset_type Multires", "train_on_input=True: not used with LoRA_type",
                 "model_list, save_as_bool, num_cpu_threads_per_process: settings of the kohya_ss GUI",
                 "1 fields of other model families", "sample_prompts: not used", "sdpa: what LoRA Train always does"):
        assert said in notes, notes


def test_kohya_ss_lora_types(tmp_path):
    base = {"learning_rate": 1e-4, "conv_dim": 8, "conv_alpha": 2, "unit": 4, "constrain": 1e-3, "rescaled": True}
    cases = {
        "Standard": ("networks.lora", None, None),  # conv_dim is not passed: plain LoRA
        "Kohya LoCon": ("networks.lora", None, 8),
        "Kohya DyLoRA": ("networks.dylora", None, 8),
        "LyCORIS/LoCon": ("lycoris.kohya", "locon", 8),
        "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft", 8),
        "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full", None),
    }
    for lora_type, (module, algo, conv_dim) in cases.items():
        config = TrainConfig.from_file(_write_json(tmp_path, {**base, "LoRA_type": lora_type}))
        n = config.network
        assert (n.network_module, n.algo, n.conv_dim) == (module, algo, conv_dim), lora_type
    assert TrainConfig.from_file(_write_json(tmp_path, {**base, "LoRA_type": "Kohya DyLoRA"})).network.unit == 4
    oft = TrainConfig.from_file(_write_json(tmp_path, {**base, "LoRA_type": "LyCORIS/Diag-OFT"})).network
    assert (oft.constraint, oft.rescaled) == (1e-3, True)


@pytest.mark.parametrize("data, says", [
    ({"LoRA_type": "Flux1", "learning_rate": 1e-4}, "a config for Flux.1: LoRA Train trains SD1.x, SD2.x and SDXL LoRAs only"),
    ({"LoRA_type": "LyCORIS/LoCon", "sd3_checkbox": True, "learning_rate": 1e-4}, "a config for SD3:"),
    ({"LoRA_type": "LoRA-FA", "learning_rate": 1e-4}, "LoRA-FA (networks.lora_fa) is not supported yet"),
    ({"LoRA_type": "Standard"}, "learning_rate, text_encoder_lr and unet_lr are all 0"),
    ({"LoRA_type": "Standrad", "learning_rate": 1e-4}, "(did you mean 'Standard'?)"),
    ({"name": "x", "images": [1, 2]}, "not a kohya_ss config"),
    ({"max_resolution": "512,512", "epoch": 1}, "a kohya_ss config without LoRA_type"),
])
def test_kohya_ss_refusals_are_one_line(tmp_path, data, says):
    with pytest.raises(UserError) as e:
        TrainConfig.from_file(_write_json(tmp_path, data))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_kohya_ss_additional_parameters_and_prompts(tmp_path):
    data = {"LoRA_type": "Standard", "learning_rate": 1e-4, "output_dir": str(tmp_path / "out"), "sample_every_n_epochs": 1,
            "sample_prompts": "zkz, a square --w 64 --h 64",
            "additional_parameters": '--network_train_unet_only --max_grad_norm=0 --optimizer_args "eps=1e-6" "foreach=False"',
            "typo_field": 1}
    config = TrainConfig.from_file(_write_json(tmp_path, data))
    assert config.network.network_train_unet_only and config.optimizer.max_grad_norm == 0
    assert config.optimizer.optimizer_args == ["eps=1e-6", "foreach=False"]
    prompts = tmp_path / "out" / "sample" / "prompt.txt"  # where kohya_ss writes them
    assert config.sampling.sample_prompts == str(prompts.resolve()) and prompts.read_text() == data["sample_prompts"]
    assert any("typo_field" in n and "not used" in n for n in config.notes)
    # the tab loads without writing files: it says what to do instead
    (tmp_path / "out").rename(tmp_path / "old")
    config = TrainConfig.from_file(_write_json(tmp_path, data), write_prompts=False)
    assert config.sampling.sample_prompts is None and not prompts.exists()
    assert any("prompt text, not a file" in n for n in config.notes)


def test_lora_scripts_names(tmp_path):
    cfg = tmp_path / "ls.toml"
    cfg.write_text('[optimizer]\nlr_scheduler = "cosine_with_restarts"\nlr_restart_cycles = 3\n'
                   '[net]\nnetwork_module = "lycoris.kohya"\nlycoris_algo = "lokr"\nlokr_factor = 8\ndropout = 0.1\n'
                   'network_args_custom = ["preset=attn-only"]\noptimizer_type = "Prodigy"\nprodigy_d_coef = "2.0"\n'
                   'enable_block_weights = false\ndown_lr_weight = "1,1,1,1,1,1,1,1,1,1,1,0"\nmodel_train_type = "sd-lora"\n', encoding="utf-8")
    config = TrainConfig.from_file(cfg)
    n = config.network
    assert config.optimizer.lr_scheduler_num_cycles == 3
    assert (n.algo, n.factor, n.network_dropout, n.preset, n.down_lr_weight) == ("lokr", 8, 0.1, "attn-only", None)
    assert config.optimizer.optimizer_args == ["d_coef=2.0"]
    notes = "\n".join(config.notes)
    assert "lr_restart_cycles: lora-scripts' name, read as lr_scheduler_num_cycles" in notes
    assert "down_lr_weight: not used: enable_block_weights is off" in notes


def test_lora_scripts_prompt_form_becomes_its_prompt_line(tmp_path):
    """lora-scripts' GUI turns its preview form into one line (mikazuki/app/api.py get_sample_prompts) that
    sd-scripts reads from a file; unset fields take its defaults (512, 512, cfg 7, 24 steps, seed 2333)."""
    from lora_train.sample.prompts import load_prompts

    cfg = tmp_path / "ls.toml"
    cfg.write_text(f'output_dir = "{(tmp_path / "out").as_posix()}"\nenable_preview = true\nsample_every_n_epochs = 2\n'
                   'positive_prompts = "1girl, zkz"\nnegative_prompts = "lowres"\nsample_width = 640\nsample_steps = 20\n', encoding="utf-8")
    config = TrainConfig.from_file(cfg)
    prompts = tmp_path / "out" / "sample" / "prompt.txt"
    assert config.sampling.sample_prompts == str(prompts.resolve())
    assert prompts.read_text(encoding="utf-8") == "1girl, zkz --n lowres --w 640 --h 512 --l 7 --s 20 --d 2333"
    (p,) = load_prompts(str(prompts))
    assert (p.prompt, p.negative, p.width, p.height, p.scale, p.steps, p.seed) == ("1girl, zkz", "lowres", 640, 512, 7.0, 20, 2333)
    prompts.unlink()
    config = TrainConfig.from_file(cfg, write_prompts=False)  # the tab's Load writes nothing, and says so
    assert config.sampling.sample_prompts is None and not prompts.exists()
    assert any("preview prompt form" in n for n in config.notes)
    cfg.write_text('enable_preview = true\nrandomly_choice_prompt = true\npositive_prompts = "x"\n', encoding="utf-8")
    with pytest.raises(UserError, match="randomly_choice_prompt: not supported yet"):
        TrainConfig.from_file(cfg)


def test_lora_scripts_template_and_flux(tmp_path):
    cfg = tmp_path / "preset.toml"
    cfg.write_text('[metadata]\nname = "mid"\nversion = "0.0.1"\nauthor = "me"\n[data]\nresolution = "768,768"\n', encoding="utf-8")
    config = TrainConfig.from_file(cfg)
    assert config.dataset.resolution == "768,768" and "a lora-scripts template ('mid')" in config.notes[0]
    cfg.write_text('[metadata]\nname = "c"\nauthor = "me"\ntrain_type = "flux-lora"\n[data]\nresolution = "768,768"\n', encoding="utf-8")
    with pytest.raises(UserError, match="a config for Flux.1"):
        TrainConfig.from_file(cfg)


def _safetensors_header(path: Path, names: list[str]) -> Path:
    """A .safetensors file whose tensors are one float each: the header is all dry-run reads."""
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))
    return path


def test_family_from_header(tmp_path):
    from lora_train.model.header import family_of_file
    from lora_train.model.sgm_loading import SDXL_KEY

    assert family_of_file(_safetensors_header(tmp_path / "a.safetensors", [SDXL_KEY, "x"])) == "sdxl"
    # the key the loader (and the WebUI's sd_models_config) tells SD2 by
    assert family_of_file(_safetensors_header(tmp_path / "b.safetensors", ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"])) == "sd2"
    assert family_of_file(_safetensors_header(tmp_path / "c.safetensors", ["cond_stage_model.transformer.x"])) == "sd1"


@pytest.mark.parametrize("model, family", [("builtin:tiny", "sd1"), ("builtin:tiny-sdxl", "sdxl")])
def test_dry_run_builtin(tmp_path, capsys, model, family):
    data = make_dataset(tmp_path / "data", count=4, repeats=2)
    out = tmp_path / "out"
    code = main(["train", "--config", str(KOHYA), "--dry-run", "--set", f"pretrained_model_name_or_path={model}",
                 "--set", f"train_data_dir={data}", "--set", f"output_dir={out}", "--set", "min_bucket_reso=64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    effective = tomllib.loads(captured.out.split("# dry run")[0])
    assert effective["network"]["network_module"] == "lycoris.kohya" and "algo=lokr" in effective["network"]["network_args"]
    # 4 images x 2 repeats at batch 2 = 4 steps an epoch, epoch 3 -> 12 steps
    assert "steps: 4 per epoch x 3 epochs = 12 total" in captured.out
    assert f"({family}, 64 px)" in captured.out
    assert "note:" in captured.err and "LoRA_type" in captured.err
    assert not out.exists()  # nothing trained, nothing written


def test_dry_run_file_checkpoint_from_header(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", count=2)
    ckpt = _safetensors_header(tmp_path / "m.safetensors", ["cond_stage_model.transformer.text_model.x"])
    code = main(["train", "--dry-run", "--set", f"pretrained_model_name_or_path={ckpt}", "--set", f"train_data_dir={data}",
                 "--set", "resolution=64", "--set", "min_bucket_reso=64", "--set", "network_dim=4", "--set", "learning_rate=1e-4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # SD1.5: 72 text-encoder modules (12 layers x q/k/v/out/fc1/fc2) + 192 UNet attention/projection modules, as kohya's
    assert "(sd1, 512 px)" in captured.out and "network:  264 modules" in captured.out


def test_dry_run_problem_is_one_line(tmp_path, capsys):
    code = main(["train", "--dry-run", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error:") and len(err.splitlines()) == 1, err


def test_kohya_ss_json_trains_what_it_says(tmp_path):
    """The effect: LyCORIS/LoKr with text_encoder_lr 0 trains a UNet-only LoKr, as kohya_ss' run would."""
    from lora_train.network.files import load_lora
    from lora_train.cli import main as cli

    data = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    assert cli(["train", "--config", str(KOHYA), "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}",
                "--set", f"output_dir={out}", "--set", "min_bucket_reso=64", "--set", "max_train_epochs=", "--set", "max_train_steps=2"]) == 0
    weights, metadata = load_lora(out / "kss-lokr.safetensors")
    assert weights and all(k.startswith("lora_unet_") for k in weights)
    assert any(k.endswith("lokr_w1") for k in weights) and not any("lora_down" in k for k in weights)
    assert "attn" in next(iter(weights))  # LyCORIS_preset attn-only


def test_tab_load_takes_kohya_ss_json(tmp_path):
    """Config file > Load (with the access rules of a listening UI): a kohya_ss .json loads, with its notes."""
    from lora_train.access import AccessPolicy
    from lora_train.app.guard import load_config

    path = tmp_path / "k.json"
    path.write_text(KOHYA.read_text(encoding="utf-8"), encoding="utf-8")
    config = load_config(AccessPolicy.build([tmp_path], remote=True, insecure_allowed=False), str(path))
    assert config.network.algo == "lokr" and any("LoRA_type" in n for n in config.notes)


def test_dry_run_reads_a_hub_ids_family_from_what_the_run_will_load(tmp_path, capsys, monkeypatch):
    """A Hugging Face id is fetched as the run fetches it (here: a stand-in download of an SDXL-keyed
    header); offline and not cached it is the one-line error that says where to put the file."""
    import huggingface_hub

    from lora_train.model.sgm_loading import SDXL_KEY

    data = make_dataset(tmp_path / "data", count=2)
    args = ["train", "--dry-run", "--set", "pretrained_model_name_or_path=someone/some-xl", "--set", f"train_data_dir={data}",
            "--set", "resolution=64", "--set", "min_bucket_reso=64", "--set", "network_dim=4", "--set", "learning_rate=1e-4"]
    fetched = []
    ckpt = _safetensors_header(tmp_path / "xl.safetensors", [SDXL_KEY, "conditioner.embedders.0.transformer.x"])
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: ["xl.safetensors", "README.md"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: fetched.append((repo_id, filename)) or str(ckpt) if filename.endswith(".safetensors")
                        else (_ for _ in ()).throw(huggingface_hub.errors.EntryNotFoundError("no yaml")))
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert fetched == [("someone/some-xl", "xl.safetensors")] and "(sdxl, 1024 px)" in captured.out
    monkeypatch.undo()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: (_ for _ in ()).throw(
        huggingface_hub.errors.LocalEntryNotFoundError("offline")))
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "someone/some-xl" in err[0] and "huggingface.co/someone/some-xl" in err[0]
