"""Status, plan and loss chart as small HTML fragments (inline SVG: no plotting library, no
JavaScript, renders the same in the WebUI and the standalone page)."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Optional

from lora_train.network.selftest import check_failed


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or math.isinf(seconds) or math.isnan(seconds):
        return "-"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def loss_chart(losses: list[tuple[int, float]], t, width: int = 480, height: int = 180,
               validation: list[tuple[int, float]] = ()) -> str:
    """Raw loss per step (light) and its moving average (bold), steps on x; with validation_split, the
    loss on the held-out images as a second line (blue, a dot per pass)."""
    n = len(losses)
    if n == 0:
        return f'<div id="lora_train_chart_svg" data-points="0" class="lora-train-chart-empty">{html.escape(t("No loss yet"))}</div>'
    steps = [s for s, _ in losses]
    values = [v if math.isfinite(v) else 0.0 for _, v in losses]
    smooth = ema(values)
    held = [(s, v) for s, v in validation if math.isfinite(v)]
    lo, hi = min(values + [v for _, v in held]), max(values + [v for _, v in held])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad_l, pad_b, pad_t, pad_r = 48, 20, 8, 8
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, value):
        x = pad_l + (step - x0) / (x1 - x0) * (width - pad_l - pad_r)
        y = pad_t + (hi - value) / (hi - lo) * (height - pad_t - pad_b)
        return f"{x:.1f},{y:.1f}"

    raw = " ".join(xy(s, v) for s, v in zip(steps, values))
    avg = " ".join(xy(s, v) for s, v in zip(steps, smooth))
    second = ""
    if held:
        points = [xy(s, v) for s, v in held]
        dots = "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2" fill="#3b82f6"/>' for p in points)
        second = (f'<polyline id="lora_train_chart_validation" data-points="{len(held)}" points="{" ".join(points)}" fill="none" '
                  f'stroke="#3b82f6" stroke-width="1.5"/>{dots}'
                  f'<text x="{width - pad_r - 4}" y="{pad_t + 12}" font-size="10" text-anchor="end" fill="#3b82f6">'
                  f'{html.escape(t("validation loss"))}</text>')
    label = html.escape(t("loss"))
    return (
        f'<svg id="lora_train_chart_svg" data-points="{n}" data-last-step="{steps[-1]}" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{label}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}" fill="none" stroke="#8884"/>'
        f'<text x="4" y="{pad_t + 10}" font-size="10" fill="currentColor">{hi:.3g}</text>'
        f'<text x="4" y="{height - pad_b}" font-size="10" fill="currentColor">{lo:.3g}</text>'
        f'<text x="{pad_l}" y="{height - 4}" font-size="10" fill="currentColor">{x0}</text>'
        f'<text x="{width - pad_r}" y="{height - 4}" font-size="10" text-anchor="end" fill="currentColor">{steps[-1]}</text>'
        f'<polyline points="{raw}" fill="none" stroke="#f97316" stroke-opacity="0.35" stroke-width="1"/>'
        f'<polyline points="{avg}" fill="none" stroke="#f97316" stroke-width="2"/>'
        f"{second}</svg>"
    )


# Spelled out: bare words like "training" are keys other extensions' zh_CN files translate otherwise.
PHASE_LABELS = {
    "queued": "Waiting in queue", "preparing": "Preparing the model", "training": "Training in progress",
    "finished": "Training finished", "cancelled": "Stopped by user", "failed": "Training failed", "refused": "Cannot start",
}


STOPPING = "Stopping: saving after the current step"


def ended_time(at: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def status_html(status, t, queued: list[str] | None = None, paused: bool = False) -> str:
    if status is None:
        return f'<div id="lora_train_state" data-phase="idle">{html.escape(t("Idle: set a dataset folder and press Start."))}</div>'
    phase = status.phase
    ended = status.ended
    state = STOPPING if status.stopping and not ended else PHASE_LABELS.get(phase, phase)
    rows = [
        (t("Run name"), status.name),
        (t("State"), t(state)),
        (t("Step"), f"{status.step} / {status.total_steps or '?'}"),
        (t("Epoch"), f"{status.epoch} / {status.epochs or '?'}"),
        (t("Speed"), f"{status.steps_per_second:.2f} it/s" if status.steps_per_second and not ended else "-"),
    ]
    # only what is true now: an ETA while training goes on, the time it ended once it has
    if ended:
        rows.append((t("Ended"), ended_time(status.ended_at)))
    elif phase == "training" and not status.stopping:
        rows.append((t("ETA"), _fmt_time(status.eta_seconds)))
    rows.append((t("Loss"), f"{status.last_loss:.4f}" if status.last_loss is not None else "-"))
    if queued:
        rows.append((t("Queued"), ", ".join(queued) + (f" ({t('queue paused')})" if paused else "")))
    pct = 100.0 * status.step / status.total_steps if status.total_steps else 0.0
    parts = [
        f'<div id="lora_train_state" data-phase="{html.escape(phase)}" data-step="{status.step}" data-total="{status.total_steps}">',
        f'<div class="lora-train-bar"><div style="width:{pct:.1f}%"></div></div>',
        _table(rows),
    ]
    if status.error:
        parts.append(f'<pre class="lora-train-error">{html.escape(t.text(status.error))}</pre>')
    if status.messages:
        items = "".join(f"<li>{html.escape(t.text(m.splitlines()[0]) if m else m)}</li>" for m in status.messages[-6:])
        parts.append(f'<ul class="lora-train-messages">{items}</ul>')
    parts.append("</div>")
    return "".join(parts)


def files_html(status, t) -> str:
    if status is None or not status.published:
        return f'<div id="lora_train_published" data-count="0">{html.escape(t("No LoRA saved yet"))}</div>'
    folder = str(Path(status.published[-1]).parent)
    items = []
    for p in status.published:
        check = status.checks.get(p, "")
        mark = "✖" if check_failed(check) else ("✔" if check else "")
        star = f' <span title="{html.escape(t("lowest validation loss"))}">★</span>' if p == status.suggested else ""
        items.append(f'<li title="{html.escape(t.text(check))}">{mark} <code>{html.escape(Path(p).name)}</code>{star}</li>')
    return (f'<div id="lora_train_published" data-count="{len(status.published)}">'
            f'<div class="lora-train-folder">{html.escape(t.labelled("LoRA folder", ""))}<code>{html.escape(folder)}</code></div>'
            f'<ul>{"".join(items)}</ul>{ranking_table(status, t)}</div>')


def ranking_table(status, t) -> str:
    """After a run with validation_split: its saves by the loss on the held-out images (`pick`'s
    ranking), the suggested file starred."""
    if not status.ranking:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (t("File"), t("Epoch"), t("Validation loss")))
    rows = []
    for file, epoch, loss in status.ranking:
        best = file == status.suggested
        attrs = f' class="lora-train-suggested" title="{html.escape(t("lowest validation loss"))}"' if best else ""
        cells = (Path(file).name + (" ★" if best else ""), "-" if epoch is None else str(epoch), "-" if loss is None else f"{loss:.6f}")
        rows.append(f'<tr data-file="{html.escape(Path(file).name)}" data-suggested="{int(best)}"{attrs}>'
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f'<div id="lora_train_ranking"><p>{html.escape(t("Saves by validation loss"))}</p>'
            f'<table class="lora-train-table"><tr>{head}</tr>{"".join(rows)}</table></div>')


def plan_html(plan, t, estimate: list[str] = ()) -> str:
    """The plan's numbers and buckets; `estimate`: its time and memory lines (translated), when estimated."""
    guideline = f"{plan.guideline_total}"
    rows = [
        (t("Training images"), plan.train_images),
        (t("Regularization images"), plan.reg_images),
        *([(t("Held-out images (validation_split)"), len(plan.validation))] if plan.validation else []),
        (t("Images x repeats"), plan.train_samples),
        (t("Steps per epoch"), plan.steps_per_epoch),
        (t("Epochs"), plan.epochs),
        (t("Total steps"), plan.total_steps),
        (t("Guideline (images x repeats x 4, usually 1000-2000)"), guideline),
    ]
    buckets = [f"{w}x{h}: {n}" for b in plan.blocks for (w, h), n in _bucket_rows(b)]
    parts = [f'<div id="lora_train_plan_info" data-total-steps="{plan.total_steps}" data-steps-per-epoch="{plan.steps_per_epoch}">',
             _table(rows)]
    if buckets:
        parts.append(f"<p>{html.escape(t.labelled('Buckets', ', '.join(buckets)))}</p>")
    if estimate:
        parts.append(f'<p id="lora_train_estimate" style="white-space: pre-line">{html.escape(chr(10).join(estimate))}</p>')
    notes = [f"⚠ {t.text(w)}" for w in plan.warnings] + [f"✖ {t.text(p)}" for p in plan.scan.problems + plan.problems]
    if notes:
        parts.append('<ul class="lora-train-warnings">' + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes[:20]) + "</ul>")
    parts.append("</div>")
    return "".join(parts)


def _table(rows) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="lora-train-table">{body}</table>'


def _bucket_rows(block):
    for row in block.report()["buckets"]:
        yield tuple(row["resolution"]), row["images_x_repeats"]


def error_html(message: str) -> str:
    return f'<div class="lora-train-error" id="lora_train_plan_error"><pre>{html.escape(message)}</pre></div>'
