"""Negative controls of the fidelity bar (lora_train/testing/controls.py): each is scored with the passing
run's options (tests/test_fidelity.py's `_options`: its epochs, prompts and seed) and must fail the bar
for its own reason. The two that train sit in a module apart from tests/test_fidelity.py so that
`make test`'s two workers (pytest-xdist, one file per worker) run them beside the shared concept run;
the three that re-score the concept run's final file are in tests/test_fidelity.py."""

import json
import random

import pytest
import torch

from test_fidelity import CI_BAR, CI_COLLATERAL_PROMPTS, CI_EPOCHS, CI_PROMPTS, _options
from lora_train.testing import controls, fidelity, render_cache

# for the plumbing: seconds, not minutes; nothing is learnt at this size
TINY = {"epochs": 1, "eval_prompts": 4, "collateral_prompts": 8, "reg_images": 4, "sample_steps": 4, "images": 12}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The base's renders, shared by the trained controls: the same options give the same ones."""
    return tmp_path_factory.mktemp("render-cache")


def _concept_reason(problems: list[str]) -> bool:
    return any(p.startswith("concept rate at weight 1.0 is") and p.endswith(f"< {CI_BAR.concept_at_1:.2f}") for p in problems)


def _scale_reason(problems: list[str]) -> bool:
    return any(p.startswith("held-out loss is lowest at weight") for p in problems)


def _trained(name, tmp_path, cache) -> tuple[fidelity.FidelityOptions, fidelity.FidelityReport]:
    opts = _options(tmp_path)
    # the positive's length and prompts, not a shortened run a correct trainer would fail as well
    assert (opts.epochs, opts.eval_prompts, opts.collateral_prompts) == (CI_EPOCHS, CI_PROMPTS, CI_COLLATERAL_PROMPTS)
    assert opts.reg_images == fidelity.FidelityOptions(output=tmp_path).reg_images
    return opts, controls.train_control(name, opts, log=lambda m: None, cache=cache)


def test_swapped_target_fails_the_bar(tmp_path, cache):
    """Training an eps model towards v: the LoRA learns to predict v, so sampling with it does not draw
    the concept, and the held-out eps loss (written out independently of the trainer) is lowest with the
    LoRA off, not at weight 1."""
    _, report = _trained("swapped-target", tmp_path, cache)
    problems = fidelity.failures(report, CI_BAR)
    assert _concept_reason(problems), fidelity.format_table(report)
    assert _scale_reason(problems) and report.best_weight < CI_BAR.best_weight[0], report.final.loss_by_weight
    assert [e.epoch for e in report.epochs] == [CI_EPOCHS]  # trained to the end, only the final file scored


def test_shuffled_captions_fail_the_bar(tmp_path, cache):
    """The trigger dealt out over pattern and plain images alike: it cannot call up the pattern."""
    opts, report = _trained("shuffled-captions", tmp_path, cache)
    problems = fidelity.failures(report, CI_BAR)
    assert _concept_reason(problems), fidelity.format_table(report)
    captions = [p.read_text(encoding="utf-8") for p in (opts.output / "reg").glob("*/*.txt")]
    assert any(fidelity.TRIGGER in c for c in captions), "the trigger reached the plain images"


# -- the seams, at unit size ----------------------------------------------------------------------
def test_swapped_target_trains_towards_the_other_prediction_type():
    from lora_train.train import loss

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a = torch.tensor([0.3, 0.8])
    # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho, "Progressive distillation", eq. for v), written out here
    v = a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * latents
    original = loss.target
    with controls.swapped_target():
        assert torch.allclose(loss.target(latents, noise, a, "epsilon"), v)
        assert torch.equal(loss.target(latents, noise, a, "v"), noise)
    assert loss.target is original
    with pytest.raises(RuntimeError), controls.swapped_target():
        raise RuntimeError
    assert loss.target is original and torch.equal(loss.target(latents, noise, a, "epsilon"), noise)


