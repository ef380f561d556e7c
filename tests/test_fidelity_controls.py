"""Negative controls of the fidelity bar that need a training run of their own. A module apart
from tests/test_fidelity.py so that `make test`'s two workers (pytest-xdist, one file per worker)
run it beside the shared concept run, not after it."""

from test_fidelity import CI_BAR, _options
from lora_train.testing import fidelity


def test_swapped_target_fails_the_bar(tmp_path, monkeypatch):
    """Training an eps model towards v (or the reverse) must not pass."""
    from lora_train.train import loss

    original = loss.target

    def swapped(latents, noise, alphas_t, prediction_type):
        return original(latents, noise, alphas_t, "v" if prediction_type == "epsilon" else "epsilon")

    monkeypatch.setattr(loss, "target", swapped)
    # fewer regularization and collateral renders: a broken target fails on the concept rate itself
    report = fidelity.run(_options(tmp_path, epochs=2, reg_images=36, collateral_prompts=32), log=lambda m: None)
    assert fidelity.failures(report, CI_BAR), fidelity.format_table(report)
