"""SDXL on a tiny SDXL-architecture model: the sgm adapter, its checkpoint trap, the fused text
encoder 2 attention, size conditioning, and a training run.

Each test runs on two builds of the same shapes: from the host's ldm classes (always), and as a
real sgm DiffusionEngine when sgm is importable (LORA_TRAIN_SGM_PATH; sgm is not on PyPI, so CI
has only the first). The comparisons with the host's own conditioner (sgm's, and the WebUI's
`get_learned_conditioning` when sgm is a WebUI's) run on the sgm build only.
"""

import copy
import json
import math
import random

import pytest
import torch
from PIL import Image

from conftest import assert_same_as, snapshot
from lora_train.model import cond as cond_ops
from lora_train.model.loading import quiet
from lora_train.model.sgm import SgmAdapter
from lora_train.model.sgm_import import sgm_available
from lora_train.network.network import LoRANetwork

BUILDS = ["ldm", pytest.param("sgm", marks=pytest.mark.skipif(not sgm_available(), reason="sgm not importable (set LORA_TRAIN_SGM_PATH)"))]


@pytest.fixture(scope="module", params=BUILDS)
def xl_model(request):
    from lora_train.model.tiny_sdxl import build_tiny_sdxl

    with quiet():
        model = build_tiny_sdxl(0, sgm=request.param == "sgm")
    model.build = request.param
    return model


@pytest.fixture
def xl(xl_model):
    return SgmAdapter(xl_model, name="tinyxl")


def _visible(network: LoRANetwork, seed: int = 0, scale: float = 0.2) -> LoRANetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * scale)
    return network


def _loss(xl, generator_seed=0, sizes=None):
    g = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = xl.encode_captions(["a red cat", "a blue dog"])
    cond = xl.condition(text, sizes)
    return xl.predict(latents, torch.tensor([100, 700]), cond).square().mean()


def test_info_schedule_and_file_metadata_strings(xl):
    assert xl.info.family == "sdxl" and xl.prediction_type == "epsilon"
    assert xl.info.base_model_version == "sdxl_base_v1-0"
    assert xl.info.modelspec_architecture == "stable-diffusion-xl-v1-base/lora"
    ac = xl.alphas_cumprod
    # SDXL's schedule is SD's scaled-linear one (sgm's LegacyDDPMDiscretization)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert ac.shape == (1000,) and torch.allclose(ac.double(), torch.cumprod(1 - betas, 0), atol=2e-4)