def test_shuffled_captions_untie_the_trigger_from_the_pattern(tmp_path):
    import shutil

    data = fidelity.make_concept_dataset(tmp_path / "a" / "data", 12, 5, seed=0)
    reg = tmp_path / "a" / "reg" / "1_scene"
    reg.mkdir(parents=True)
    rng = random.Random(1)
    for i in range(36):
        (reg / f"{i:03d}.txt").write_text(fidelity.scenes.random_scene(rng).caption(), encoding="utf-8")
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    def captions(root):
        return [f.read_text(encoding="utf-8") for f in sorted((root / "data").glob("*/*.txt")) + sorted((root / "reg").glob("*/*.txt"))]

    before = captions(tmp_path / "a")
    assert all(fidelity.TRIGGER in c for c in before[:12]) and not any(fidelity.TRIGGER in c for c in before[12:])
    for root in (tmp_path / "a", tmp_path / "b"):
        controls.shuffle_captions(root / "data", root / "reg", seed=0)
    after = captions(tmp_path / "a")
    assert sorted(after) == sorted(before) and after != before  # the same captions, dealt out anew
    assert captions(tmp_path / "b") == after  # by a fixed seed
    # 12 trigger captions over 48 images: 3 expected among the 12 pattern images, 9 among the 36 plain ones
    on_concept, on_reg = (sum(fidelity.TRIGGER in c for c in part) for part in (after[:12], after[12:]))
    assert on_reg >= 6 and on_concept <= 6, after
    with pytest.raises(Exception, match="regularization images"):
        controls.shuffle_captions(data, None, seed=0)


def _random_network(adapter, kind=None):
    from lora_train.network.network import LoRANetwork

    net = LoRANetwork(adapter.lora_targets(conv=True), dim=4, alpha=2, conv_dim=2, conv_alpha=1, kind=kind)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("algo,dora", [("lora", False), ("loha", False), ("lokr", False), ("locon", True)])
def test_zero_up_copy_is_an_untrained_file(tiny_adapter, tmp_path, algo, dora):
    """Every module of the copy changes nothing (weight delta 0, no DoRA magnitude); the file it came from does."""
    from lora_train.network.files import save_lora
    from lora_train.network.kind import LYCORIS, NetworkKind
    from lora_train.network.network import network_from_file

    kind = None if algo == "lora" else NetworkKind(LYCORIS, algo, dora=dora, options={"factor": 4} if algo == "lokr" else {})
    path = save_lora(tmp_path / "trained.safetensors", _random_network(tiny_adapter, kind).kohya_state_dict(), {})
    trained = network_from_file(path, tiny_adapter.file_targets())
    assert all(m.weight_delta().abs().max() > 0 for m in trained.lora_modules.values())
    assert dora == any(m.dora_scale is not None for m in trained.lora_modules.values())
    zeroed = network_from_file(controls.zero_up_copy(path, tmp_path / "zero" / "zero.safetensors"), tiny_adapter.file_targets())
    assert set(zeroed.lora_modules) == set(trained.lora_modules)
    for name, m in zeroed.lora_modules.items():
        assert m.dora_scale is None and not m.weight_delta().any(), name


def test_rescaled_loader_applies_the_file_at_factor_times_the_weight(tiny_adapter, tmp_path):
    """A LoRA Linear at weight w through the loader is W x + w * factor * (alpha / dim) * up(down(x)),
    computed here from the file's tensors."""
    from lora_train.network.files import save_lora

    from lora_train.network.files import load_lora

    path = save_lora(tmp_path / "l.safetensors", _random_network(tiny_adapter).kohya_state_dict(), {})
    state, _ = load_lora(path)
    target = next(t for t in tiny_adapter.lora_targets() if isinstance(t.module, torch.nn.Linear))
    down, up = state[f"{target.name}.lora_down.weight"], state[f"{target.name}.lora_up.weight"]
    x = torch.randn(3, down.shape[1])
    with torch.no_grad():
        plain = target.module(x)
    for factor in (0.5, 2.0):
        net = controls.rescaled_loader(factor)(path, tiny_adapter)
        net.apply()
        try:
            net.set_multiplier(0.8)
            with torch.no_grad():
                got = target.module(x)
        finally:
            net.remove()
        expected = plain + 0.8 * factor * (2 / 4) * (x @ down.T @ up.T)
        assert torch.allclose(got, expected, atol=1e-5), factor
    with torch.no_grad():
        assert torch.equal(target.module(x), plain)


# -- the cache of the base's renders --------------------------------------------------------------
def _comparable(report: fidelity.FidelityReport) -> dict:
    d = report.as_dict()
    for key in ("grid", "seconds"):
        d.pop(key)
    for e in d["epochs"]:
        e.pop("file")
    return d


