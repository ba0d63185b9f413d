"""The diffusion math against the formulas: forward process, posterior variance, reverse step, weights."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config.model import SchedulerConfig
from ldm.data.stream import StreamBatches
from ldm.diffusion import (
    ddpm_reverse_step,
    draw_samples,
    min_snr_weights,
    mix_seed,
    posterior_variance,
    snr,
    training_target,
)
from ldm.inference.pipeline import make_scheduler
from ldm.models.building import build_scheduler


def betas_from_formula(schedule: str, n: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """β_t written out independently of Diffusers."""
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(math.sqrt(start), math.sqrt(end), n, dtype=torch.float64) ** 2
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal 2021)
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_scheduler_betas_match_the_formulas(schedule):
    sched = build_scheduler(SchedulerConfig(beta_schedule=schedule))
    assert torch.allclose(sched.betas.double(), betas_from_formula(schedule), atol=1e-7)


def test_forward_process_is_q_xt_given_x0():
    """add_noise(x0, ε, t) = √ᾱ_t x0 + √(1−ᾱ_t) ε exactly, and its empirical law is N(√ᾱ_t x0, (1−ᾱ_t) I)."""
    sched = build_scheduler(SchedulerConfig())
    abar = torch.cumprod(1 - betas_from_formula("scaled_linear"), 0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    for t in (0, 250, 999):
        timesteps = torch.full((4,), t)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, timesteps)
        expected = abar[t].sqrt() * x0.double() + (1 - abar[t]).sqrt() * noise.double()
        assert torch.allclose(xt.double(), expected, atol=1e-5)
        # The distribution: many noise draws for one fixed x0 pixel grid.
        many = sched.add_noise(x0[:1].expand(20000, -1, -1, -1), torch.randn(20000, 4, 8, 8, generator=g),
                               torch.full((20000,), t))
        assert torch.allclose(many.mean(0).double(), abar[t].sqrt() * x0[0].double(), atol=0.03)
        assert many.var(0).mean().item() == pytest.approx((1 - abar[t]).item(), rel=0.03)


def test_ddpm_sampler_variance_is_the_posterior_variance():
    sched = make_scheduler("ddpm", build_scheduler(SchedulerConfig(beta_schedule="linear",
                                                                   beta_start=1e-4, beta_end=0.02)).config)
    betas = betas_from_formula("linear", start=1e-4, end=0.02)
    abar = torch.cumprod(1 - betas, 0)
    sched.set_timesteps(1000)
    for t in (1, 10, 500, 999):
        sigma2 = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
        # Diffusers recovers β_t as 1 − ᾱ_t/ᾱ_{t−1} in fp32 (≈2e-4 relative error), hence rel 1e-3. That still
        # tells σ_t² from β_t (the "fixed_large" choice): their ratio is 0.45 at t = 1 and 0.9 at t = 10.
        assert sched._get_variance(t).item() == pytest.approx(sigma2.item(), rel=1e-3)
        assert abs(sigma2.item() / betas[t].item() - 1) > 2e-3 or t > 100
        assert posterior_variance(betas, abar, t).item() == pytest.approx(sigma2.item(), rel=1e-12)


def test_written_out_ddpm_step_matches_the_ddpm_sampler():
    """x_{t−1} from the formula equals Diffusers' DDPM step for the same ε and noise z (≤ 1e-5), step by step.

    Both run in float64: in fp32 Diffusers' route through x̂₀ loses ~2e-4 at t = 1 to cancellation, which
    would test float rounding rather than the equations.
    """
    base = build_scheduler(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    sched = make_scheduler("ddpm", base.config)
    sched.set_timesteps(1000)
    betas = sched.betas.double()  # equal to the formula's (test_scheduler_betas_match_the_formulas)
    sched.betas, sched.alphas, sched.alphas_cumprod = betas, 1 - betas, torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in sched.timesteps.tolist():
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)  # stands in for ε_θ(x_t, t)
        z_seed = 1000 + t
        ours = ddpm_reverse_step(x, eps, t, betas,
                                 torch.randn(x.shape, generator=torch.Generator().manual_seed(z_seed),
                                             dtype=torch.float64))
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(z_seed)).prev_sample
        assert (ours - theirs).abs().max().item() <= 1e-5, t
        x = theirs


def test_v_target_and_min_snr_weights():
    sched = build_scheduler(SchedulerConfig(prediction_type="v_prediction"))
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = training_target(sched, x0, noise, t, "v_prediction")
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert training_target(sched, x0, noise, t, "epsilon") is noise
    s = snr(sched.alphas_cumprod, t)
    w_eps = min_snr_weights(s, 5.0, "epsilon")
    w_v = min_snr_weights(s, 5.0, "v_prediction")
    assert w_eps[0].item() == pytest.approx(5.0 / s[0].item(), rel=1e-5)  # high SNR: clipped at γ
    assert w_eps[2].item() == pytest.approx(1.0)  # low SNR: weight 1
    assert torch.allclose(w_v, torch.minimum(s, torch.tensor(5.0)) / (s + 1))


def test_draws_do_not_depend_on_batch_split():
    whole = draw_samples(7, list(range(8)), (4, 2, 2), 1000, 0.5)
    a, b = draw_samples(7, [0, 1, 2, 3], (4, 2, 2), 1000, 0.5), draw_samples(7, [4, 5, 6, 7], (4, 2, 2), 1000, 0.5)
    assert torch.equal(whole.noise, torch.cat([a.noise, b.noise]))
    assert torch.equal(whole.timesteps, torch.cat([a.timesteps, b.timesteps]))
    assert torch.equal(whole.drop_caption, torch.cat([a.drop_caption, b.drop_caption]))
    other_seed = draw_samples(8, list(range(8)), (4, 2, 2), 1000, 0.5)
    assert not torch.equal(whole.noise, other_seed.noise)
    assert len({mix_seed(0, p) for p in range(10_000)}) == 10_000


def test_caption_dropout_rate():
    draws = draw_samples(0, list(range(4000)), (1, 1, 1), 1000, 0.1)
    assert draws.drop_caption.float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert 0 <= draws.timesteps.min() and draws.timesteps.max() < 1000


def test_two_processes_at_b_see_what_one_process_sees_at_2b():
    one = StreamBatches(8, 0, 3)
    r0, r1 = StreamBatches(4, 0, 3, rank=0, world_size=2), StreamBatches(4, 0, 3, rank=1, world_size=2)
    for k in range(3):
        assert one.positions(k) == r0.positions(k) + r1.positions(k)


def test_validation_draws_are_fixed_and_fall_in_their_buckets():
    from ldm.diffusion import validation_draws

    noise, t = validation_draws(0, 6, (4, 2, 2), 1000, 10)
    again, t2 = validation_draws(0, 6, (4, 2, 2), 1000, 10)
    assert torch.equal(noise, again) and torch.equal(t, t2)
    assert [int(x) // 100 for x in t[:10]] == list(range(10))  # image 0, buckets 0..9 in order


def test_validation_loss_of_a_zero_prediction_is_the_noise_power():
    """A model predicting ε̂ = 0 has loss E‖ε‖² = 1 (per element) in every bucket."""
    from types import SimpleNamespace

    from ldm.training.validation import validation_loss

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context):
            return SimpleNamespace(sample=torch.zeros_like(x))

    losses = validation_loss(Zero(), build_scheduler(SchedulerConfig()), torch.randn(64, 4, 8, 8),
                             torch.randn(64, 3, 5), "epsilon", buckets=4)
    assert list(losses) == ["t000-249", "t250-499", "t500-749", "t750-999", "mean"]
    assert all(v == pytest.approx(1.0, abs=0.05) for v in losses.values())


def test_validation_loss_does_not_depend_on_the_sampler_it_is_given():
    """Any scheduler config of the model gives the same loss: noising always uses q(x_t|x_0)."""
    from types import SimpleNamespace

    from ldm.training.validation import validation_loss

    class Echo(torch.nn.Module):  # predicts ε̂ = x_t: good at high t, wrong at low t
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context):
            return SimpleNamespace(sample=x)

    base = build_scheduler(SchedulerConfig())
    dpm = make_scheduler("dpm++", base.config)
    dpm.set_timesteps(20)
    latents, embeds = torch.randn(32, 4, 4, 4), torch.randn(32, 3, 5)
    a = validation_loss(Echo(), base, latents, embeds, "epsilon", buckets=4)
    b = validation_loss(Echo(), dpm, latents, embeds, "epsilon", buckets=4)
    assert a == b
    assert a["t750-999"] < 0.1 < a["t000-249"]  # x_t ≈ ε only at high noise
