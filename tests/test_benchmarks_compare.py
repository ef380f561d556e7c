"""benchmarks/sd_scripts_compare.py: the bar timing, the settings both tools get, the order of runs (no model)."""

import sys
from pathlib import Path

import pytest

from benchmarks import sd_scripts_compare as cmp
from lora_train.train.config import TrainConfig

OURS_BAR = ["  0%|          | 0/3 [00:00<?, ?step/s]",
            " 33%|###       | 1/3 [00:05<00:10,  5.00s/step]",
            " 67%|######    | 2/3 [00:09<00:04,  4.50s/step, epoch=1, loss=0.1]",
            "100%|##########| 3/3 [00:13<00:00,  4.33s/step, epoch=1, loss=0.1]"]


def test_a_redraw_counts_when_it_arrives_not_when_the_next_one_starts():
    """tqdm writes "\\r" + bar: the bar for step n is complete long before the "\\r" of step n+1."""
    clock = cmp.BarClock(cmp._BAR[cmp.OURS])
    for k, bar in enumerate(OURS_BAR):
        clock.feed("\r" + bar, now=10.0 * k)
    clock.feed("\r" + OURS_BAR[-1] + "\n", now=99.0)  # close() redraws the last count
    clock.close(now=100.0)
    assert clock.times == {0: 0.0, 1: 10.0, 2: 20.0, 3: 30.0}
    assert clock.total == 3
    assert cmp.step_seconds(clock.times) == [10.0, 10.0, 10.0]


def test_a_redraw_cut_across_reads_counts_once_whole():
    clock = cmp.BarClock(cmp._BAR[cmp.OURS])
    clock.feed("\r" + OURS_BAR[0], now=0.0)
    line = "\r" + OURS_BAR[1]
    cut = line.index("1/3") + 1  # "... | 1" then "/3 [00:05 ..."
    clock.feed(line[:cut], now=4.0)
    clock.feed(line[cut:], now=5.0)
    assert clock.times == {0: 0.0, 1: 5.0}


def test_sd_scripts_bar_is_the_steps_bar_only():
    """Its latent-caching bar (no description) and log lines between redraws are not steps."""
    clock = cmp.BarClock(cmp._BAR[cmp.SD_SCRIPTS])
    stream = [("  0%|          | 0/4 [00:00<?, ?it/s]", 0.0), ("\r100%|##########| 4/4 [00:30<00:00,  7.59s/it]\n", 30.0),
              ("steps:   0%|          | 0/3 [00:00<?, ?it/s]", 31.0), ("2026-12-05 12:04:25 INFO     epoch is incremented.\n", 31.5),
              ("\rsteps:  33%|###       | 1/3 [00:40<01:20, 40.00s/it]", 71.0),
              ("\rsteps:  33%|###       | 1/3 [00:40<01:20, 40.00s/it, avr_loss=4.2]", 71.1),
              ("\rsteps:  67%|######    | 2/3 [01:20<00:40, 40.00s/it, avr_loss=4.2]", 111.0),
              ("\rsteps: 100%|##########| 3/3 [02:00<00:00, 40.00s/it, avr_loss=4.2]", 151.0)]
    for text, now in stream:
        clock.feed(text, now=now)
    assert clock.times == {0: 31.0, 1: 71.0, 2: 111.0, 3: 151.0}


def test_step_seconds_share_a_skipped_count_and_summary_drops_the_warmup():
    assert cmp.step_seconds({0: 0.0, 1: 9.0, 3: 13.0, 4: 16.0}) == [9.0, 2.0, 2.0, 3.0]
    assert cmp.step_seconds({1: 1.0}) == []
    s = cmp.summarize([30.0, 4.0, 6.0, 5.0], warmup=1)
    assert s == {"s_per_step": 5.0, "min": 4.0, "max": 6.0, "timed_steps": 3}
    assert cmp.summarize([30.0], warmup=1)["s_per_step"] is None


