"""A text encoder that trains beside what trains: whole, or LoRA adapters on its attention projections."""

from __future__ import annotations

from typing import Literal, Optional

import torch

from ldm.config.kinds import LoRAConfig
from ldm.errors import ConfigError
from ldm.interop.lora import peft_config
from ldm.models.encoders import text_embeddings
from ldm.training.trainables.base import TEXT_PREFIX, Trainable, Wrapper

# Attention projections of the text encoders ldm meets: CLIP, and BERT-style (MiniLM, …).
TEXT_LORA_TARGETS = {"clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
                     "bert": ["query", "key", "value", "attention.output.dense"]}


class TrainedTextEncoder(Wrapper):
    """Wraps any trainable: the (loaded) text encoder trains beside it, all of it or LoRA adapters on its
    attention projections with the UNet's rank and alpha, at its own learning rate. The same encoder object
    stays the pipeline's, so validation and export see the trained weights."""

    def __init__(self, inner: Trainable, tokenizer, text_encoder: torch.nn.Module, mode: Literal["lora", "full"],
                 lora: LoRAConfig):
        super().__init__(inner)
        self.encodes_prompts = True
        self.tokenizer, self.text_encoder, self.mode = tokenizer, text_encoder, mode
        if mode == "full":
            text_encoder.requires_grad_(True)
        else:
            self._add_adapters(lora)
        text_encoder.train()
        self.label = f"{inner.label} and the text encoder ({mode})"

    def _add_adapters(self, lora: LoRAConfig) -> None:
        names = {n.rsplit(".", 1)[-1] for n, _ in self.text_encoder.named_modules()}
        family = next((f for f, targets in TEXT_LORA_TARGETS.items() if targets[0] in names), None)
        if family is None:
            raise ConfigError(f"model.text_encoder.train=lora: no attention projections known for a "
                              f"{type(self.text_encoder).__name__} (CLIP and BERT-style encoders are); train it "
                              "'full'")
        from peft import inject_adapter_in_model

        conf = peft_config(lora)
        conf.target_modules = set(TEXT_LORA_TARGETS[family])
        torch.manual_seed(self.cfg.train.seed)
        # peft itself, not Transformers' `add_adapter`: Transformers 5 refuses the peft releases on PyPI
        # (it asks for peft ≥ 0.22; diffusers #13984).
        inject_adapter_in_model(conf, self.text_encoder)

    # --- what trains ---------------------------------------------------------------------------
    def named_parameters(self):
        """The inner trainable's, then the text encoder's (prefixed `text_encoder.`)."""
        return self.inner.named_parameters() + [(TEXT_PREFIX + n, p) for n, p in self.text_encoder.named_parameters()
                                                if p.requires_grad]

    def param_groups(self, lr: float, text_lr: Optional[float]) -> list[dict]:
        text = [p for _, p in self.text_encoder.named_parameters() if p.requires_grad]
        return self.inner.param_groups(lr, text_lr) + [{"params": text, "lr": text_lr if text_lr is not None else lr}]

    def extra_modules(self):
        return self.inner.extra_modules() + [self.text_encoder]

    def set_training(self, on: bool) -> None:
        self.inner.set_training(on)
        self.text_encoder.train(on)

    def prompt_embeds(self, extra_models: list, captions: list[str]) -> torch.Tensor:
        """prompt_embeds (B, L, D) with gradients, through the text encoder as the loop wrapped it (the last
        of `extra_models`)."""
        return text_embeddings(self.tokenizer, self.text_encoder, captions, run=extra_models[-1])

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(), **{TEXT_PREFIX + k: v for k, v in self.text_state().items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        text = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
        if not text:
            raise ValueError("the checkpoint was saved with model.text_encoder.train=frozen; resume with the same "
                             "setting")
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)})
        self.load_text_state(text)

    def text_state(self) -> dict[str, torch.Tensor]:
        """The trained text encoder's tensors: all of them, or its adapters' alone (peft names)."""
        if self.mode == "lora":
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.text_encoder)
        return dict(self.text_encoder.state_dict())

    def load_text_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.text_encoder, state)
        else:
            self.text_encoder.load_state_dict(state)

    # --- validation and export ------------------------------------------------------------------
    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=None):
        return self.inner.export(folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=self.text_state())

    def describe(self) -> dict:
        return {**self.inner.describe(), "trains": self.label,
                "parameters": sum(p.numel() for p in self.parameters()), "text_encoder": self.mode}
