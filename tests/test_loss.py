"""Loss weightings, loss types and noise tricks against hand-computed values (sd-scripts semantics)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from lora_train.errors import UserError
from lora_train.train.loss import (
    LossOptions,
    huber_threshold,
    per_sample_loss,
    per_sample_mse,
    snr_weights,
    validate_options,
)
from lora_train.train.noise import (
    NoiseOptions,
    make_noise,
    perturb_noise_for_input,
    sample_timesteps,
    snr,
    zero_terminal_snr_alphas_cumprod,
)

# SD1.x/2.x DDPM schedule ("scaled_linear"). beta_0 = 0.00085 exactly, so at t=0:
# a_0 = 0.99915 and SNR_0 = 0.99915 / 0.00085 = 1175.4706. Later values are cumulative products;
# the ones pinned below are SD's well-known schedule (a_999 = 0.004660).
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
AC = torch.cumprod(1 - BETAS, 0)
SNR_0 = 0.99915 / 0.00085
T = torch.tensor([0, 100, 500, 999])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def close(actual, expected, rel=1e-4):
    # The schedule is float32, as in sd-scripts: SNR_0 comes out as 1175.44, not 1175.47.
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten().tolist()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten().tolist()
    assert actual == pytest.approx(expected, rel=rel, abs=1e-6)


# ---------------------------------------------------------------- schedule and SNR


def test_snr_of_sd_schedule():
    s = snr(AC)
    close(AC[[0, 500, 999]], [0.99915, 0.2763325, 0.0046601])
    close(s[0], SNR_0)
    # SNR = a / (1 - a): a_500 = 0.2763325 -> 0.3818504
    close(s[[500, 999]], [0.3818504, 0.0046819])
    assert bool((s[1:] < s[:-1]).all())


def test_zero_terminal_snr_rescales_schedule():
    z = zero_terminal_snr_alphas_cumprod(AC)
    assert z[-1].item() == 0.0
    assert snr(z)[-1].item() == 0.0
    close(z[0], AC[0], rel=1e-6)
    # sqrt(a) is shifted by sqrt(a_999) = 0.0682649 and rescaled so sqrt(a_0) = 0.9995749 is kept:
    # t=500: sqrt(0.2763325) = 0.5256734 -> (0.5256734 - 0.0682649) * 0.9995749 / 0.9313100 = 0.4909339
    close(z[500], 0.4909339**2)
    assert bool((z[1:] < z[:-1]).all())
    assert z.dtype == AC.dtype


# ---------------------------------------------------------------- SNR weights


def test_min_snr_weights_epsilon():
    w = snr_weights(T, AC, "epsilon", LossOptions(min_snr_gamma=5))
    # min(SNR, 5) / SNR: 5 / 1175.4706 at t=0, 5 / 8.4538937 at t=100, SNR < 5 later -> 1
    close(w, [5 / SNR_0, 5 / 8.4538937, 1.0, 1.0])


def test_min_snr_weights_v():
    w = snr_weights(T, AC, "v", LossOptions(min_snr_gamma=5))
    # min(SNR, 5) / (SNR + 1); once SNR < 5 that is SNR / (SNR + 1) = a_t
    close(w, [5 / (SNR_0 + 1), 5 / 9.4538937, AC[500], AC[999]])


def test_min_snr_gamma_zero_is_off_as_in_sd_scripts():
    close(snr_weights(T, AC, "epsilon", LossOptions(min_snr_gamma=0)), [1, 1, 1, 1])


def test_debiased_weights():
    eps = snr_weights(T, AC, "epsilon", LossOptions(debiased_estimation_loss=True))
    # 1 / sqrt(SNR), SNR capped at 1000 (t=0 would be 1175.47)
    close(eps, [1 / math.sqrt(1000), 1 / math.sqrt(8.4538937), 1 / math.sqrt(0.3818504), 1 / math.sqrt(0.0046819)])
    v = snr_weights(T, AC, "v", LossOptions(debiased_estimation_loss=True))
    # 1 / (SNR + 1) = 1 - a_t below the cap; 1 / 1001 at t=0
    close(v, [1 / 1001, 1 - AC[100], 1 - AC[500], 1 - AC[999]])


def test_scale_v_pred_loss_like_noise_pred():
    w = snr_weights(T, AC, "v", LossOptions(scale_v_pred_loss_like_noise_pred=True))
    # SNR / (SNR + 1) with SNR capped at 1000: 1000/1001 at t=0, else a_t
    close(w, [1000 / 1001, AC[100], AC[500], AC[999]])


def test_v_pred_like_loss_and_weight_order():
    w = snr_weights(T[:2], AC, "epsilon", LossOptions(v_pred_like_loss=0.5))
    # loss + loss / s * 0.5 with s = SNR / (SNR + 1): t=0 -> 1 + 0.5 * 1001/1000 = 1.5005
    close(w, [1.5005, 1 + 0.5 / AC[100]])
    combo = snr_weights(T[:2], AC, "epsilon", LossOptions(min_snr_gamma=5, v_pred_like_loss=0.5, debiased_estimation_loss=True))
    # all three multiply: t=0 -> 5/1175.4706 * 1.5005 / sqrt(1000) = 2.01839e-4
    close(combo[0], 2.01839e-4, rel=1e-4)
    close(combo[1], (5 / 8.4538937) * (1 + 0.5 / AC[100]) / math.sqrt(8.4538937))


# ---------------------------------------------------------------- loss types

# One sample, d = pred - target = [0, 1, 3, -2]
PRED = torch.tensor([0.0, 1.0, 3.0, -2.0]).view(1, 1, 2, 2)
ZERO = torch.zeros_like(PRED)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("l2", 3.5),  # (0 + 1 + 9 + 4) / 4
        ("l1", 1.5),  # (0 + 1 + 3 + 2) / 4
        # c = 0.5: sqrt(d^2 + 0.25) - 0.5 = 0, 0.6180340, 2.5413813, 1.5615528; sum 4.7209681
        ("smooth_l1", 2 * 4.7209681 / 4),  # 2 (sqrt(d^2 + c^2) - c), mean = 2.3604841
        ("huber", 0.5 * 2 * 4.7209681 / 4),  # c * smooth_l1 = 1.1802420
    ],
)
def test_loss_types_by_hand(loss_type, expected):
    opts = LossOptions(loss_type=loss_type, huber_schedule="constant", huber_c=0.5)
    out = per_sample_loss(PRED, ZERO, torch.tensor([0]), AC, "epsilon", opts)
    assert out.shape == (1,)
    close(out, expected)


def test_l2_equals_the_old_mse():
    p, t = torch.randn(3, 4, 5, 5, generator=gen(1)), torch.randn(3, 4, 5, 5, generator=gen(2))
    assert torch.equal(per_sample_loss(p, t, torch.tensor([1, 2, 3]), AC, "v", LossOptions()), per_sample_mse(p, t))


def test_huber_threshold_is_per_sample():
    # Same error d = 1 in both samples; exponential schedule with c = 0.1 gives c(0) = 1, c(500) = sqrt(0.1)
    pred = torch.ones(2, 1, 1, 1)
    out = per_sample_loss(pred, torch.zeros_like(pred), torch.tensor([0, 500]), AC, "epsilon",
                          LossOptions(loss_type="smooth_l1", huber_schedule="exponential"))
    # 2 (sqrt(1 + 1) - 1) = 0.8284271; 2 (sqrt(1.1) - 0.3162278) = 1.4651621
    close(out, [0.8284271, 1.4651621])


def test_huber_threshold_schedules():
    t = torch.tensor([0, 500, 999])
    close(huber_threshold(t, AC, LossOptions(loss_type="huber", huber_schedule="constant", huber_scale=3.0)), [0.3] * 3)
    # huber_scale * 0.1 ** (t / 1000)
    close(huber_threshold(t, AC, LossOptions(loss_type="huber", huber_schedule="exponential")), [1.0, 0.3162278, 0.1002305])
    close(huber_threshold(t, AC, LossOptions(loss_type="smooth_l1", huber_schedule="exponential", huber_scale=2.0)),
          [2.0, 0.6324555, 0.2004610])
    # snr: 0.9 / (1 + sigma)^2 + 0.1, sigma = sqrt((1 - a) / a):
    # t=0: sigma = sqrt(0.00085 / 0.99915) = 0.0291674 -> 0.9 / 1.0591855 + 0.1 = 0.9497092
    # t=500: sigma = sqrt(0.7236675 / 0.2763325) = 1.6182800 -> 0.9 / 6.8554 + 0.1 = 0.2312836
    expected_snr = [0.9497092, 0.2312836, 0.1036913]
    close(huber_threshold(t, AC, LossOptions(loss_type="huber")), expected_snr)
    # sd-scripts ignores huber_scale in the snr schedule
    close(huber_threshold(t, AC, LossOptions(loss_type="huber", huber_scale=3.0)), expected_snr)
    assert huber_threshold(t, AC, LossOptions(loss_type="l2")) is None


def test_per_sample_loss_applies_weights_and_leaves_batch_mean_to_caller():
    pred = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)])
    out = per_sample_loss(pred, torch.zeros_like(pred), torch.tensor([0, 500]), AC, "epsilon", LossOptions(min_snr_gamma=5))
    close(out, [4 * 5 / SNR_0, 1.0])


def test_snr_weights_can_read_the_unfixed_schedule():
    # sd-scripts reads SNR from the schedule before the zero-terminal-SNR fix; on the fixed one SNR_999 = 0
    z = zero_terminal_snr_alphas_cumprod(AC)
    p = torch.ones(1, 1, 2, 2)
    opts = LossOptions(min_snr_gamma=5)
    fixed_only = per_sample_loss(p, torch.zeros_like(p), torch.tensor([999]), z, "epsilon", opts)
    assert torch.isnan(fixed_only).all()  # 0 / 0
    out = per_sample_loss(p, torch.zeros_like(p), torch.tensor([999]), z, "epsilon", opts, snr_alphas_cumprod=AC)
    close(out, [1.0])


def test_unknown_prediction_type():
    with pytest.raises(ValueError):
        snr_weights(T, AC, "x0", LossOptions())


# ---------------------------------------------------------------- noise


LATENTS = torch.zeros(2, 4, 8, 8)


def test_plain_noise_is_the_generators_randn():
    assert torch.equal(make_noise(LATENTS, NoiseOptions(), gen(3)), torch.randn(LATENTS.shape, generator=gen(3)))


def test_noise_offset_shifts_channel_means():
    g = gen(5)
    base = torch.randn(LATENTS.shape, generator=g)
    offsets = torch.randn(2, 4, 1, 1, generator=g)
    noise = make_noise(LATENTS, NoiseOptions(noise_offset=0.1), gen(5))
    shift = noise - base
    # one constant per (sample, channel): 0.1 * N(0, 1)
    close(shift, (0.1 * offsets).expand_as(shift))
    close(noise.mean(dim=(2, 3)), base.mean(dim=(2, 3)) + 0.1 * offsets.view(2, 4))


def test_noise_offset_random_strength_draws_one_strength_per_batch():
    g = gen(6)
    base = torch.randn(LATENTS.shape, generator=g)
    strength = torch.rand(1, generator=g).item() * 0.2
    offsets = torch.randn(2, 4, 1, 1, generator=g)
    noise = make_noise(LATENTS, NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True), gen(6))
    assert 0 <= strength < 0.2
    close(noise - base, (strength * offsets).expand(2, 4, 8, 8))


def test_adaptive_noise_scale_uses_latent_means():
    means = torch.tensor([[2.0, -3.0, 0.0, 1.0], [0.5, 0.5, -1.0, 4.0]])
    latents = means.view(2, 4, 1, 1).expand(2, 4, 8, 8).clone()
    g = gen(7)
    base = torch.randn(latents.shape, generator=g)
    offsets = torch.randn(2, 4, 1, 1, generator=g)
    noise = make_noise(latents, NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.05), gen(7))
    # strength = 0.1 + 0.05 * |mean|: 0.2, 0.25, 0.1, 0.15 / 0.125, 0.125, 0.15, 0.3
    strength = torch.tensor([[0.2, 0.25, 0.1, 0.15], [0.125, 0.125, 0.15, 0.3]])
    close(((noise - base) / offsets)[:, :, 0, 0], strength)


def test_adaptive_noise_scale_clamps_negative_strength():
    latents = torch.full((1, 4, 8, 8), 2.0)
    # 0.1 - 1.0 * |2| < 0 -> clamped to 0: no offset at all
    noise = make_noise(latents, NoiseOptions(noise_offset=0.1, adaptive_noise_scale=-1.0), gen(8))
    assert torch.equal(noise, torch.randn(latents.shape, generator=gen(8)))


def test_noise_offset_zero_disables_adaptive_as_in_sd_scripts():
    noise = make_noise(LATENTS, NoiseOptions(noise_offset=0.0, adaptive_noise_scale=0.5), gen(9))
    assert torch.equal(noise, torch.randn(LATENTS.shape, generator=gen(9)))


def test_multires_zero_iterations_leaves_noise_unchanged():
    noise = make_noise(LATENTS, NoiseOptions(multires_noise_iterations=0), gen(10))
    assert torch.equal(noise, torch.randn(LATENTS.shape, generator=gen(10)))


def test_multires_noise_shape_and_unit_std():
    latents = torch.zeros(2, 4, 64, 48)
    noise = make_noise(latents, NoiseOptions(multires_noise_iterations=6, multires_noise_discount=0.3), gen(11))
    assert noise.shape == latents.shape
    close(noise.std(), 1.0, rel=1e-5)
    assert not torch.equal(noise, torch.randn(latents.shape, generator=gen(11)))


def test_multires_by_hand_and_stops_at_one_pixel():
    # 4x4 latents: step 0 adds a full-size noise (r**0 = 1, weight 1); step 1 has r in [2, 4),
    # so int(4 / r) = 1: a 1x1 noise (a per-channel constant) at weight 0.4, then the loop stops.
    latents = torch.zeros(2, 4, 4, 4)
    g = gen(12)
    base = torch.randn(latents.shape, generator=g)
    r0 = torch.rand(1, generator=g).item()
    full = torch.randn(latents.shape, generator=g)
    r1 = torch.rand(1, generator=g).item() * 2 + 2
    coarse = torch.randn(2, 4, 1, 1, generator=g)
    assert 0 <= r0 < 1 and int(4 / r1) == 1
    expected = base + full + 0.4 * coarse
    expected = expected / expected.std()

    g2 = gen(12)
    noise = make_noise(latents, NoiseOptions(multires_noise_iterations=10, multires_noise_discount=0.4), g2)
    close(noise, expected)
    # nothing drawn after the 1x1 step
    assert torch.equal(g2.get_state(), g.get_state())


def test_multires_full_size_step_is_identity_upsample():
    up = F.interpolate(torch.arange(12.0).view(1, 1, 3, 4), size=(3, 4), mode="bilinear", align_corners=False)
    assert torch.equal(up, torch.arange(12.0).view(1, 1, 3, 4))


# ---------------------------------------------------------------- timesteps


def test_timesteps_default_range():
    t = sample_timesteps(20000, NoiseOptions(), 1000, gen(13))
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min().item() == 0 and t.max().item() == 999
    assert torch.equal(t, torch.randint(0, 1000, (20000,), generator=gen(13)))


def test_timesteps_respect_min_max():
    t = sample_timesteps(5000, NoiseOptions(min_timestep=200, max_timestep=300), 1000, gen(14))
    assert t.min().item() == 200 and t.max().item() == 299
    t = sample_timesteps(5000, NoiseOptions(max_timestep=10), 1000, gen(14))
    assert t.min().item() == 0 and t.max().item() == 9


def test_equal_min_max_is_one_fixed_timestep():
    t = sample_timesteps(8, NoiseOptions(min_timestep=500, max_timestep=500), 1000, gen(15))
    assert t.tolist() == [500] * 8


# ---------------------------------------------------------------- input perturbation


def test_ip_noise_perturbs_only_the_input_noise():
    noise = torch.randn(2, 4, 8, 8, generator=gen(16))
    kept = noise.clone()
    g = gen(17)
    noisy_input = perturb_noise_for_input(noise, NoiseOptions(ip_noise_gamma=0.1), g)
    assert torch.equal(noise, kept)  # the target keeps the clean noise
    close(noisy_input - noise, 0.1 * torch.randn(noise.shape, generator=gen(17)), rel=1e-4)


def test_ip_noise_random_strength():
    noise = torch.zeros(1, 4, 8, 8)
    g = gen(18)
    strength = torch.rand(1, generator=g).item() * 0.3
    extra = torch.randn(noise.shape, generator=g)
    close(perturb_noise_for_input(noise, NoiseOptions(ip_noise_gamma=0.3, ip_noise_gamma_random_strength=True), gen(18)),
          strength * extra)


def test_ip_noise_off_returns_noise_without_drawing():
    noise = torch.randn(1, 4, 2, 2)
    g = gen(19)
    state = g.get_state()
    assert perturb_noise_for_input(noise, NoiseOptions(), g) is noise
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------- determinism


ALL_ON = NoiseOptions(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.02,
                      multires_noise_iterations=6, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                      min_timestep=10, max_timestep=900)


def one_step(seed):
    g = gen(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = make_noise(latents, ALL_ON, g)
    t = sample_timesteps(2, ALL_ON, 1000, g)
    return noise, t, perturb_noise_for_input(noise, ALL_ON, g)


def test_same_seed_same_draws_and_global_rng_untouched():
    torch.manual_seed(1)
    random.seed(1)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    first = one_step(42)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state

    torch.manual_seed(2)  # a different global state must not change anything
    random.seed(2)
    second = one_step(42)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(one_step(43)[0], first[0])


# ---------------------------------------------------------------- validation


def test_validate_accepts_defaults():
    assert validate_options(LossOptions(), NoiseOptions(), "epsilon") == []


@pytest.mark.parametrize(
    "loss, noise, pred, message",
    [
        (LossOptions(loss_type="huberr"), None, None, "did you mean 'huber'"),
        (LossOptions(loss_type="smoothl1"), None, None, "did you mean 'smooth_l1'"),
        (LossOptions(huber_schedule="exponentail"), None, None, "did you mean 'exponential'"),
        (LossOptions(loss_type="huber", huber_c=0.0), None, None, "huber_c must be greater than 0"),
        (LossOptions(min_snr_gamma=-5), None, None, "min_snr_gamma"),
        (LossOptions(scale_v_pred_loss_like_noise_pred=True), None, "epsilon", "only applies to v-prediction"),
        (LossOptions(v_pred_like_loss=0.1), None, "v", "cannot be used with a v-prediction"),
        (LossOptions(), NoiseOptions(adaptive_noise_scale=0.01), None, "adaptive_noise_scale requires noise_offset"),
        (LossOptions(), NoiseOptions(min_timestep=600, max_timestep=500), None, "must not be greater than max_timestep"),
        (LossOptions(), NoiseOptions(min_timestep=1000), None, "min_timestep must be between 0 and 999"),
        (LossOptions(), NoiseOptions(max_timestep=1001), None, "max_timestep must be between 1 and 1000"),
        (LossOptions(), NoiseOptions(multires_noise_iterations=-1), None, "multires_noise_iterations"),
    ],
)
def test_validate_rejects(loss, noise, pred, message):
    with pytest.raises(UserError, match=message):
        validate_options(loss, noise, pred)


def test_validate_allows_what_sd_scripts_allows():
    assert validate_options(LossOptions(), NoiseOptions(min_timestep=500, max_timestep=500)) == []
    assert validate_options(LossOptions(loss_type="l1", huber_c=0.0)) == []  # huber_c unused
    assert validate_options(LossOptions(), NoiseOptions(noise_offset=0.0, adaptive_noise_scale=0.1)) == []
    warnings = validate_options(LossOptions(), NoiseOptions(zero_terminal_snr=True), "epsilon")
    assert len(warnings) == 1 and "zero_terminal_snr" in warnings[0]
    assert validate_options(LossOptions(), NoiseOptions(zero_terminal_snr=True), "v") == []
