"""What trains in a distillation run: a few-step student of a trained model (latent consistency distillation).

Luo et al. 2023 ("Latent Consistency Models") distil a latent text-to-image model into a consistency
model: from any point x_t of the teacher's guided probability-flow ODE, the student predicts the ODE's end
in one jump, f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀(x_t, t). One training step:

    x_t        = add_noise(latents, noise, t_n)                  t_n on the teacher's DDIM grid
    x_s        = DDIM step of the teacher's guided ε̂, t_n → t_{n−1}   (one solver step skipping k timesteps)
    loss       = d(f_student(x_t, t_n), f_target(x_s, t_{n−1}))   target without gradients

with the target an EMA of the student (`distill.target_decay`), d pseudo-Huber or L2, and the guidance scale
fixed (`distill.guidance_scale`): the exported student samples with the `lcm` sampler and guidance 1 (no
unconditional pass). It is one more implementation of the "what trains" interface (ldm.training.trainables): the loop,
checkpoints, resume, EMA, cache and processes are the ones every run uses; `lora.enabled` wraps it into an
LCM-LoRA like any other trainable.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import torch

from ldm.config.schema import Config
from ldm.diffusion import (
    consistency_loss,
    consistency_output,
    ddim_step,
    guided,
    predicted_original,
    solver_timesteps,
)
from ldm.models.encoders import encode_prompts
from ldm.training.export import export_pipeline
from ldm.training.trainables.base import Trainable

TARGET_PREFIX = "target."  # the target network's tensors inside a checkpoint


class ConsistencyDistillation(Trainable):
    """The student UNet, initialised from the teacher's (model.pretrained); the teacher stays frozen beside it."""

    label = "consistency student"
    weights_file = "student.safetensors"

    def __init__(self, cfg: Config, unet: torch.nn.Module, text: Optional[Callable[[], tuple]] = None):
        super().__init__(cfg, unet)
        self.distill = cfg.distill
        self.teacher = copy.deepcopy(unet).requires_grad_(False).eval()
        self._text = text  # (tokenizer, text_encoder) on demand: the empty prompt when nothing is cached
        self._empty: Optional[torch.Tensor] = None
        # θ⁻ starts at the student's (= the teacher's) weights; an LCM-LoRA uses the student itself (decay 0).
        self._target = copy.deepcopy(unet).requires_grad_(False).eval() if self.distill.target_decay > 0 else None
        self._pairs: Optional[tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]] = None

    def modules(self) -> list[torch.nn.Module]:
        return [self.module, self.teacher] + ([self._target] if self._target is not None else [])

    def set_training(self, on: bool) -> None:
        super().set_training(on)
        for frozen in self.modules()[1:]:
            frozen.eval()

    # --- the target network -------------------------------------------------------------------
    def target(self) -> torch.nn.Module:
        """The consistency target: an EMA copy of the student (decay > 0) or the student itself (decay 0)."""
        return self.module if self._target is None else self._target

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ over the trained parameters (LCM Algorithm 1)."""
        if self._target is None:
            return
        if self._pairs is None:  # ([θ⁻], [θ]) once: the parameter objects live as long as the run
            theirs = dict(self._target.named_parameters())
            pairs = [(theirs[n], p) for n, p in self.module.named_parameters() if p.requires_grad]
            self._pairs = ([t for t, _ in pairs], [p for _, p in pairs])
        torch._foreach_lerp_(*self._pairs, 1.0 - self.distill.target_decay)

    def module_state(self) -> dict[str, torch.Tensor]:
        state = super().module_state()
        if self.distill.target_decay > 0:  # exact resume needs θ⁻ too
            names = [n for n, p in self.module.named_parameters() if p.requires_grad]
            theirs = dict(self.target().named_parameters())
            state.update({TARGET_PREFIX + n: theirs[n].detach() for n in names})
        return state

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(TARGET_PREFIX)}
        super().load_module_state(own)
        if self.distill.target_decay > 0:
            theirs = dict(self.target().named_parameters())
            with torch.no_grad():
                for k, v in state.items():
                    if k.startswith(TARGET_PREFIX):
                        theirs[k[len(TARGET_PREFIX):]].copy_(v)

    # --- one step -------------------------------------------------------------------------------
    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        """The empty prompt's embeddings for the teacher's unconditional pass."""
        n = len(batch["position"])
        if encoded is not None:
            return {"uncond": encoded.embeds(batch["caption"], torch.ones(n, dtype=torch.bool)).to(device)}
        if self._empty is None:
            self._empty = encode_prompts(*self._text(), [""]).cpu()
        return {"uncond": self._empty.expand(n, -1, -1).to(device)}

    def loss(self, model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type, snr_gamma,
             uncond=None, **inputs) -> torch.Tensor:
        d = self.distill
        alphas = scheduler.alphas_cumprod.to(latents.device)
        t, s = solver_timesteps(timesteps, scheduler.config.num_train_timesteps, d.num_ddim_timesteps)
        x_t = scheduler.add_noise(latents, noise, t)  # √ᾱ_t x₀ + √(1−ᾱ_t) ε, on the grid
        x0 = predicted_original(model(x_t, t, prompt_embeds).sample, x_t, alphas[t], prediction_type)[0]
        student = consistency_output(x_t, x0, t)
        fast = torch.autocast(x_t.device.type, torch.bfloat16, enabled=d.frozen_precision == "bf16")
        with torch.no_grad():
            with fast:
                both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([prompt_embeds, uncond]))
            cond, unc = both.sample.to(x_t.dtype).chunk(2)
            x0_hat, eps_hat = predicted_original(guided(unc, cond, d.guidance_scale), x_t, alphas[t], prediction_type)
            x_s = ddim_step(x0_hat, eps_hat, alphas[s]).to(x_t.dtype)
            with fast:
                eps_s = self.target()(x_s, s, prompt_embeds).sample.to(x_t.dtype)
            x0_s = predicted_original(eps_s, x_s, alphas[s], prediction_type)[0]
            goal = consistency_output(x_s, x0_s, s)
        return consistency_loss(student, goal, d.loss, d.huber_c)

    # --- validation and export ------------------------------------------------------------------
    def export(self, folder: Path, vae, text_encoder, tokenizer, scheduler, cfg: Config, text_state=None) -> Path:
        """A plain Stable-Diffusion pipeline whose scheduler is an LCMScheduler on the teacher's grid."""
        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, lcm_scheduler(scheduler, cfg), cfg,
                               sampler="lcm")

    def describe(self) -> dict:
        d = self.distill
        return {**super().describe(), "distilled": "latent consistency", "guidance_scale": d.guidance_scale,
                "num_ddim_timesteps": d.num_ddim_timesteps, "loss": d.loss, "target_decay": d.target_decay}


def lcm_scheduler(scheduler, cfg: Config):
    """The teacher's noise schedule as an LCMScheduler whose original grid is the one distilled on."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler.config, original_inference_steps=cfg.distill.num_ddim_timesteps)


def card_facts(cfg: Config) -> dict:
    """What a distilled student's model card says of it: how it was distilled."""
    d = cfg.distill
    return {"distilled": {"method": "latent consistency", "guidance_scale": d.guidance_scale,
                          "num_ddim_timesteps": d.num_ddim_timesteps}}
