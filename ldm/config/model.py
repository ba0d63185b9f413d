"""The model section of the schema: the VAE, the text encoder, the UNet's architecture, the noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class VAEConfig:
    path: Optional[str] = "stabilityai/sd-vae-ft-mse"  # Hub id or local folder (AutoencoderKL)
    """`AutoencoderKL`: Hub id, local folder, or stage-1 output"""
    subfolder: Optional[str] = None
    """e.g. `vae` inside a pipeline folder"""
    # fp32 by default: the SD VAE overflows in fp16 and turns whole batches into NaN.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype the VAE encodes in (`float16` risks NaN latents)"""


@dataclass
class TextEncoderConfig:
    path: str = "openai/clip-vit-large-patch14"  # Hub id or local folder (tokenizer + encoder)
    """tokenizer + encoder: Hub id, folder, or `pkg://package/dir`"""
    subfolder: Optional[str] = None  # e.g. "text_encoder" inside a pipeline folder
    """e.g. `text_encoder` inside a pipeline folder"""
    tokenizer_subfolder: Optional[str] = None
    """defaults to `tokenizer` when `subfolder` is `text_encoder`"""
    max_length: Optional[int] = None  # tokens; None keeps the tokenizer's own limit (77 for CLIP)
    """tokens per prompt; null keeps the tokenizer's limit (77 for CLIP)"""
    # frozen (default); lora: adapters on its attention projections (with lora.enabled, same rank and alpha);
    # full: every weight (a full fine-tune, lora.enabled=false). Trained, its prompt embeddings are not cached.
    train: Literal["frozen", "lora", "full"] = "frozen"
    """`frozen`; `lora` (adapters on its attention, with `lora.enabled`); `full` (every weight, without
    `lora.enabled`)"""
    lr: Optional[float] = None  # its learning rate when it trains; null: train.lr
    """its learning rate when it trains (null: `train.lr`)"""


@dataclass
class UNetConfig:
    path: Optional[str] = None  # load a pretrained UNet; None builds one from the fields below
    """load a pretrained UNet instead of building one"""
    subfolder: Optional[str] = None
    """e.g. `unet` inside a pipeline folder"""
    # One entry per resolution level, highest resolution first (the SD-1.5 layout by default).
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    """channels per resolution level, highest resolution first"""
    cross_attention: list[bool] = field(default_factory=lambda: [True, True, True, False])
    """cross-attention to the text at each level"""
    layers_per_block: int = 2
    """ResNet layers per level"""
    attention_head_dim: int = 8
    """Diffusers' (SD-1.x) name: the number of attention heads"""
    transformer_layers_per_block: int = 1
    """transformer blocks per attention layer"""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every level's channels"""
    cross_attention_dim: Optional[int] = None  # None: derived from the text encoder's width
    """derived from the text encoder's width; a mismatch is an error"""


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    """T"""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    """`linear` (DDPM), `scaled_linear` (SD), `squaredcos_cap_v2` (cosine)"""
    beta_start: float = 0.00085
    """β_1"""
    beta_end: float = 0.012
    """β_T"""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """`epsilon` or `v_prediction`"""
    rescale_betas_zero_snr: bool = False
    """rescale to zero terminal SNR (Lin et al. 2024)"""


@dataclass
class ModelConfig:
    # Fine-tune an exported pipeline (a folder or Hub id in the Stable-Diffusion layout): its UNet, VAE,
    # text encoder and noise schedule replace the sections below (the UNet's architecture included).
    pretrained: Optional[str] = None
    """fine-tune an exported pipeline (folder or Hub id): its UNet, VAE, text encoder and noise schedule replace the
    `model.*` sections"""
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
