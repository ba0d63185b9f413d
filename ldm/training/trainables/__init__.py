"""What trains: the table that picks one implementation per run (shared/DESIGN.md)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ldm.config.schema import Config
from ldm.training.trainables.base import Trainable
from ldm.training.trainables.distillation import ConsistencyDistillation
from ldm.training.trainables.lora import LoRA
from ldm.training.trainables.sketch import SketchControlNet
from ldm.training.trainables.style import StyleAdapter
from ldm.training.trainables.text_encoder import train_text_encoder


def build_trainable(cfg: Config, load_unet: Callable[[], torch.nn.Module], vae_downsample: int,
                    text: Optional[Callable[[], tuple]] = None) -> Trainable:
    """The table: `conditioning.type` picks the implementation once, `lora.enabled` wraps it, and
    `model.text_encoder.train` makes the text encoder (from `text()`: tokenizer, encoder) train with it.

    `load_unet()` returns the text-to-image UNet (built from the config, or the pretrained one)."""
    torch.manual_seed(cfg.train.seed)  # UNet initialisation is identical on every process
    unet = load_unet()
    kind = cfg.conditioning.type
    table: dict[str, Callable[[], Trainable]] = {
        "text": lambda: Trainable(cfg, unet),
        "sketch": lambda: SketchControlNet(cfg, unet, vae_downsample),
        "style": lambda: StyleAdapter(cfg, unet, load_unet),
    }
    if cfg.distill.enabled:  # a few-step student of the pretrained UNet, which stays beside it as the teacher
        trainable: Trainable = ConsistencyDistillation(cfg, unet, text)
    else:
        trainable = table[kind]()
    if cfg.lora.enabled:
        trainable = LoRA(trainable, cfg.lora)
    if cfg.model.text_encoder.train != "frozen":
        assert text is not None, "a trained text encoder needs text=(tokenizer, text_encoder)"
        train_text_encoder(trainable, *text(), cfg.model.text_encoder.train, cfg.lora)
    return trainable
