"""The UNet and the noise scheduler built from the typed config (the UNet's arguments, its FLOPs)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from ldm.config.model import SchedulerConfig, UNetConfig
from ldm.config.schema import Config
from ldm.errors import ConfigError
from ldm.models.loading import TextEncoderInfo, VAEInfo, _load, resolve_path


def unet_kwargs(cfg: UNetConfig, cross_attention_dim: int, sample_size: int, in_channels: int) -> dict:
    """UNet2DConditionModel arguments from the compact per-level description in the config."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention)]
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    )


def build_unet(cfg: Config, vae: VAEInfo, text: TextEncoderInfo) -> UNet2DConditionModel:
    u = cfg.model.unet
    if u.path is not None:
        path = resolve_path(u.path)
        unet = _load("model.unet", path, lambda: UNet2DConditionModel.from_pretrained(
            path, subfolder=u.subfolder, use_safetensors=True))
        if unet.config.cross_attention_dim != text.hidden_size:
            raise ConfigError(f"model.unet.path: the UNet's cross_attention_dim {unet.config.cross_attention_dim} "
                              f"does not match the text encoder's width {text.hidden_size}")
        return unet
    sample_size = cfg.data.resolution // vae.downsample
    return UNet2DConditionModel(**unet_kwargs(u, text.hidden_size, sample_size, vae.latent_channels))


def scheduler_kwargs(cfg: SchedulerConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        # Latents are not bounded to [-1, 1]: clipping x0 there (DDPM's default) would distort them.
        clip_sample=False,
        # "trailing" spacing includes t = T-1 and works for any step count up to T
        # (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).
        timestep_spacing="trailing",
        steps_offset=1,
    )


def build_scheduler(cfg: SchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(cfg))


def unet_flops_per_image(unet_config: dict, seq_len: int) -> int:
    """Forward FLOPs of the UNet for one image, counted on the meta device (no weights, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        size = unet_config["sample_size"]
        x = torch.empty(1, unet_config["in_channels"], size, size)
        t = torch.zeros(1, dtype=torch.long)
        ctx = torch.empty(1, seq_len, unet_config["cross_attention_dim"])
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx)
    return int(counter.get_total_flops())