def test_both_tools_get_the_same_settings(tmp_path):
    settings = cmp.settings_for(512, 10, Path("/m/sd15.safetensors"), Path("/d"), tmp_path, Path("/tok"))
    toml = tmp_path / "c.toml"
    toml.write_text(cmp.toml_text(settings), encoding="utf-8")
    config = TrainConfig.from_file(toml)  # ours reads every key: none unknown, none refused
    assert (config.network.network_dim, config.network.network_alpha, config.network.network_train_unet_only) == (32, 16, False)
    assert (config.optimizer.optimizer_type, config.optimizer.unet_lr, config.optimizer.text_encoder_lr) == ("AdamW", 1e-4, 5e-5)
    assert (config.training.max_train_steps, config.training.train_batch_size, config.training.mixed_precision) == (10, 1, "no")
    assert config.dataset.cache_latents and config.dataset.max_data_loader_n_workers == 0
    assert config.dataset.resolution == "512,512" and config.model.pretrained_model_name_or_path == "/m/sd15.safetensors"

    args = cmp.sd_scripts_args(dict(settings, no_half_vae=False))
    assert args[args.index("--network_dim") + 1] == "32" and args[args.index("--network_alpha") + 1] == "16"
    assert args[args.index("--resolution") + 1] == "512,512" and args[args.index("--max_train_steps") + 1] == "10"
    assert args[args.index("--cache_latents") + 1].startswith("--")  # a flag, no value
    assert "--sdpa" in args and "--no_half_vae" not in args
    assert args[args.index("--tokenizer_cache_dir") + 1] == "/tok"
    assert args[args.index("--mixed_precision") + 1] == "no"


def test_runs_alternate_their_order_every_round():
    tools = [cmp.OURS, cmp.SD_SCRIPTS]
    assert [cmp.round_order(tools, r) for r in range(3)] == [tools, tools[::-1], tools]


def test_run_one_times_a_real_tqdm_child(tmp_path):
    """A child drawing a tqdm bar the way ours does (no redraw after the update): every step is
    seen at its own time, and the child's peak RSS comes back."""
    child = ("import time, sys\nfrom tqdm import tqdm\nbar = tqdm(total=4, unit='step', file=sys.stderr)\n"
             "for i in range(4):\n    time.sleep(0.25)\n    bar.update(1)\n    bar.set_postfix(loss=0.1, refresh=False)\n"
             "bar.close()\n")
    result, clock = cmp.run_one(cmp.OURS, [sys.executable, "-c", child], {"PYTHONUNBUFFERED": "1"}, tmp_path,
                                tmp_path / "log.txt", warmup=1)
    assert result.returncode == 0 and sorted(clock.times) == [0, 1, 2, 3, 4]
    assert len(result.step_s) == 4 and min(result.step_s) >= 0.2  # none read late and then bunched up
    assert result.timed_steps == 3 and result.s_per_step >= 0.2
    assert result.peak_rss_mb is not None and result.peak_rss_mb > 5
    assert "4/4" in (tmp_path / "log.txt").read_text(encoding="utf-8")


def test_the_table_gives_the_ratio_ours_over_sd_scripts():
    runs = [cmp.RunResult(cmp.OURS, 256, 0, 0, 60.0, s_per_step=5.0, peak_rss_mb=6000),
            cmp.RunResult(cmp.SD_SCRIPTS, 256, 0, 0, 90.0, s_per_step=10.0, peak_rss_mb=8000),
            cmp.RunResult(cmp.OURS, 256, 1, 0, 60.0, s_per_step=7.0, peak_rss_mb=6100),
            cmp.RunResult(cmp.SD_SCRIPTS, 256, 1, 1, 90.0, s_per_step=1.0, peak_rss_mb=1)]  # failed: not counted
    text, rows = cmp.summary(runs, [256])
    assert rows == [{"size": 256, "ours_s_per_step": 6.0, "sd-scripts_s_per_step": 10.0, "ours_peak_rss_mb": 6100,
                     "sd-scripts_peak_rss_mb": 8000, "ratio_s_per_step": pytest.approx(0.6), "ratio_peak_rss": pytest.approx(0.7625)}]
    assert "0.60" in text and "ours/sds" in text
    assert "256" in cmp.table(runs)