def test_targets_are_sd_scripts_sdxl_names(xl, fixtures_dir):
    expected = json.loads((fixtures_dir / "kohya-shapes-sdxl-conv.json").read_text())
    targets = xl.lora_targets(conv=True)
    prefixes = {t.name.split("_text_model")[0] if "_text_model" in t.name else "lora_unet" for t in targets}
    assert prefixes == {"lora_te1", "lora_te2", "lora_unet"}
    for t in targets:
        assert t.name in expected, t.name
        cls = "Linear" if t.part else type(t.module).__name__
        assert cls == expected[t.name]["class"], t.name
    te2 = [t for t in targets if t.name.startswith("lora_te2_")]
    layer0 = {t.name.rsplit("layers_0_", 1)[1] for t in te2 if "_layers_0_" in t.name}
    assert layer0 == {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"}


def _unet_lora_grads(network):
    return {n: m.lora_down.weight.grad for n, m in network.lora_modules.items()}


def test_sgm_checkpointing_trap_is_reproduced_then_fixed(xl, xl_model):
    """The host builds SDXL with use_checkpoint on: its checkpoint runs blocks under no_grad and
    differentiates only each block's own parameters, so a hooked LoRA gets no gradient."""
    flagged = [m for m in xl_model.modules() if m.__dict__.get("checkpoint") is True or m.__dict__.get("use_checkpoint") is True]
    assert len(flagged) > 10  # the stock config's flags are on in this model
    targets = [t for t in xl.lora_targets() if t.name.startswith("lora_unet_")]
    before = snapshot(xl_model)
    with xl.frozen():
        net = _visible(LoRANetwork(targets, dim=2, alpha=2))
        failed = None
        with net.applied():
            loss = _loss(xl)
            try:
                loss.backward()  # no gradient path at all, or the checkpoint's backward gives up
            except RuntimeError as e:
                failed = str(e)
        got = _unet_lora_grads(net)
        assert all(g is None or not g.abs().sum() for g in got.values()), f"the trap did not reproduce ({failed})"

        net.zero_grad(set_to_none=True)
        with xl.training(), net.applied():
            assert not any(m.__dict__.get("checkpoint") is True or m.__dict__.get("use_checkpoint") is True for m in flagged)
            _loss(xl).backward()
        plain = _unet_lora_grads(net)
        missing = [n for n, g in plain.items() if g is None or not g.abs().sum()]
        assert not missing, f"{len(missing)} of {len(plain)} LoRA modules got no gradient, e.g. {missing[:3]}"

        net.zero_grad(set_to_none=True)
        with xl.training(gradient_checkpointing=True), net.applied():
            _loss(xl).backward()
        ours = _unet_lora_grads(net)
        for n in plain:
            assert torch.allclose(ours[n], plain[n], rtol=1e-4, atol=1e-7), n
    assert all(m.__dict__.get("checkpoint") is True or m.__dict__.get("use_checkpoint") is True for m in flagged)
    assert_same_as(xl_model, before)


def test_text_encoder_2_lora_is_exactly_q_k_v_out_deltas_on_the_fused_attention(xl, xl_model):
    te2_targets = [t for t in xl.lora_targets() if t.name.startswith("lora_te2_")]
    net = _visible(LoRANetwork(te2_targets, dim=3, alpha=1.5), seed=1, scale=0.5)
    captions = ["a red cat", "a blue dog on grass"]
    with torch.no_grad():
        base = xl.encode_captions(captions)
        with net.applied():
            ours = xl.encode_captions(captions)
    # the same change written into a copy's weights: in_proj += [dq; dk; dv], out_proj += do
    merged = copy.deepcopy(xl_model)
    clip = SgmAdapter(merged).te2.model
    with torch.no_grad():
        for name, m in net.lora_modules.items():
            delta = (m.lora_up.weight @ m.lora_down.weight) * m.scale
            layer = int(name.split("_layers_")[1].split("_")[0])
            block = clip.transformer.resblocks[layer]
            if m.part in ("q", "k", "v"):
                i = "qkv".index(m.part)
                e = block.attn.embed_dim
                block.attn.in_proj_weight[i * e:(i + 1) * e] += delta
            elif m.part == "out":
                block.attn.out_proj.weight += delta
            else:
                block.get_submodule("mlp.c_fc" if name.endswith("fc1") else "mlp.c_proj").weight += delta
        want = SgmAdapter(merged).encode_captions(captions)
    for key in ("crossattn", "pooled"):
        assert torch.allclose(ours[key], want[key], atol=1e-5), key
    # the hidden part from te2 moved; te1's (the first 64 channels) did not
    te1_width = xl.te1.transformer.config.hidden_size
    assert torch.equal(ours["crossattn"][..., :te1_width], base["crossattn"][..., :te1_width])
    assert not torch.allclose(ours["crossattn"][..., te1_width:], base["crossattn"][..., te1_width:], atol=1e-3)
    assert "forward" not in xl.te2.model.transformer.resblocks[0].attn.__dict__


def _sinusoid(values, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    out = []
    for v in values:
        args = float(v) * freqs
        out.append(torch.cat([torch.cos(args), torch.sin(args)]))
    return torch.cat(out)


def test_vector_is_pooled_text_then_original_crop_target_sizes(xl):
    sizes = torch.tensor([[1536, 1024, 64, 32, 1024, 768], [768, 768, 0, 0, 768, 768]], dtype=torch.float32)
    text = xl.encode_captions(["a", "b"])
    vector = xl.condition(text, sizes)["vector"]
    pooled = text["pooled"].shape[1]
    assert vector.shape == (2, pooled + 3 * 512)
    assert torch.equal(vector[:, :pooled], text["pooled"])
    for row in range(2):
        assert torch.allclose(vector[row, pooled:], _sinusoid(sizes[row].tolist()), atol=1e-5)


# -- the host's own conditioning (sgm build only: the ldm build has no real conditioner) -----------
SGM_ONLY = pytest.mark.parametrize("xl_model", [BUILDS[1]], indirect=True)
CAPTIONS = ["a red cat", "", "A photo of a blue dog, sitting on green grass! " * 6, "sks person, 1girl, upper body"]
# original (h, w), crop (top, left), target (h, w): every number distinct within a row, so a swapped pair shows
SIZES = torch.tensor([[1536, 1024, 64, 32, 1024, 768], [768, 832, 0, 0, 768, 768],
                      [512, 640, 8, 16, 1024, 1152], [2048, 1344, 320, 96, 896, 1088]], dtype=torch.float32)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _diffs_from_host(text, ours, host):
    """Max |ours - host| per output; the host's vector starts with the pooled text, as ours does."""
    pooled = text["pooled"].shape[1]
    return {"crossattn": _max_diff(ours["crossattn"], host["crossattn"]),
            "pooled": _max_diff(text["pooled"], host["vector"][:, :pooled]),
            "vector": _max_diff(ours["vector"], host["vector"])}


@SGM_ONLY
def test_conditioning_is_the_sgm_conditioners_own(xl, xl_model):
    """The real sgm GeneralConditioner, fed the batch the host feeds it, gives what the adapter gives:
    crossattn (CLIP-L hidden layer, OpenCLIP penultimate), pooled (OpenCLIP's EOS), vector (pooled,
    then original, crop, target sizes). The empty caption takes sgm's normal path, as sd-scripts'
    caption dropout does (it encodes "" like any caption)."""
    batch = {"txt": list(CAPTIONS), "original_size_as_tuple": SIZES[:, 0:2],
             "crop_coords_top_left": SIZES[:, 2:4], "target_size_as_tuple": SIZES[:, 4:6]}
    with torch.no_grad():
        host = xl_model.conditioner(batch)
        text = xl.encode_captions(CAPTIONS)
        ours = xl.condition(text, SIZES)
    pooled = text["pooled"].shape[1]
    diffs = _diffs_from_host(text, ours, host)
    assert ours["crossattn"].shape == host["crossattn"].shape and ours["vector"].shape == host["vector"].shape
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # a caption's text changes every part (the comparison above is not of constants)
    assert _max_diff(host["crossattn"][0], host["crossattn"][3]) > 1e-2 and _max_diff(host["vector"][0, :pooled], host["vector"][3, :pooled]) > 1e-2


def _webui_get_learned_conditioning(opts):
    """The WebUI's `get_learned_conditioning` (modules/sd_models_xl.py), compiled from its own source.
    Importing the module needs the whole WebUI (modules.shared: gradio, its command line, its
    requirements), so only the function is taken, with `shared.opts` and `devices` supplied."""
    import __future__
    import ast
    from pathlib import Path
    from types import SimpleNamespace

    import sgm

    # sgm is the WebUI's repositories/generative-models/sgm when LORA_TRAIN_SGM_PATH names a WebUI
    source = Path(sgm.__file__).resolve().parents[3] / "modules" / "sd_models_xl.py"
    if not source.is_file():
        pytest.skip(f"no WebUI around this sgm checkout ({source} missing)")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_learned_conditioning"]
    assert found, f"{source} has no get_learned_conditioning"
    namespace = {"torch": torch, "shared": SimpleNamespace(opts=opts),
                 "devices": SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)}
    code = compile(ast.Module(body=found, type_ignores=[]), str(source), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace["get_learned_conditioning"]


class _SdConditioning(list):
    """The WebUI's prompt_parser.SdConditioning (a list of prompts with the image size); the module
    itself needs lark, which is not ours to install."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


@SGM_ONLY
@pytest.mark.parametrize("width,height,top,left", [(1024, 1024, 0, 0), (832, 1216, 48, 16), (1344, 768, 0, 120)])
def test_conditioning_matches_the_webuis_get_learned_conditioning(xl, xl_model, width, height, top, left):
    from types import SimpleNamespace

    opts = SimpleNamespace(sdxl_crop_top=top, sdxl_crop_left=left,
                           sdxl_refiner_low_aesthetic_score=2.5, sdxl_refiner_high_aesthetic_score=6.0)
    webui = _webui_get_learned_conditioning(opts)
    captions = [c for c in CAPTIONS if len(c) < 60]  # the WebUI's own prompt wrappers chunk long ones; sgm's truncate
    sizes = torch.tensor([[height, width, top, left, height, width]] * len(captions), dtype=torch.float32)
    with torch.no_grad():
        host = webui(xl_model, _SdConditioning(captions, width=width, height=height))
        text = xl.encode_captions(captions)
        ours = xl.condition(text, sizes)
        zeroed = webui(xl_model, _SdConditioning([""] * 2, is_negative_prompt=True, width=width, height=height))
        empty = xl.condition(xl.encode_captions([""] * 2), sizes[:2])
    pooled = text["pooled"].shape[1]
    diffs = _diffs_from_host(text, ours, host)
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # An empty negative prompt is zeroed by the WebUI (force_zero_embeddings); training encodes ""
    # normally (sd-scripts' caption dropout), so only the size part agrees there.
    assert not zeroed["crossattn"].abs().sum() and not zeroed["vector"][:, :pooled].abs().sum()
    assert _max_diff(empty["vector"][:, pooled:], zeroed["vector"][:, pooled:]) <= 1e-5
    assert empty["crossattn"].abs().max() > 1e-2


def _plan(tmp_path, random_crop=False, flip_aug=False):
    from lora_train.train.config import TrainConfig
    from lora_train.app.job import plan_dataset

    data = tmp_path / "data" / "1_thing"
    data.mkdir(parents=True)
    rng = random.Random(0)
    for i, (w, h) in enumerate([(160, 96), (96, 160), (120, 120)]):
        im = Image.new("RGB", (w, h))
        im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
        im.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("thing")
    config = TrainConfig().update({"train_data_dir": str(tmp_path / "data"), "resolution": "64", "enable_bucket": True,
                                   "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
                                   "random_crop": random_crop, "flip_aug": flip_aug, "train_batch_size": 1}, source="test")
    return plan_dataset(config, 64, steps_multiple=32)


@pytest.mark.parametrize("random_crop,flip_aug", [(False, False), (True, True)])
def test_size_conditioning_is_the_crop_actually_used(tmp_path, random_crop, flip_aug):
    from lora_train.dataset.loader import TrainingData

    plan = _plan(tmp_path, random_crop, flip_aug)
    data = TrainingData(plan, seed=5)
    seen = set()
    for epoch in range(1, 9):
        for items in data.epoch_batches(epoch):
            rng = random.Random(epoch)
            batch = data.load(items, epoch, rng)
            for item, row, pixels in zip(items, batch.sizes.tolist(), batch.pixels):
                a = plan.assignment(item)
                orig_h, orig_w, top, left, target_h, target_w = (int(v) for v in row)
                assert (orig_w, orig_h) == item.size and (target_w, target_h) == a.bucket
                im = Image.open(item.path).convert("RGB").resize(a.resized, Image.BICUBIC if a.resized[0] > item.size[0] else Image.LANCZOS)
                flipped = not torch.equal(pixels, _crop(im, left, top, a.bucket))
                if flipped:  # the crop, measured in the mirrored image
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
                    assert flip_aug
                assert torch.equal(pixels, _crop(im, left, top, a.bucket)), (item.path.name, row)
                seen.add((item.path.name, top, left, flipped))
    if random_crop:
        assert len({(n, t, l) for n, t, l, _ in seen}) > 3  # the crop moved, and the sizes followed it
        assert any(f for *_, f in seen)


def _crop(im, left, top, bucket):
    import numpy as np

    box = im.crop((left, top, left + bucket[0], top + bucket[1]))
    return torch.from_numpy(np.asarray(box, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def test_cached_text_part_gives_the_same_conditioning(xl):
    captions = ["a red cat", "a blue dog"]
    text = xl.encode_captions(captions)
    again = cond_ops.stack(cond_ops.split(text))
    sizes = torch.tensor([[64, 96, 0, 16, 64, 64]] * 2, dtype=torch.float32)
    a, b = xl.condition(text, sizes), xl.condition(again, sizes)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train_te", [True, False])
def test_training_run_writes_an_sdxl_lora_and_leaves_the_model_as_it_was(xl, xl_model, tmp_path, train_te):
    from conftest import make_dataset, small_run_config
    from lora_train.app import job
    from lora_train.network.files import load_lora
    from lora_train.network.selftest import unmatched_modules
    from lora_train.train import events as ev

    data = make_dataset(tmp_path / "data", count=4, size=64)
    config = small_run_config(data, "xl", epochs=1, output_dir=str(tmp_path / "out"), network_train_unet_only=not train_te,
                              cache_text_encoder_outputs=not train_te, gradient_checkpointing=True, bucket_reso_steps=32)
    before = snapshot(xl_model)
    trainer = job.build_trainer(config, xl)
    losses = []
    path = trainer.run(lambda e: losses.append(e.loss) if isinstance(e, ev.Step) else None)
    assert_same_as(xl_model, before)
    tensors, metadata = load_lora(path)
    names = {k.split(".", 1)[0] for k in tensors}
    prefixes = {n.split("_text_model")[0] if "_text_model" in n else "lora_unet" for n in names}
    assert prefixes == ({"lora_te1", "lora_te2", "lora_unet"} if train_te else {"lora_unet"})
    assert unmatched_modules(path, xl) == []
    from lora_train.tools.inspect import inspect_lora

    report = inspect_lora(path)  # every key is a module sd-scripts trains on SDXL
    assert report["architecture"] == "sdxl" and report["valid"], report.get("problems")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_v2"] == "False"
    assert losses and all(math.isfinite(v) for v in losses)
    # every trained module moved away from its zero-initialised up weight, except text encoder 1's
    # last layer: SDXL reads its penultimate one, and sd-scripts names (and never trains) it all the same
    unused = f"lora_te1_text_model_encoder_layers_{xl.te1.transformer.config.num_hidden_layers - 1}_"
    still_zero = {k.split(".")[0] for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum()}
    assert {n for n in still_zero if not n.startswith(unused)} == set()
    assert all(n.startswith(unused) for n in still_zero) and (len(still_zero) == 6) == train_te


# the keys each algorithm starts at zero: they move only if training reached the module
@pytest.mark.parametrize("args,key", [(["algo=loha"], ("hada_w2_a",)), (["algo=lokr", "dora_wd=True"], ("lokr_w2", "lokr_w2_b"))],
                         ids=["loha", "dora-lokr"])
def test_lycoris_algorithms_train_sdxl_with_both_text_encoders(xl, xl_model, tmp_path, args, key):
    """LoHa and DoRA-LoKr on SDXL, text encoders included: te2's fused attention parts get their own
    modules of the algorithm, the file is valid and names only modules SDXL has, the model comes back."""
    from conftest import make_dataset, small_run_config
    from lora_train.app import job
    from lora_train.network.files import load_lora
    from lora_train.network.selftest import unmatched_modules
    from lora_train.tools.inspect import inspect_lora

    config = small_run_config(make_dataset(tmp_path / "data", count=2, size=64), "xl", epochs=1, output_dir=str(tmp_path / "out"),
                              max_train_steps=2, bucket_reso_steps=32, network_module="lycoris.kohya", network_args=args)
    before = snapshot(xl_model)
    path = job.build_trainer(config, xl).run()
    assert_same_as(xl_model, before)
    tensors, _ = load_lora(path)
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        moved = [v for k, v in tensors.items() if k.startswith("lora_te2_") and f"self_attn_{part}." in k and k.split(".", 1)[1] in key]
        assert moved and any(v.abs().sum() > 0 for v in moved), part
    assert ("dora_wd=True" in args) == any(k.endswith(".dora_scale") for k in tensors)
    report = inspect_lora(path)
    assert report["valid"] and report["architecture"] == "sdxl", report["problems"][:3]
    assert unmatched_modules(path, xl) == []


def test_sd2_text_encoder_trains_through_the_fused_attention(tmp_path):
    """The same fused-attention LoRA makes SD2's OpenCLIP text encoder trainable; names stop at
    the penultimate layer, as sd-scripts'."""
    from conftest import make_dataset, small_run_config
    from lora_train.app import job
    from lora_train.model.ldm import LdmAdapter
    from lora_train.model.loading import instantiate
    from lora_train.model.tiny import make_weights_visible, tiny_model_config
    from lora_train.model.tiny_sdxl import TE2_WIDTH, TINY_OPENCLIP
    from lora_train.network.files import load_lora
    from lora_train.network.selftest import unmatched_modules

    cfg = tiny_model_config()
    cfg["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                          "params": {"arch": TINY_OPENCLIP, "version": None, "layer": "penultimate"}}
    cfg["params"]["unet_config"]["params"]["context_dim"] = TE2_WIDTH
    torch.manual_seed(0)
    with quiet():
        model = instantiate(cfg)
    make_weights_visible(model, 0)
    adapter = LdmAdapter(model)
    assert adapter.info.family == "sd2" and adapter.can_train_text_encoder()
    layers = len(model.cond_stage_model.model.transformer.resblocks)
    te = [t.name for t in adapter.lora_targets() if t.name.startswith("lora_te_")]
    assert len(te) == 6 * (layers - 1) and not any(f"_layers_{layers - 1}_" in n for n in te)

    before = snapshot(model)
    config = small_run_config(make_dataset(tmp_path / "data", count=4), "sd2te", epochs=1, output_dir=str(tmp_path / "out"))
    path = job.build_trainer(config, adapter).run()
    assert_same_as(model, before)
    tensors, metadata = load_lora(path)
    te_up = {k: v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")}
    assert len(te_up) == len(te) and all(v.abs().sum() > 0 for v in te_up.values())
    assert unmatched_modules(path, adapter) == [] and metadata["ss_v2"] == "True"


def _cli(*args, env_sgm=None):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LORA_TRAIN_SGM_PATH"}
    if env_sgm:
        env["LORA_TRAIN_SGM_PATH"] = env_sgm
    return subprocess.run([sys.executable, "-m", "lora_train", *args], capture_output=True, text=True, env=env)


def test_an_sdxl_file_without_sgm_says_what_to_do(tmp_path):
    from safetensors.torch import save_file

    from lora_train.model.sgm_loading import SDXL_KEY

    ckpt = tmp_path / "xl.safetensors"
    save_file({SDXL_KEY: torch.ones(4)}, str(ckpt))
    run = _cli("sample", "--model", str(ckpt), "--prompt", "x", "--output", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr
    assert "SDXL needs Stability AI's 'sgm' package" in run.stderr and "--sgm-path" in run.stderr
    run = _cli("bench", "--arch", "tiny-sdxl", "--sgm-path", str(tmp_path))
    assert run.returncode == 2 and f"'{tmp_path}' has no sgm package" in run.stderr


@pytest.mark.skipif(not sgm_available(), reason="sgm not importable (set LORA_TRAIN_SGM_PATH)")
def test_tiny_sdxl_checkpoint_round_trip_through_sgm(tmp_path):
    from lora_train.model.loading import load_checkpoint
    from lora_train.model.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl

    with quiet():
        model = build_tiny_sdxl(0, sgm=True)
        path = save_tiny_sdxl(model, tmp_path / "tinyxl.safetensors")
        loaded = load_checkpoint(path)
    assert "sgm.models.diffusion.DiffusionEngine" in path.with_suffix(".yaml").read_text()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert SgmAdapter(loaded).info.name == "tinyxl.safetensors"


def test_bench_runs_on_the_tiny_sdxl_unet():
    from lora_train.bench import format_bench, run_bench

    r = run_bench("tiny-sdxl", 64, 4, steps=1, warmup=0)
    assert r["lora_modules"] > 0 and r["ratio"] > 0 and r["context"][2] == 320
    assert "tiny-sdxl" in format_bench(r)


def test_fp16_vae_encodes_in_fp32_and_goes_back_exactly(xl, xl_model):
    from lora_train.errors import UserError

    vae = xl_model.first_stage_model
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    want = xl.encode_posterior(pixels)
    fp32 = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.half()
    try:
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        mean, std = xl.encode_posterior(pixels)
        assert mean.dtype == torch.float32 and torch.isfinite(mean).all()
        # fp16 weights upcast exactly, so the latents are the fp32 VAE's (to fp16 weight rounding)
        assert torch.allclose(mean, want[0], atol=5e-2)
        after = vae.state_dict()
        assert all(after[k].dtype == torch.float16 and torch.equal(after[k], before[k]) for k in before)
        real = vae.encoder.forward
        vae.encoder.forward = lambda x: real(x) * float("nan")
        with pytest.raises(UserError, match="non-finite latents"):
            xl.encode_posterior(pixels)
        del vae.encoder.forward
    finally:
        vae.encoder.__dict__.pop("forward", None)
        vae.float()
        vae.load_state_dict(fp32)  # the module-wide model as it was


@pytest.mark.parametrize("subject", ["character", "style", "concept"])
def test_sdxl_presets_are_accepted_by_the_trainer(xl, tmp_path, subject):
    """The SDXL base preset caches text-encoder outputs, which needs captions that never change:
    it must not also shuffle them (found by hand in the WebUI)."""
    from conftest import make_dataset
    from lora_train.app import job
    from lora_train.train.config import TrainConfig
    from lora_train.ui import presets

    values = {**presets.preset(subject, "SDXL"), "train_data_dir": str(make_dataset(tmp_path / "d", count=2)),
              "resolution": "64", "min_bucket_reso": 32, "max_bucket_reso": 128}
    trainer = job.build_trainer(TrainConfig().update(values, source="preset"), xl)
    assert trainer.config.training.cache_text_encoder_outputs and not trainer.train_te
