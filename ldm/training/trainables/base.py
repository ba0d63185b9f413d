"""What trains: one interface for every kind of run, picked once from a table (shared/DESIGN.md).

The loop trains one `Trainable` against a frozen rest and never asks which kind it is. A trainable
owns:

- `module`: the bare module whose parameters train (the UNet, a ControlNet, a style adapter); the
  loop wraps it (compile, DDP) and hands the wrapper back to `predict`;
- `named_parameters()`: what the optimizer, EMA and gradient clipping see (those with requires_grad);
- `inputs(...)`: the extra per-batch inputs the prediction needs (a sketch, a reference picture);
- `predict(model, noisy_latents, timesteps, prompt_embeds, **inputs) → model_pred`;
- `state_dict()` / `load_state_dict()` and `weights_file`: its checkpoint state, only what trains;
- `pipeline()` and `validation_inputs()`: what validation generates with;
- `export()`: what the run leaves behind (a Diffusers pipeline folder, or LoRA files).

`build_trainable` is the table. A LoRA (`LoRA`, below) wraps any implementation rather than
multiplying classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ldm.config.schema import Config
from ldm.diffusion import (
    diffusion_loss,
    min_snr_weights,
    snr,
    training_target,
)
from ldm.inference.pipeline import assemble_pipeline
from ldm.models.encoders import text_embeddings
from ldm.training.export import export_pipeline


class Trainable:
    """The text-to-image UNet itself: what a plain run trains (and the base every condition steers)."""

    label = "UNet"  # for logs and the progress bar
    weights_file = "unet.safetensors"  # the training weights' file inside a checkpoint
    export_folder = "pipeline"  # where the run's export goes, inside train.output_dir
    sketch_threshold: Optional[float] = None  # set when the cache must hold sketches (a ControlNet run)

    text_encoder: Optional[torch.nn.Module] = None  # set by `train_text_encoder` when it trains too
    tokenizer = None

    def __init__(self, cfg: Config, unet: torch.nn.Module):
        self.cfg = cfg
        self.unet = unet  # the text-to-image UNet the prediction runs through
        self.module: torch.nn.Module = unet

    # --- what trains ---------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The module's trained parameters, then the text encoder's (prefixed `text_encoder.`) if it trains."""
        own = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.text_encoder is not None:
            own += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters() if p.requires_grad]
        return own

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def param_groups(self, lr: float, text_lr: Optional[float]) -> list[dict]:
        """Optimizer groups: the module at `lr`, the text encoder (when it trains) at `text_lr` (or `lr`)."""
        groups = [{"params": [p for n, p in self.named_parameters() if not n.startswith("text_encoder.")], "lr": lr}]
        if self.text_encoder is not None:
            groups.append({"params": [p for n, p in self.named_parameters() if n.startswith("text_encoder.")],
                           "lr": text_lr if text_lr is not None else lr})
        return groups

    def prompt_embeds(self, text_model, captions: list[str]) -> torch.Tensor:
        """prompt_embeds (B, L, D) with gradients, through `text_model` (the trained encoder as the loop wrapped it)."""
        return text_embeddings(self.tokenizer, self.text_encoder, captions, run=text_model)

    def modules(self) -> list[torch.nn.Module]:
        """Every module the prediction runs through (for gradient checkpointing, channels-last, xformers)."""
        return [self.module] if self.module is self.unet else [self.module, self.unet]

    def set_training(self, on: bool) -> None:
        """Train or eval mode for what trains (the frozen UNet under a condition stays in eval mode)."""
        for module in (self.module, self.text_encoder):
            if module is not None:
                module.train(on)

    def to(self, device) -> "Trainable":
        for module in self.modules():
            module.to(device)
        return self

    # --- one step -------------------------------------------------------------------------------
    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        """Extra inputs of `predict` for a micro-batch ({} for text alone)."""
        return {}

    def predict(self, model, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                **inputs) -> torch.Tensor:
        """model_pred (B, C, h, w); `model` is `module` as the loop wrapped it."""
        return model(noisy_latents, timesteps, prompt_embeds).sample

    def held_back_inputs(self, stream, indices: list[int], pixel_values: torch.Tensor, device) -> dict:
        """Inputs of `predict` for held-back samples (the validation loss), conditions always on."""
        return {}

    def loss(self, model, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor, prediction_type: str, snr_gamma: Optional[float], **inputs) -> torch.Tensor:
        """Loss of one micro-batch: noise the latents to t, predict (through `model`, the wrapped module, with
        the extra `inputs`), MSE against ε (or v), min-SNR weights. A distilled student has its own."""
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # √ᾱ_t x₀ + √(1−ᾱ_t) ε
        model_pred = self.predict(model, noisy_latents, timesteps, prompt_embeds, **inputs)
        target = training_target(scheduler, latents, noise, timesteps, prediction_type)
        weights = None
        if snr_gamma is not None:
            weights = min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), snr_gamma, prediction_type)
        return diffusion_loss(model_pred, target, weights)

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step that was taken (a distillation's target network follows here)."""

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the module's state, and the text encoder's (`text_encoder.*`) if it trains."""
        state = self.module_state()
        if self.text_encoder is not None:
            state.update({f"text_encoder.{k}": v for k, v in self.text_state().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        text = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
        if bool(text) != (self.text_encoder is not None):
            raise ValueError("the checkpoint was saved with model.text_encoder.train="
                             f"{'frozen' if not text else 'lora or full'}; resume with the same setting")
        self.load_module_state({k: v for k, v in state.items() if not k.startswith("text_encoder.")})
        if text:
            self.load_text_state(text)

    def module_state(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def text_state(self) -> dict[str, torch.Tensor]:
        """The trained text encoder's tensors: all of them, or its adapters' alone (peft names)."""
        if self._text_lora:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.text_encoder)
        return dict(self.text_encoder.state_dict())

    def load_text_state(self, state: dict[str, torch.Tensor]) -> None:
        if self._text_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.text_encoder, state)
        else:
            self.text_encoder.load_state_dict(state)

    _text_lora = False

    # --- validation and export ------------------------------------------------------------------
    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """(pictures that lead the validation grid, extra `generate` arguments) for `count` prompts."""
        return [], {}

    def export(self, folder: Path, vae, text_encoder, tokenizer, scheduler, cfg: Config) -> Path:
        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, scheduler, cfg)

    def describe(self) -> dict:
        """Facts for the log and the model card."""
        text = "frozen" if self.text_encoder is None else "lora" if self._text_lora else "full"
        return {"trains": self.label, "parameters": sum(p.numel() for p in self.parameters()), "text_encoder": text}
