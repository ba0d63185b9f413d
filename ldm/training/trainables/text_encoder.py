"""A text encoder that trains beside what trains: whole, or LoRA adapters on its attention projections."""

from __future__ import annotations

from typing import Literal

import torch

from ldm.config.schema import LoRAConfig
from ldm.errors import ConfigError
from ldm.interop.lora import peft_config
from ldm.training.trainables.base import Trainable

# Attention projections of the text encoders ldm meets: CLIP, and BERT-style (MiniLM, …).
TEXT_LORA_TARGETS = {"clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
                     "bert": ["query", "key", "value", "attention.output.dense"]}


def train_text_encoder(trainable: Trainable, tokenizer, text_encoder: torch.nn.Module,
                       mode: Literal["lora", "full"], lora: LoRAConfig) -> None:
    """Make the (loaded) text encoder train beside the module: all of it, or LoRA adapters on its attention
    projections with the UNet's rank and alpha. The same object stays the pipeline's encoder, so validation
    and export see the trained weights."""
    if mode == "full":
        text_encoder.requires_grad_(True)
    else:
        names = {n.rsplit(".", 1)[-1] for n, _ in text_encoder.named_modules()}
        family = next((f for f, targets in TEXT_LORA_TARGETS.items() if targets[0] in names), None)
        if family is None:
            raise ConfigError(f"model.text_encoder.train=lora: no attention projections known for a "
                              f"{type(text_encoder).__name__} (CLIP and BERT-style encoders are); train it 'full'")
        from peft import inject_adapter_in_model

        conf = peft_config(lora)
        conf.target_modules = set(TEXT_LORA_TARGETS[family])
        torch.manual_seed(trainable.cfg.train.seed)
        # peft itself, not Transformers' `add_adapter`: Transformers 5 refuses the peft releases on PyPI
        # (it asks for peft ≥ 0.22; diffusers #13984).
        inject_adapter_in_model(conf, text_encoder)
        trainable._text_lora = True
    text_encoder.train()
    trainable.tokenizer, trainable.text_encoder = tokenizer, text_encoder
    trainable.label = f"{trainable.label} and the text encoder ({mode})"
