"""Pure tensor math of training: replayable per-sample draws, targets, SNR weights, the loss.

Randomness: every sample's noise, timestep, caption-dropout decision and latent sample come from
a generator keyed by (seed, position), where `position` counts samples in the training stream
(epoch × dataset size + place in that epoch's permutation). The draws therefore do not depend on
how a batch is split across processes or where a run was interrupted (shared/DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1

# Generator stream ids: one home, so two uses of the same (seed, position) never share a stream.
DRAW_STREAM = 0  # noise, timestep, caption dropout, latent sample (draw_samples)
AUGMENT_STREAM = 1  # crop / flip of the picture (ldm.data.transforms)
VALIDATION_STREAM = 2  # the fixed draws of the validation loss
CAPTION_STREAM = 3  # which caption of a list, and the tag order (ldm.data.transforms.caption_for)
BUCKET_STREAM = 4  # the order of the buckets' batches in an epoch (ldm.data.buckets.BucketPlan)
SKETCH_STREAM, STYLE_STREAM = 11, 12  # condition dropout of sketch / style runs


def mix_seed(*keys: int) -> int:
    """Hash integers into a 63-bit seed (SplitMix64 finaliser per key): nearby keys give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def sample_generator(seed: int, position: int, stream: int = DRAW_STREAM) -> torch.Generator:
    """CPU generator for one sample of the training stream; `stream` separates independent uses."""
    return torch.Generator().manual_seed(mix_seed(seed, stream, position))


@dataclass
class SampleDraws:
    noise: torch.Tensor  # (B, C, h, w) ~ N(0, I)
    timesteps: torch.Tensor  # (B,) long in [0, T)
    drop_caption: torch.Tensor  # (B,) bool
    latent_eps: torch.Tensor  # (B, C, h, w) ~ N(0, I), to sample z = mean + std · eps from q(z|x)


def draw_samples(seed: int, positions: Sequence[int], latent_shape: tuple[int, int, int],
                 num_train_timesteps: int, caption_dropout: float) -> SampleDraws:
    """All random draws for a batch, one generator per sample so each row is independent of the batch."""
    noise, t, drop, eps = [], [], [], []
    for pos in positions:
        g = sample_generator(seed, pos)
        noise.append(torch.randn(latent_shape, generator=g))
        t.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g) < caption_dropout)
        eps.append(torch.randn(latent_shape, generator=g))
    return SampleDraws(torch.stack(noise), torch.cat(t), torch.cat(drop), torch.stack(eps))


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: Literal["epsilon", "v_prediction"]) -> torch.Tensor:
    """ε for epsilon prediction; v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (Salimans & Ho 2022, eq. 11) for v-prediction."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: 'epsilon', 'v_prediction'")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), shape (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float,
                    prediction_type: Literal["epsilon", "v_prediction"]) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper weights the x₀-error by min(SNR, γ). Since ‖x₀ − x̂₀‖² = ‖ε − ε̂‖²/SNR for an ε-model and
    ‖x₀ − x̂₀‖² = ‖v − v̂‖²/(SNR + 1) for a v-model, the weight on our loss is min(SNR, γ)/SNR or
    min(SNR, γ)/(SNR + 1) respectively.
    """
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t
    return clipped / (snr_t + 1.0)


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean-squared error per sample, optionally weighted, averaged over the batch (fp32)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def posterior_variance(betas: torch.Tensor, alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """σ_t² = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) (Ho et al. 2020, eq. 7), with ᾱ_{−1} = 1."""
    prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, dtype=alphas_cumprod.dtype)
    return betas[t] * (1.0 - prev) / (1.0 - alphas_cumprod[t])


def ddpm_reverse_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, betas: torch.Tensor,
                      z: torch.Tensor) -> torch.Tensor:
    """One ancestral DDPM step written out from the formulas (Ho et al. 2020, Algorithm 2):

        x_{t−1} = 1/√α_t · (x_t − β_t/√(1−ᾱ_t) · ε_θ(x_t, t)) + σ_t z,   σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t)

    with no noise added at t = 0. A reference for tests; sampling itself uses Diffusers' schedulers.
    """
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    mean = (x_t - betas[t] / torch.sqrt(1.0 - alphas_cumprod[t]) * eps) / torch.sqrt(alphas[t])
    if t == 0:
        return mean
    return mean + torch.sqrt(posterior_variance(betas, alphas_cumprod, t)) * z


