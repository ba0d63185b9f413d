"""What trains: the table that picks one implementation per run, and the wrappers that compose with any of
them (shared/DESIGN.md). This package is the only place that asks which kind a config trains."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ldm.config.schema import Config
from ldm.training.trainables.base import Trainable
from ldm.training.trainables.distillation import ConsistencyDistillation
from ldm.training.trainables.distillation import card_facts as distillation_card_facts
from ldm.training.trainables.lora import LoRA
from ldm.training.trainables.sketch import SketchControlNet
from ldm.training.trainables.style import StyleAdapter
from ldm.training.trainables.text_encoder import TrainedTextEncoder

# What a run's config trains: each kind builds from (cfg, unet, load_unet, vae_downsample, text).
KINDS: dict[str, Callable[..., Trainable]] = {
    "text": lambda cfg, unet, load_unet, vae_downsample, text: Trainable(cfg, unet),
    "sketch": lambda cfg, unet, load_unet, vae_downsample, text: SketchControlNet(cfg, unet, vae_downsample),
    "style": lambda cfg, unet, load_unet, vae_downsample, text: StyleAdapter(cfg, unet, load_unet),
    # a few-step student of the pretrained UNet, which stays beside it as the teacher
    "distillation": lambda cfg, unet, load_unet, vae_downsample, text: ConsistencyDistillation(cfg, unet, text),
}

# What a kind's model card says of it, beyond the config (ldm.interop.model_card renders it).
CARD_FACTS: dict[str, Callable[[Config], dict]] = {"distillation": distillation_card_facts}

# Where a run's export can go (a run folder keeps these apart from what it may delete).
EXPORT_FOLDERS = tuple(dict.fromkeys((Trainable.export_folder, "lora")))


def kind_of(cfg: Config) -> str:
    """The row of `KINDS` a config trains: a distillation, or the conditioning type."""
    return "distillation" if cfg.distill.enabled else cfg.conditioning.type


def card_facts(cfg: Config) -> dict:
    """The facts the model card of what `cfg` trains shows ({} for most kinds)."""
    facts = CARD_FACTS.get(kind_of(cfg))
    return facts(cfg) if facts is not None else {}


def build_trainable(cfg: Config, load_unet: Callable[[], torch.nn.Module], vae_downsample: int,
                    text: Optional[Callable[[], tuple]] = None) -> Trainable:
    """The table: `kind_of(cfg)` picks the implementation once, `lora.enabled` wraps it in a LoRA, and
    `model.text_encoder.train` wraps that so the text encoder (from `text()`: tokenizer, encoder) trains too.

    `load_unet()` returns the text-to-image UNet (built from the config, or the pretrained one)."""
    torch.manual_seed(cfg.train.seed)  # UNet initialisation is identical on every process
    unet = load_unet()
    trainable = KINDS[kind_of(cfg)](cfg, unet, load_unet, vae_downsample, text)
    if cfg.lora.enabled:
        trainable = LoRA(trainable, cfg.lora)
    if cfg.model.text_encoder.train != "frozen":
        assert text is not None, "a trained text encoder needs text=(tokenizer, text_encoder)"
        trainable = TrainedTextEncoder(trainable, *text(), cfg.model.text_encoder.train, cfg.lora)
    return trainable
