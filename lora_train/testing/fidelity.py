"""The concept test: does a LoRA trained with the normal trainer teach the base something new,
at the strength asked for, without breaking what the base already knew?

A concept (concepts.py: by default a colour pattern the base never saw, objects with a purple top half
and an orange bottom half, under a trigger word that takes the colour word's place, "a zkz circle on
the left"; or a pastel style over the base's own objects) is taught. Every saved epoch is loaded
back from its file on disk, applied at weights 1.0 / 0.5 / 0.0, sampled with our own sampler and
scored by the scene scorer: an image counts when it shows the pattern and the prompt's shape, side
and background (each is reported on its own too, see concept_rate). Prompts and seeds are fixed, so each comparison is paired.

The defaults are what a kohya user would do and what shows damage: CFG 7 as in the WebUI, and
regularization images (prior preservation) rendered by the base itself. Without them the LoRA carries
part of the pattern into prompts without the trigger; guidance multiplies that leak, so at CFG 5 on
32 prompts it stayed inside the noise while at CFG 7 ordinary objects changed colour. Collateral
damage is measured on 256 prompts, trigger rates on 64 per weight.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_train.testing import scenes
from lora_train.testing.concepts import CONCEPTS, TRIGGER, Concept
from lora_train.testing.scorer import LABELS, score

WEIGHTS = (1.0, 0.5, 0.0)
# Held-out loss is measured at these weights; it must be lowest in Thresholds.best_weight, so a file
# applied at half or twice its trained scale shows up on either side (its minimum moves to 2.0 or 0.5).
LOSS_WEIGHTS = (2.0, 1.5, 1.25, 1.0, 0.8, 0.5, 0.0)
# What a concept image is checked for: the concept (its pattern or style), the prompt's other labels,
# and all of them at once (the strict rule of issue 22: the rate the bar reads; see concept_rate)
CONCEPT_LABELS = ("pattern", "shape", "position", "background", "all")


# The networks the bar is checked for, with the settings the SDXL tutorial our users follow gives each
# (dim/alpha/conv_dim/conv_alpha: LoCon 16/8/8/1, LoHa 8/4/4/1); LoKr and DoRA as LyCORIS' docs set them.
_LYCORIS = {"network_module": "lycoris.kohya"}
NETWORKS: dict[str, dict] = {
    "lora": {},
    "locon": {"conv_dim": 4, "conv_alpha": 1},
    "loha": {**_LYCORIS, "network_args": ["algo=loha"], "network_dim": 8, "network_alpha": 4, "conv_dim": 4, "conv_alpha": 1},
    # LyCORIS' guide for LoKr: a dim past the factors' sizes, so both Kronecker factors are full matrices (scale 1),
    # at a higher learning rate than LoRA's (at LoRA's it reached 0.84 after 6 epochs)
    "lokr": {**_LYCORIS, "network_args": ["algo=lokr", "factor=4"], "network_dim": 100000, "network_alpha": 1, "conv_dim": 100000,
             "conv_alpha": 1, "unet_lr": 6e-3, "text_encoder_lr": 2e-3},
    # DoRA on LoCon with LoHa's sizes (LyCORIS' default preset, convs included). On the attention and MLP
    # Linears only (preset attn-mlp, dim/alpha 8/8) it reached 0.88 with a collateral drop of 0.12: the
    # magnitudes of the few layers it had drifted furthest (the transformers' proj_out by 17-23 %)
    "dora": {**_LYCORIS, "network_args": ["algo=locon", "dora_wd=True"], "network_dim": 8, "network_alpha": 4, "conv_dim": 4,
             "conv_alpha": 1},
}


@dataclass
class FidelityOptions:
    output: Path
    # kohya's LoRA with its 3x3 convs too (conv_dim, "LoCon"). On this base, at 8 epochs, it reads 0.94 on
    # every label at once, where the Linears alone read 0.88 (they pass at 10: 0.95, collateral drop 0.09)
    network: str = "locon"  # a key of NETWORKS
    concept: str = "object"  # a key of concepts.CONCEPTS
    train_text_encoder: bool = True
    steps: int | None = None  # None: `epochs` epochs
    epochs: int = 8
    images: int = 36  # two per shape x background x side
    # kohya's regularization images (prior preservation): the base's own renders of ordinary prompts,
    # as many as the concept's images x repeats (kohya pairs one with each training sample).
    # Without them the concept leaks into prompts without the trigger (see the module docstring).
    reg_images: int = 180
    # CFG of the regularization renders; None: `scale`. At 1 they are samples of the base's own
    # conditional distribution, which training towards leaves the base where it is; renders at CFG 7
    # pull the prompts without the trigger towards the guided look, and CFG at inference then
    # multiplies that shift (ordinary objects changed colour twice as often).
    reg_scale: float | None = 1.0
    repeats: int = 5
    batch_size: int = 8
    eval_prompts: int = 64  # trigger prompts per weight
    # Prompts without the trigger. Any change to the model re-draws the base's near misses; with the
    # first base (circle vs square at chance) that moved the all-labels accuracy on 64 prompts by about
    # +-7 points, too close to the 10-point bar; 256 kept it to about +-3.5.
    collateral_prompts: int = 256
    sample_steps: int = 20
    scale: float = 7.0  # the WebUI's default CFG; guidance multiplies a leak, so a lower CFG hides it
    seed: int = 0
    model: str | None = None  # a checkpoint path; None: the committed tiny base
    output_name: str | None = None  # None: "zkz-<network>" ("zkz-style-<network>" for the style)

    @property
    def kind(self) -> Concept:
        return CONCEPTS[self.concept]


@dataclass
class EpochResult:
    epoch: int
    file: str
    concept: dict[str, float]  # weight -> fraction of trigger prompts right on every label (concept_rate)
    collateral: float  # accuracy on prompts without the trigger, LoRA at 1.0
    collateral_by_label: dict[str, float]  # the same per label (colour, shape, position, background)
    loss_by_weight: dict[str, float]  # held-out denoising loss on concept images, per weight ("1.25")
    concept_by_label: dict[str, dict[str, float]] = field(default_factory=dict)  # weight -> CONCEPT_LABELS -> fraction


@dataclass
class FidelityReport:
    base_rate: float  # concept rate of the base alone on the trigger prompts
    base_accuracy: float  # accuracy of the base alone on the prompts without the trigger
    base_by_label: dict[str, float] = field(default_factory=dict)
    base_concept_by_label: dict[str, float] = field(default_factory=dict)  # the base on the trigger prompts
    epochs: list[EpochResult] = field(default_factory=list)
    grid: str = ""
    seconds: float = 0.0

    @property
    def final(self) -> EpochResult:
        return self.epochs[-1]

    @property
    def weights(self) -> dict[str, float]:
        return self.final.concept

    @property
    def collateral_drop(self) -> float:
        return self.base_accuracy - self.final.collateral

    @property
    def best_weight(self) -> float:
        """The weight with the lowest held-out loss: about 1.0 when the file is applied at the
        scale it was trained at."""
        losses = self.final.loss_by_weight
        return float(min(losses, key=losses.get))

    def as_dict(self) -> dict:
        return {
            "weights": self.weights,
            "base_rate": self.base_rate,
            "base_accuracy": self.base_accuracy,
            "collateral_accuracy": self.final.collateral,
            "collateral_drop": round(self.collateral_drop, 4),
            "base_by_label": self.base_by_label,
            "collateral_by_label": self.final.collateral_by_label,
            "base_concept_by_label": self.base_concept_by_label,
            "concept_by_label": self.final.concept_by_label,
            "best_weight": self.best_weight,
            "epochs": [asdict(e) for e in self.epochs],
            "grid": self.grid,
            "seconds": round(self.seconds, 1),
        }


# -- data ---------------------------------------------------------------------------------------
def make_concept_dataset(root: Path, images: int, repeats: int, seed: int, concept: Concept = CONCEPTS["object"]) -> Path:
    """`root/<repeats>_zkz/`: the concept's images of every shape, side and background, captioned with
    the trigger (the object's: in place of the colour word, "a zkz circle on the left, white background")."""
    import itertools

    rng = random.Random(seed)
    folder = Path(root) / f"{repeats}_{TRIGGER}"
    folder.mkdir(parents=True, exist_ok=True)
    # every combination the prompts may ask for, in turn: a combination left out is one the LoRA
    # may not carry the pattern to (a random draw of 32 left the base's small black-background
    # triangles untouched)
    combos = itertools.cycle(itertools.product(concept.train_shapes, scenes.BACKGROUNDS, scenes.POSITIONS))
    for i in range(images):
        shape, background, position = next(combos)
        # the training shapes for the draw as well: the shape is fixed, but the choice among them moves the RNG
        scene = concept.scene(rng, shapes=concept.train_shapes, shape=shape, background=background, position=position)
        concept.draw(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(concept.caption(scene), encoding="utf-8")
    return Path(root)


def make_reg_dataset(root: Path, adapter, n: int, opts: "FidelityOptions", render=None) -> Path:
    """`root/1_scene/`: the base's own images for ordinary prompts (prior preservation, as kohya
    users make them with the model they train on), captioned with those prompts. `render`: `_render`
    or a cached stand-in for it (render_cache.cached)."""
    rng = random.Random(opts.seed + 3000)
    folder = Path(root) / "1_scene"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [scenes.random_scene(rng).caption() for _ in range(n)]
    for i, (prompt, image) in enumerate(zip(prompts, (render or _render)(adapter, prompts, opts, scale=opts.reg_scale))):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(prompt, encoding="utf-8")
    return Path(root)


def trigger_scenes(n: int, seed: int, concept: Concept = CONCEPTS["object"]) -> list[scenes.Scene]:
    rng = random.Random(seed + 1000)  # not the training images
    return [concept.scene(rng) for _ in range(n)]


def collateral_scenes(n: int, seed: int) -> list[scenes.Scene]:
    rng = random.Random(seed + 2000)
    return [scenes.random_scene(rng) for _ in range(n)]


# -- scoring ------------------------------------------------------------------------------------
def _render(adapter, prompts: list[str], opts: FidelityOptions, scale: float | None = None) -> list:
    from lora_train.sample.render import render_batch

    return render_batch(adapter, prompts, seed=opts.seed + 7, steps=opts.sample_steps, scale=opts.scale if scale is None else scale,
                        width=scenes.SIZE, height=scenes.SIZE)


def concept_rate(images, scene_list, concept: Concept = CONCEPTS["object"]) -> tuple[float, dict[str, float]]:
    """The fraction of images showing the concept with every label the trigger prompt asked for right
    (the strict rule of issue 22: pattern, shape, side and background at once), and each label on its
    own ("pattern", "shape", "position", "background", and "all", which is the rate).

    The rule needs a base that draws what it is asked for. The first committed base drew circle vs
    square at chance, and its VAE alone lost the square (its round trip read 29 of 48 purple-orange
    squares as squares, 48 of 48 circles as circles): at 8 x 8 latents the two differ in a few corner
    pixels. The base's third shape is a bar since (scenes.BASE_SHAPES), which differs in its whole
    outline."""
    labels = [score(im) for im in images]
    right = [{"pattern": concept.present(lab, s), "shape": lab.shape == s.shape, "position": lab.position == s.position,
              "background": lab.background == s.background} for lab, s in zip(labels, scene_list)]
    for r in right:
        r["all"] = all(r.values())
    by_label = {k: round(sum(r[k] for r in right) / len(images), 4) for k in CONCEPT_LABELS}
    return sum(r["all"] for r in right) / len(images), by_label


def accuracy(images, scene_list, concept: Concept | None = None) -> tuple[float, dict[str, float]]:
    """All four labels right, and each label on its own (which one a LoRA damaged). With a `concept`
    whose leak a label does not catch (the style's pastel keeps the colour's name), an image showing it
    is wrong too ("no concept" among the labels)."""
    labels = [score(im) for im in images]
    by_label = {k: round(sum(getattr(lab, k) == getattr(s, k) for lab, s in zip(labels, scene_list)) / len(images), 4)
                for k in LABELS}
    checks_leak = concept is not None and concept.LEAK_PASSES_LABELS
    clean = [not (checks_leak and concept.leaked(lab, s)) for lab, s in zip(labels, scene_list)]
    if checks_leak:
        by_label["no concept"] = round(sum(clean) / len(images), 4)
    return sum(lab.matches(s) and ok for lab, s, ok in zip(labels, scene_list, clean)) / len(images), by_label


@torch.no_grad()
def held_out_loss(adapter, scene_list, seed: int, concept: Concept = CONCEPTS["object"]) -> float:
    """Mean eps-prediction error on fresh concept images at fixed noise and timesteps."""
    from lora_train.sample.render import _eval_mode
    from lora_train.testing.base import _to_tensor

    g = torch.Generator().manual_seed(seed)
    pixels = _to_tensor([concept.draw(s) for s in scene_list])
    with _eval_mode(adapter):
        mean, std = adapter.encode_posterior(pixels)
        z = adapter.sample_latents(mean, std, g)
        t = torch.randint(100, 900, (len(scene_list),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = adapter.encode_captions([concept.caption(s) for s in scene_list])
        pred = adapter.predict(noisy, t, cond).float()
    # Written out here, not taken from train.loss.target: the measure must stay right when the
    # trainer's target is wrong (that is one of the bugs it exists to catch).
    target = noise if adapter.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
    return float((pred - target).pow(2).mean())


def _load_network(path: Path, adapter):
    from lora_train.network.network import network_from_file

    return network_from_file(path, adapter.file_targets()).to(adapter.device)


def evaluate_file(path: Path, epoch: int, adapter, opts: FidelityOptions, load=None) -> tuple[EpochResult, dict]:
    """Score one LoRA file as it is on disk. Returns the result and the images per weight. `load(path,
    adapter)` builds the network from the file (a negative control's broken loader, controls.py)."""
    concept = opts.kind
    triggers = trigger_scenes(opts.eval_prompts, opts.seed, concept)
    others = collateral_scenes(opts.collateral_prompts, opts.seed)
    held_out = trigger_scenes(64, opts.seed + 1, concept)
    network = (load or _load_network)(path, adapter)
    rates, by_label, images, losses = {}, {}, {}, {}
    network.apply()
    try:
        for w in LOSS_WEIGHTS:
            network.set_multiplier(w)
            losses[_loss_key(w)] = round(held_out_loss(adapter, held_out, opts.seed, concept), 5)
            if w in WEIGHTS:
                images[w] = _render(adapter, [concept.caption(s) for s in triggers], opts)
                rates[f"{w:.1f}"], by_label[f"{w:.1f}"] = concept_rate(images[w], triggers, concept)
        network.set_multiplier(1.0)
        collateral, collateral_by_label = accuracy(_render(adapter, [s.caption() for s in others], opts), others, concept)
    finally:
        network.remove()
    return EpochResult(epoch, str(path), rates, collateral, collateral_by_label, losses, by_label), images


def _loss_key(w: float) -> str:
    return f"{w:.2f}"


# -- training -----------------------------------------------------------------------------------
def default_output_name(opts: FidelityOptions) -> str:
    return f"{TRIGGER}-{opts.network}" if opts.concept == "object" else f"{TRIGGER}-{opts.concept}-{opts.network}"


def train_config(opts: FidelityOptions, data: Path, model: str, reg: Path | None = None):
    from lora_train.train.config import TrainConfig

    config = TrainConfig()
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": str(data),
        "output_dir": str(opts.output),
        "output_name": opts.output_name or default_output_name(opts),
        "resolution": str(scenes.SIZE),
        "network_dim": 8,
        "network_alpha": 8,
        "unet_lr": 3e-3,
        "text_encoder_lr": 1e-3,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        # Min-SNR weighting at the value sd-scripts' docs suggest: it spends less of the loss on the
        # near-clean timesteps. LoRA, text encoder, 6 epochs: pattern 0.83 -> 0.92, all labels 0.77 -> 0.80
        "min_snr_gamma": 5,
        "train_batch_size": opts.batch_size,
        "max_train_epochs": opts.epochs,
        "save_every_n_epochs": 1 if opts.epochs <= 4 else 2,
        "network_train_unet_only": not opts.train_text_encoder,
        "cache_latents": True,
        "seed": opts.seed,
        "reg_data_dir": str(reg) if reg else None,
    }
    if opts.steps:
        values.update(max_train_epochs=None, max_train_steps=int(opts.steps))
    values.update(NETWORKS[opts.network])
    config.update(values, source="fidelity")
    return config


def run(opts: FidelityOptions, log=print, listeners=(), *, prepare_data=None, final_only: bool = False,
        cache: Path | None = None) -> FidelityReport:
    """Train, then score every saved epoch. `listeners` get the trainer's events (progress, loss log).
    For the negative controls (controls.py): `prepare_data(data, reg)` changes the datasets before
    training, `final_only` scores the last file only, and `cache` is a folder that keeps the base's
    own renders (regularization images, base scores) for the next run with the same base and options."""
    from lora_train.app import job
    from lora_train.model.registry import load_adapter
    from lora_train.model.tinybase import base_checkpoint
    from lora_train.train import events as ev

    started = time.time()
    opts.output = Path(opts.output)
    model = opts.model or str(base_checkpoint())
    concept = opts.kind
    data = make_concept_dataset(opts.output / "dataset", opts.images, opts.repeats, opts.seed, concept)
    adapter = load_adapter(model)
    render = _render
    if cache:
        from lora_train.testing.render_cache import cached

        render = cached(_render, cache, model)
    reg = make_reg_dataset(opts.output / "reg", adapter, opts.reg_images, opts, render) if opts.reg_images else None
    if prepare_data:
        prepare_data(data, reg)
    config = train_config(opts, data, model, reg)

    triggers = trigger_scenes(opts.eval_prompts, opts.seed, concept)
    others = collateral_scenes(opts.collateral_prompts, opts.seed)
    base_images = render(adapter, [concept.caption(s) for s in triggers], opts)
    base_accuracy, base_by_label = accuracy(render(adapter, [s.caption() for s in others], opts), others, concept)
    base_rate, base_concept_by_label = concept_rate(base_images, triggers, concept)
    report = FidelityReport(base_rate=base_rate, base_accuracy=base_accuracy, base_by_label=base_by_label,
                            base_concept_by_label=base_concept_by_label)
    log(f"base: concept rate {report.base_rate:.2f} on trigger prompts, accuracy {report.base_accuracy:.2f} without trigger")

    saved: list[tuple[int, Path]] = []

    def listen(e):
        if isinstance(e, ev.Started):
            log(f"training: {e.num_images} images, {e.epochs} epochs x {e.steps_per_epoch} steps = {e.total_steps} steps")
        elif isinstance(e, ev.CheckpointSaved):
            saved.append((e.epoch, Path(e.path)))
        elif isinstance(e, ev.Failed):
            log(f"training failed at step {e.step}: {e.error}")
        for listener in listeners:
            listener(e)

    trainer = job.build_trainer(config, adapter, warn=log)
    config.save_toml(opts.output / f"{config.saving.output_name}.toml")
    final = trainer.run(listen)
    if final is None:
        raise RuntimeError("training did not finish")
    saved = [s for s in saved if s[1] != Path(final)] + [(trainer.epoch, Path(final))]
    rows = []
    for epoch, path in saved[-1:] if final_only else saved:
        result, images = evaluate_file(path, epoch, adapter, opts)
        report.epochs.append(result)
        rows.append((f"epoch {epoch}", images))
        log(f"epoch {epoch}: concept {result.concept}, collateral {result.collateral:.2f}")
    report.grid = str(write_grid(opts.output / "fidelity-grid.png", [("base", {w: base_images for w in WEIGHTS})] + rows))
    report.seconds = time.time() - started
    (opts.output / "fidelity.json").write_text(json.dumps(report.as_dict(), indent=1), encoding="utf-8")
    return report


# -- the bar ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    concept_at_1: float = 0.9
    off_above_base: float = 0.10
    collateral_drop: float = 0.10
    monotone_slack: float = 0.0  # allowed dip between neighbouring weights (sampling noise on few prompts)
    # where the held-out loss may bottom out: both ways, so a loader that halves the scale fails as
    # well as one that doubles it
    best_weight: tuple[float, float] = (0.8, 1.25)


def failures(report: FidelityReport, bar: Thresholds = Thresholds()) -> list[str]:
    """What in the final LoRA misses the bar; empty when it passes."""
    w = report.weights
    out = []
    if w["1.0"] < bar.concept_at_1:
        out.append(f"concept rate at weight 1.0 is {w['1.0']:.2f} < {bar.concept_at_1:.2f}")
    if w["0.0"] > report.base_rate + bar.off_above_base:
        out.append(f"concept rate at weight 0.0 is {w['0.0']:.2f} > base {report.base_rate:.2f} + {bar.off_above_base:.2f}")
    if not (w["1.0"] + bar.monotone_slack >= w["0.5"] and w["0.5"] + bar.monotone_slack >= w["0.0"]):
        out.append(f"concept rate is not monotone in weight: {w}")
    if report.collateral_drop > bar.collateral_drop:
        out.append(f"accuracy without the trigger drops by {report.collateral_drop:.2f} > {bar.collateral_drop:.2f}")
    lo, hi = bar.best_weight
    if not lo <= report.best_weight <= hi:
        out.append(f"held-out loss is lowest at weight {report.best_weight:g}, not in [{lo:g}, {hi:g}]: "
                   "the file is not applied at the scale it was trained at")
    return out


# -- output -------------------------------------------------------------------------------------
def write_grid(path: Path, rows: list[tuple[str, dict]], tiles: int = 4) -> Path:
    """Rows = epochs, columns = weights (as an X/Y/Z plot); each cell tiles the first trigger prompts."""
    from PIL import Image, ImageDraw

    cell = scenes.SIZE * 2  # 2 x 2 tiles
    label_w, head_h = 80, 20
    grid = Image.new("RGB", (label_w + cell * len(WEIGHTS), head_h + cell * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    for j, w in enumerate(WEIGHTS):
        d.text((label_w + j * cell + 4, 4), f"weight {w:g}", fill="black")
    for i, (label, by_weight) in enumerate(rows):
        y = head_h + i * cell
        d.text((4, y + cell // 2 - 6), label, fill="black")
        for j, w in enumerate(WEIGHTS):
            for k, im in enumerate(by_weight.get(w, [])[:tiles]):
                grid.paste(im, (label_w + j * cell + (k % 2) * scenes.SIZE, y + (k // 2) * scenes.SIZE))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def format_table(report: FidelityReport) -> str:
    lines = ["epoch  w=1.0  w=0.5  w=0.0  collateral  best-w  file", "-" * 60]
    lines.append(f"base   {'':5}  {'':5}  {report.base_rate:5.2f}  {report.base_accuracy:10.2f}")
    for e in report.epochs:
        c = e.concept
        best = float(min(e.loss_by_weight, key=e.loss_by_weight.get))
        lines.append(f"{e.epoch:<5}  {c['1.0']:5.2f}  {c['0.5']:5.2f}  {c['0.0']:5.2f}  {e.collateral:10.2f}  {best:>6g}  {Path(e.file).name}")
        if e.concept_by_label:
            lines.append("       " + _label_line(e.concept_by_label))
    if report.base_by_label and report.epochs:
        final = report.final.collateral_by_label
        lines.append("without the trigger, base -> final: " + ", ".join(
            f"{k} {report.base_by_label[k]:.2f} -> {final[k]:.2f}" for k in report.base_by_label))
    if report.base_concept_by_label:
        lines.append("trigger prompts, each label at w=1/0.5/0 (base: " + ", ".join(
            f"{k} {v:.2f}" for k, v in report.base_concept_by_label.items()) + ")")
    lines.append(f"collateral drop {report.collateral_drop:+.2f}; grid {report.grid}; {report.seconds:.0f} s")
    return "\n".join(lines)


def _label_line(by_weight: dict[str, dict[str, float]]) -> str:
    """"pattern 0.95/0.40/0.00  shape ...": each concept label at weights 1.0 / 0.5 / 0.0."""
    keys = [f"{w:.1f}" for w in WEIGHTS]
    return "  ".join(f"{k} " + "/".join(f"{by_weight[w][k]:.2f}" for w in keys) for k in CONCEPT_LABELS)