def test_cached_base_renders_give_bit_identical_results(tmp_path, monkeypatch):
    """A run with the cache (cold, then warm) is the run without it, to the last bit of every score,
    regularization image and LoRA weight; the warm run renders nothing with the base alone."""
    from lora_train.network.files import load_lora
    from lora_train.sample import render

    calls = []
    real = render.render_batch
    monkeypatch.setattr(render, "render_batch", lambda adapter, prompts, **kw: calls.append(len(prompts)) or real(adapter, prompts, **kw))
    runs = {}
    for name, cache in (("none", None), ("cold", tmp_path / "cache"), ("warm", tmp_path / "cache")):
        calls.clear()
        opts = fidelity.FidelityOptions(output=tmp_path / name, **TINY)
        runs[name] = (opts, fidelity.run(opts, log=lambda m: None, cache=cache, final_only=True), list(calls))
    # the LoRA's own renders: 3 weights x 4 trigger prompts and 8 collateral prompts; the base adds
    # 4 regularization images, 4 trigger and 8 collateral prompts
    assert runs["none"][2] == runs["cold"][2] == [4, 4, 8, 4, 4, 4, 8]
    assert runs["warm"][2] == [4, 4, 4, 8]
    none = runs["none"]
    for name in ("cold", "warm"):
        opts, report, _ = runs[name]
        assert _comparable(report) == _comparable(none[1]), name
        mine, theirs = (load_lora(r.final.file)[0] for r in (report, none[1]))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        for png in sorted((none[0].output / "reg").glob("*/*.png")):
            assert (opts.output / "reg" / png.parent.name / png.name).read_bytes() == png.read_bytes()


def test_a_cache_entry_is_keyed_by_the_base_and_the_options(tmp_path):
    """Another checkpoint, seed, step count or scale is a miss, never another run's images."""
    from PIL import Image

    made = []

    def fake_render(adapter, prompts, opts, scale=None):
        made.append((opts.seed, opts.sample_steps, scale))
        return [Image.new("RGB", (4, 4), (len(made), 0, 0)) for _ in prompts]

    ckpt = tmp_path / "a.safetensors"
    ckpt.write_bytes(b"one")
    opts = fidelity.FidelityOptions(output=tmp_path)
    first = render_cache.cached(fake_render, tmp_path / "c", str(ckpt))
    assert first(None, ["p"], opts)[0].getpixel((0, 0)) == (1, 0, 0)
    assert first(None, ["p"], opts)[0].getpixel((0, 0)) == (1, 0, 0) and len(made) == 1
    for changed in (dict(seed=1), dict(sample_steps=3), dict(scale=5.0)):
        first(None, ["p"], fidelity.FidelityOptions(output=tmp_path, **changed))
    first(None, ["q"], opts)
    first(None, ["p"], opts, scale=1.0)
    ckpt.write_bytes(b"two")  # a rebuilt base
    render_cache.cached(fake_render, tmp_path / "c", str(ckpt))(None, ["p"], opts)
    assert len(made) == 7


# -- the CLI ------------------------------------------------------------------------------------
def _report(concept_1: float, best: float) -> fidelity.FidelityReport:
    losses = {f"{w:.2f}": abs(w - best) for w in fidelity.LOSS_WEIGHTS}
    epoch = fidelity.EpochResult(6, "x.safetensors", {"1.0": concept_1, "0.5": concept_1 / 2, "0.0": 0.0}, 0.5, {}, losses)
    return fidelity.FidelityReport(base_rate=0.0, base_accuracy=0.5, epochs=[epoch])


@pytest.mark.parametrize("broken", [(), ("zero-up",)])
def test_fidelity_controls_prints_the_table_and_fails_when_a_control_passes(monkeypatch, capsys, tmp_path, broken):
    from lora_train.testing import __main__ as cli

    seen = {}

    def fake_run(opts, log=print, cache=None, **kw):
        seen["cache"] = cache
        return _report(0.95, 1.0)

    def fake_controls(opts, report, log=print, cache=None, **kw):
        assert cache == seen["cache"] is not None  # the positive's renders serve the controls
        return [controls.ControlResult(n, r, fidelity.failures(r)) for n in controls.CONTROLS
                for r in [_report(0.95, 1.0) if n in broken else _report(0.1, 0.0)]]

    monkeypatch.setattr(fidelity, "run", fake_run)
    monkeypatch.setattr(controls, "run_controls", fake_controls)
    code = cli.main(["fidelity", "--controls", "--output", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out if line.split() and line.split()[0] in controls.CONTROLS}
    assert set(rows) == set(controls.CONTROLS)
    assert rows["swapped-target"].split()[1:6] == ["0.10", "0.00", "+0.00", "0", "yes:"]
    assert rows["swapped-target"].endswith("yes: concept rate at weight 1.0 is 0.10 < 0.90")
    if broken:
        assert code == 1 and rows["zero-up"].endswith("NO: it passes the bar")
        assert out[-1] == "controls that did NOT fail the bar: zero-up"
    else:
        assert code == 0 and out[-1] == "all 5 controls fail the bar"
    code = cli.main(["fidelity", "--controls", "--json", "--output", str(tmp_path)])
    data = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in data["controls"]] == list(controls.CONTROLS)
    assert [c["name"] for c in data["controls"] if not c["failures"]] == list(broken)
