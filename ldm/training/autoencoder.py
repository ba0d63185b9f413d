"""Stage 1: train an AutoencoderKL on the configured data (the LDM paper's first stage).

Loss: pixel MSE on a sampled latent's reconstruction + `kl_weight` · KL(q(z|x) ‖ N(0, I)); the small
KL term keeps the latent space smooth without blurring much. After training, the latent
`scaling_factor` is set to 1 / std of the training latents (Rombach et al. 2022, sec. 4.3.2 and
appendix G), so the diffusion model sees latents of unit variance; the reconstruction PSNR on
held-out images is reported and saved beside the weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.config.loading import save_config
from ldm.config.schema import AutoencoderConfig, Config, downsampling_factor
from ldm.data.audit import open_audited
from ldm.data.stream import SampleStream, StreamBatches
from ldm.data.transforms import prepare_image
from ldm.errors import ConfigError


def build_autoencoder(cfg: AutoencoderConfig, resolution: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=resolution,
    )


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1).float(), target.float()).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_autoencoder(vae: AutoencoderKL, pixel_values: torch.Tensor, batch_size: int = 64) -> float:
    """Held-out reconstruction PSNR, decoding the posterior mean."""
    recons = []
    for start in range(0, len(pixel_values), batch_size):
        x = pixel_values[start:start + batch_size].to(vae.device)
        recons.append(vae.decode(vae.encode(x).latent_dist.mean).sample.cpu())
    return psnr(torch.cat(recons), pixel_values)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, batches: list[torch.Tensor], generator: torch.Generator) -> float:
    """1 / std of sampled training latents."""
    z = torch.cat([vae.encode(x.to(vae.device)).latent_dist.sample(generator) for x in batches])
    return 1.0 / z.float().std().item()


def check_autoencoder_config(cfg: Config) -> None:
    """Stage 1 only: the latent grid must tile the image exactly."""
    factor = downsampling_factor(cfg.autoencoder.block_out_channels)
    if cfg.data.resolution % factor:
        raise ConfigError(f"config key 'data.resolution': {cfg.data.resolution} is not divisible by the stage-1 VAE's "
                          f"downsampling factor {factor} (autoencoder.block_out_channels has "
                          f"{len(cfg.autoencoder.block_out_channels)} levels)")


def train_autoencoder(cfg: Config, show_progress: bool = True) -> Path:
    check_autoencoder_config(cfg)
    a = cfg.autoencoder
    out = Path(a.output_dir)
    if (out / "config.json").is_file() and not a.overwrite_output_dir:
        raise ConfigError(f"autoencoder.output_dir: {out} already holds a VAE; training would replace it (and every "
                          "stage-2 run that uses it). Choose another autoencoder.output_dir, or set "
                          "autoencoder.overwrite_output_dir=true")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    # 1. Data: the last `num_validation_images` items are held out for PSNR.
    source = open_audited(cfg.data)
    stream = SampleStream(source, cfg.data, a.seed)  # data.max_samples bounds it
    n = stream.size
    held = min(a.num_validation_images, max(1, n // 10)) if n > 1 else 0
    if held < a.num_validation_images:
        print(f"stage 1: {held} held-out image(s) for the PSNR (autoencoder.num_validation_images="
              f"{a.num_validation_images}; the dataset has {n} usable samples)")
    stream.size = n - held  # train on the head of the dataset only
    held_out = [prepare_image(stream.usable(i)[1], cfg.data) for i in range(n - held, n)]
    loader = torch.utils.data.DataLoader(stream, batch_sampler=StreamBatches(a.batch_size, 0, a.max_steps),
                                         num_workers=cfg.data.num_workers)
    # 2. Model and optimiser: AdamW, short warm-up, cosine decay.
    vae = build_autoencoder(a, cfg.data.resolution).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=min(100, a.max_steps // 10),
                             num_training_steps=a.max_steps)
    generator = torch.Generator(device=device).manual_seed(a.seed)
    # 3. Loop.
    vae.train()
    start = time.time()
    bar = tqdm(loader, total=a.max_steps, desc="stage 1 (VAE)", disable=not show_progress)
    for step, batch in enumerate(bar, start=1):
        x = batch["pixel_values"].to(device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        rec_loss = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, so kl_weight does not depend on resolution
        loss = rec_loss + a.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == a.max_steps:
            bar.set_postfix(mse=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
    # 4. Held-out PSNR and the latent scaling factor.
    vae.eval()
    held_psnr = evaluate_autoencoder(vae, torch.stack(held_out)) if held_out else None
    sample_batches = [next(iter(torch.utils.data.DataLoader(
        stream, batch_sampler=StreamBatches(a.batch_size, k, k + 1))))
                      ["pixel_values"] for k in range(4)]
    scaling = latent_scaling_factor(vae, sample_batches, generator)
    vae.register_to_config(scaling_factor=scaling)
    # 5. Save in Diffusers format (safetensors), with the resolved config and the metrics.
    vae.cpu().save_pretrained(out, safe_serialization=True)
    save_config(cfg, out / "ldm_config.yaml")
    metrics = {"psnr_db": round(held_psnr, 2) if held_psnr is not None else None, "scaling_factor": scaling,
               "held_out_images": held, "training_images": stream.size,
               "parameters": sum(p.numel() for p in vae.parameters()), "steps": a.max_steps,
               "minutes": round((time.time() - start) / 60, 2)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    measured = (f"held-out PSNR {held_psnr:.2f} dB on {held} images" if held_psnr is not None
                else "no held-out images (PSNR not measured)")
    print(f"stage 1: {measured}, scaling_factor {scaling:.4f}, "
          f"{metrics['parameters'] / 1e6:.2f}M params, {metrics['minutes']} min -> {out}")
    return out


def save_untrained_autoencoder(cfg: Config, folder: str | Path) -> Path:
    """The stage-1 architecture with random weights, saved in Diffusers format (same cost as a trained one:
    for benchmarks where no trained VAE is at hand)."""
    torch.manual_seed(cfg.autoencoder.seed)
    build_autoencoder(cfg.autoencoder, cfg.data.resolution).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
