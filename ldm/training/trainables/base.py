"""What trains: one interface for every kind of run, picked once from a table (shared/DESIGN.md).

The loop trains one `Trainable` against a frozen rest and never asks which kind it is. A trainable
owns:

- `module`: the bare module whose parameters train (the UNet, a ControlNet, a style adapter); the
  loop wraps it (compile, DDP) and hands the wrapper back to `predict`; `extra_modules()`: other
  modules that train beside it (a text encoder), which the loop wraps too;
- `named_parameters()` and `param_groups()`: what the optimizer, EMA and gradient clipping see;
- `cache_request()`: what the encoded cache must hold beyond latents and prompt embeddings;
- `inputs(...)`: the extra per-batch inputs the prediction needs (a sketch, a reference picture);
  `prompt_embeds(...)`: prompt embeddings with gradients, where `encodes_prompts` says it encodes them;
- `predict(model, noisy_latents, timesteps, prompt_embeds, **inputs) → model_pred` and `loss(...)`;
- `state_dict()` / `load_state_dict()` and `weights_file`: its checkpoint state, only what trains;
- `pipeline()` and `validation_inputs()`: what validation generates with;
- `export()` and `export_folder`: what the run leaves behind (a Diffusers pipeline folder, or LoRA files).

The table in `ldm.training.trainables` picks the implementation; a `Wrapper` (LoRA, a trained text
encoder) composes with any implementation and forwards every method it does not change.
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
from ldm.training.export import export_pipeline


class Trainable:
    """The text-to-image UNet itself: what a plain run trains (and the base every condition steers)."""

    label = "UNet"  # for logs and the progress bar
    weights_file = "unet.safetensors"  # the training weights' file inside a checkpoint
    export_folder = "pipeline"  # where the run's export goes, inside train.output_dir
    encodes_prompts = False  # True: the loop gets prompt_embeds from `prompt_embeds()` (with gradients)

    def __init__(self, cfg: Config, unet: torch.nn.Module):
        self.cfg = cfg
        self.unet = unet  # the text-to-image UNet the prediction runs through
        self.module: torch.nn.Module = unet

    # --- what trains ---------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The module's trained parameters (those with requires_grad)."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def param_groups(self, lr: float, text_lr: Optional[float]) -> list[dict]:
        """Optimizer groups: the module at `lr` (a trained text encoder adds its own group at `text_lr`)."""
        return [{"params": self.parameters(), "lr": lr}]

    def modules(self) -> list[torch.nn.Module]:
        """Every module the prediction runs through (for gradient checkpointing, channels-last, xformers)."""
        return [self.module] if self.module is self.unet else [self.module, self.unet]

    def extra_modules(self) -> list[torch.nn.Module]:
        """Modules beside `module` whose parameters train; the loop wraps each (DDP) like the module."""
        return []

    def set_training(self, on: bool) -> None:
        """Train or eval mode for what trains (the frozen UNet under a condition stays in eval mode)."""
        self.module.train(on)

    def to(self, device) -> "Trainable":
        for module in self.modules():
            module.to(device)
        return self

    def cache_request(self) -> dict:
        """What the encoded cache holds beyond latents and prompt embeddings, as `build_cache` arguments."""
        return {}

    # --- one step -------------------------------------------------------------------------------
    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        """Extra inputs of `predict` for a micro-batch ({} for text alone)."""
        return {}

    def prompt_embeds(self, extra_models: list, captions: list[str]) -> torch.Tensor:
        """prompt_embeds (B, L, D) with gradients, through the loop's wrapped `extra_modules()`; only called
        where `encodes_prompts` (otherwise the frozen encoder or the cache gives them)."""
        raise NotImplementedError(f"a {self.label} run takes prompt_embeds from the frozen text encoder")

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
        """What a checkpoint holds: the module's state (a trained text encoder adds `text_encoder.*`)."""
        return self.module_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if any(k.startswith(TEXT_PREFIX) for k in state):
            raise ValueError("the checkpoint was saved with model.text_encoder.train=lora or full; resume with "
                             "the same setting")
        self.load_module_state(state)

    def module_state(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    # --- validation and export ------------------------------------------------------------------
    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """(pictures that lead the validation grid, extra `generate` arguments) for `count` prompts."""
        return [], {}

    def export(self, folder: Path, vae, text_encoder, tokenizer, scheduler, cfg: Config,
               text_state: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write the run's result to `folder`. `text_state`: the trained text encoder's tensors, where it trained
        (a pipeline holds the encoder whole anyway; LoRA files keep its adapters)."""
        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, scheduler, cfg)

    def describe(self) -> dict:
        """Facts for the log and the model card."""
        return {"trains": self.label, "parameters": sum(p.numel() for p in self.parameters()),
                "text_encoder": "frozen"}


TEXT_PREFIX = "text_encoder."  # a trained text encoder's tensors inside a checkpoint


class Wrapper(Trainable):
    """A trainable around another (`inner`): every method of the interface goes to `inner` unless the wrapper
    changes it. A method added to `Trainable` must be forwarded here too (tests/test_architecture.py checks)."""

    def __init__(self, inner: Trainable):
        self.inner = inner
        self.cfg, self.unet, self.module = inner.cfg, inner.unet, inner.module
        self.label, self.weights_file, self.export_folder = inner.label, inner.weights_file, inner.export_folder
        self.encodes_prompts = inner.encodes_prompts

    def named_parameters(self):
        return self.inner.named_parameters()

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def param_groups(self, lr, text_lr):
        return self.inner.param_groups(lr, text_lr)

    def modules(self):
        return self.inner.modules()

    def extra_modules(self):
        return self.inner.extra_modules()

    def set_training(self, on):
        self.inner.set_training(on)

    def to(self, device):
        self.inner.to(device)
        return self

    def cache_request(self):
        return self.inner.cache_request()

    def inputs(self, batch, encoded, stream, device):
        return self.inner.inputs(batch, encoded, stream, device)

    def prompt_embeds(self, extra_models, captions):
        return self.inner.prompt_embeds(extra_models, captions)

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, **inputs):
        return self.inner.predict(model, noisy_latents, timesteps, prompt_embeds, **inputs)

    def held_back_inputs(self, stream, indices, pixel_values, device):
        return self.inner.held_back_inputs(stream, indices, pixel_values, device)

    def loss(self, model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type, snr_gamma, **inputs):
        return self.inner.loss(model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type,
                               snr_gamma, **inputs)

    def after_optimizer_step(self):
        self.inner.after_optimizer_step()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def module_state(self):
        return self.inner.module_state()

    def load_module_state(self, state):
        self.inner.load_module_state(state)

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler):
        return self.inner.pipeline(vae, text_encoder, tokenizer, scheduler, sampler)

    def validation_inputs(self, stream, count):
        return self.inner.validation_inputs(stream, count)

    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=None):
        return self.inner.export(folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=text_state)

    def describe(self):
        return self.inner.describe()