def validation_draws(seed: int, num_images: int, latent_shape: tuple[int, int, int], num_train_timesteps: int,
                     buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise (N·K, C, h, w) and timesteps (N·K,): image i, bucket k gets a t drawn inside
    [k·T/K, (k+1)·T/K), row i·K + k. The same every call, so validation losses are comparable."""
    noise, timesteps = [], []
    width = num_train_timesteps / buckets
    for i in range(num_images):
        for k in range(buckets):
            g = sample_generator(seed, i * buckets + k, stream=VALIDATION_STREAM)
            noise.append(torch.randn(latent_shape, generator=g))
            lo, hi = int(k * width), max(int((k + 1) * width), int(k * width) + 1)
            timesteps.append(torch.randint(lo, hi, (1,), generator=g))
    return torch.stack(noise), torch.cat(timesteps)


def drop_condition(seed: int, positions: Sequence[int], probability: float, stream: int) -> torch.Tensor:
    """(B,) bool: which samples train without their condition (SKETCH_STREAM or STYLE_STREAM), keyed by
    (seed, position) like every draw (a separate stream, so noise, timestep and caption draws are unchanged)."""
    return torch.tensor([torch.rand(1, generator=sample_generator(seed, int(p), stream)).item() < probability
                         for p in positions], dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"; Song et al. 2023)
# --------------------------------------------------------------------------------------------


def solver_timesteps(timesteps: torch.Tensor, num_train_timesteps: int,
                     num_ddim_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map uniform draws t ∈ [0, T) onto the teacher's DDIM grid: (t_n, t_{n−1}) with t_n = (n + 1)·k − 1,
    k = T // num_ddim_timesteps, n = t // k, and t_{n−1} = t_n − k (0 below the grid). The grid is the one
    LCMScheduler samples on (its original_inference_steps), so training and sampling meet the same t."""
    k = num_train_timesteps // num_ddim_timesteps
    n = torch.clamp(timesteps // k, max=num_ddim_timesteps - 1)
    t = (n + 1) * k - 1
    return t, torch.clamp(t - k, min=0)


def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5,
                      timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t) (LCM eq. 9):
    c_skip = σ_d² / ((s·t)² + σ_d²), c_out = s·t / √((s·t)² + σ_d²), so f(x, 0) = x (the boundary condition).
    σ_d = 0.5 and s = 10 are LCMScheduler's defaults, so the student is sampled with the scalings it learnt."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _column(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(-1, 1, 1, 1)


def predicted_original(model_pred: torch.Tensor, x_t: torch.Tensor, alpha_cumprod_t: torch.Tensor,
                       prediction_type: Literal["epsilon", "v_prediction"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from a network output at x_t: x_t = √ᾱ x₀ + √(1−ᾱ) ε, and v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho
    2022). Both are affine in model_pred, so guiding the output and converting commute."""
    a = _column(alpha_cumprod_t)
    if prediction_type == "epsilon":
        eps = model_pred.float()
        return (x_t.float() - (1 - a).sqrt() * eps) / a.sqrt(), eps
    if prediction_type == "v_prediction":
        v = model_pred.float()
        return a.sqrt() * x_t.float() - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x_t.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: 'epsilon', 'v_prediction'")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with σ = 0) to the earlier timestep:
    x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev) ε̂. With the skip k of `solver_timesteps` it spans k training steps."""
    a = _column(alpha_cumprod_prev)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def consistency_output(x: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t)·x + c_out(t)·x̂₀: what the student (and its target) predict for the ODE's end."""
    c_skip, c_out = boundary_scalings(timesteps)
    return _column(c_skip) * x.float() + _column(c_out) * x0


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) in Diffusers' convention: u + w·(c − u), w = 1 is c."""
    return uncond + guidance_scale * (cond - uncond)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: Literal["huber", "l2"] = "huber",
                     huber_c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber √(d² + c²) − c (Song & Dhariwal 2023) or squared error, per element, averaged (fp32)."""
    diff = pred.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()
    return (diff**2).mean()
