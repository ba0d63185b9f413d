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
from typing import Callable, Literal, Optional

import torch
from PIL import Image

from ldm.conditions import (
    build_controlnet,
    build_style_adapter,
    controlled_prediction,
    sketch_from_pixels,
    style_processor,
    style_reference,
)
from ldm.config import Config, ConfigError, LoRAConfig
from ldm.diffusion import (
    SKETCH_STREAM,
    STYLE_STREAM,
    diffusion_loss,
    drop_condition,
    min_snr_weights,
    snr,
    training_target,
)
from ldm.images import to_pil
from ldm.pipeline import assemble_pipeline


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
        from ldm.components import text_embeddings

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
        from ldm.checkpoint import export_pipeline

        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, scheduler, cfg)

    def describe(self) -> dict:
        """Facts for the log and the model card."""
        text = "frozen" if self.text_encoder is None else "lora" if self._text_lora else "full"
        return {"trains": self.label, "parameters": sum(p.numel() for p in self.parameters()), "text_encoder": text}


class SketchControlNet(Trainable):
    """A ControlNet (sketch = edges of the picture) trained on the frozen text-to-image UNet."""

    label = "ControlNet"
    weights_file = "controlnet.safetensors"

    def __init__(self, cfg: Config, unet: torch.nn.Module, vae_downsample: int):
        super().__init__(cfg, unet)
        unet.requires_grad_(False).eval()
        torch.manual_seed(cfg.train.seed)
        self.controlnet = build_controlnet(unet, vae_downsample)
        self.module = self.controlnet
        self.sketch_threshold = cfg.conditioning.sketch.threshold

    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        positions = [int(p) for p in batch["position"]]
        sketch = (encoded.sketches(batch["index"], batch["position"]) if encoded is not None else
                  sketch_from_pixels(batch["pixel_values"], self.sketch_threshold))
        keep = ~drop_condition(self.cfg.train.seed, positions, self.cfg.conditioning.sketch.dropout, SKETCH_STREAM)
        return {"sketch": sketch.to(device), "keep": keep}

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, sketch=None, keep=None):
        return controlled_prediction(self.unet, model, noisy_latents, timesteps, prompt_embeds, sketch, keep=keep)

    def held_back_inputs(self, stream, indices, pixel_values, device) -> dict:
        return {"sketch": sketch_from_pixels(pixel_values, self.sketch_threshold).to(device)}

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler,
                                 controlnet=self.controlnet)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """Prompt k is drawn on the sketch of stream sample k."""
        pixels = torch.stack([stream[k]["pixel_values"] for k in range(count)])
        sketches = [to_pil(x) for x in sketch_from_pixels(pixels, self.sketch_threshold) * 2 - 1]
        return sketches, {"sketch": sketches, "conditioning_scale": self.cfg.conditioning.sketch.conditioning_scale}

    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg):
        from ldm.checkpoint import export_pipeline

        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, scheduler, cfg,
                               controlnet=self.controlnet)


class StyleAdapter(Trainable):
    """An image-prompt adapter (style from a reference picture) trained on the frozen text-to-image UNet."""

    label = "style adapter"
    weights_file = "style_adapter.safetensors"

    def __init__(self, cfg: Config, unet: torch.nn.Module, load_plain_unet: Callable[[], torch.nn.Module]):
        super().__init__(cfg, unet)
        unet.requires_grad_(False).eval()
        torch.manual_seed(cfg.train.seed)
        st = cfg.conditioning.style
        self.adapter = build_style_adapter(unet, cfg.data.resolution, st.encoder_width, st.encoder_layers)
        self.module = self.adapter
        self.processor = style_processor(cfg.data.resolution)
        # The export holds the pretrained UNet without the adapter's processors: loaded when exporting,
        # not held for the whole run.
        self._load_plain_unet = load_plain_unet

    def _references(self, stream, indices: list[int]) -> torch.Tensor:
        images = [style_reference(stream.source, int(i)) for i in indices]
        return self.processor(images, return_tensors="pt").pixel_values

    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        positions = [int(p) for p in batch["position"]]
        keep = ~drop_condition(self.cfg.train.seed, positions, self.cfg.conditioning.style.dropout, STYLE_STREAM)
        return {"reference": self._references(stream, batch["index"]).to(device), "keep": keep}

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, reference=None, keep=None):
        return model(self.unet, noisy_latents, timesteps, prompt_embeds, reference, keep)

    def held_back_inputs(self, stream, indices, pixel_values, device) -> dict:
        return {"reference": self._references(stream, indices).to(device)}

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler,
                                 image_encoder=self.adapter.image_encoder, feature_extractor=self.processor)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """Prompt k is drawn in the style of stream sample k's reference."""
        references = [style_reference(stream.source, stream.usable(stream.index_of(k))[0]) for k in range(count)]
        return references, {"style": references, "style_scale": self.cfg.conditioning.style.scale}

    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg):
        from ldm.checkpoint import export_pipeline

        return export_pipeline(folder, vae, text_encoder, tokenizer, self._load_plain_unet(), scheduler, cfg,
                               style_adapter=self.adapter)


class LoRA(Trainable):
    """Wraps any trainable whose module is a Diffusers model: its weights freeze, low-rank adapters are
    injected (peft), and only those train, checkpoint, average (EMA) and export. Everything else (inputs,
    prediction, validation pipeline) is the wrapped trainable's."""

    weights_file = "lora.safetensors"
    export_folder = "lora"

    def __init__(self, inner: Trainable, cfg: LoRAConfig):
        self.inner, self.lora = inner, cfg
        self.cfg, self.unet, self.module = inner.cfg, inner.unet, inner.module
        self.label = f"LoRA on the {inner.label}"
        self.sketch_threshold = inner.sketch_threshold
        if not hasattr(self.module, "add_adapter"):
            raise ConfigError(f"lora.enabled: a {type(self.module).__name__} takes no peft adapters")
        self.module.requires_grad_(False)
        torch.manual_seed(inner.cfg.train.seed)  # the same A on every process (B starts at zero)
        from ldm.lora import peft_config

        self.module.add_adapter(peft_config(cfg))

    def modules(self):
        return self.inner.modules()

    def inputs(self, batch, encoded, stream, device):
        return self.inner.inputs(batch, encoded, stream, device)

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, **inputs):
        return self.inner.predict(model, noisy_latents, timesteps, prompt_embeds, **inputs)

    def held_back_inputs(self, stream, indices, pixel_values, device):
        return self.inner.held_back_inputs(stream, indices, pixel_values, device)

    def loss(self, model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type, snr_gamma, **inputs):
        return self.inner.loss(model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type,
                               snr_gamma, **inputs)

    def after_optimizer_step(self) -> None:
        self.inner.after_optimizer_step()

    def set_training(self, on: bool) -> None:
        super().set_training(on)
        self.inner.set_training(on)  # what the wrapped kind keeps in eval mode (a distillation's teacher)

    def module_state(self) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors (peft names: `<module>.lora_A.weight`, …)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.module)

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.module, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA checkpoint has tensors this adapter lacks: {unexpected[:3]}…; was it saved "
                             "with other lora.targets or lora.rank?")

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler):
        return self.inner.pipeline(vae, text_encoder, tokenizer, scheduler, sampler)

    def validation_inputs(self, stream, count):
        return self.inner.validation_inputs(stream, count)

    def export(self, folder: Path, vae, text_encoder, tokenizer, scheduler, cfg) -> Path:
        """`folder` gets the Diffusers file, the kohya file (unless DoRA or lora.kohya=false), the resolved
        config; with lora.fuse, `folder.parent / "pipeline"` the base with this LoRA fused in."""
        from ldm.checkpoint import replace_folder
        from ldm.config import save_config
        from ldm.lora import DIFFUSERS_FILE, KOHYA_FILE, fused_pipeline, save_diffusers_lora, save_kohya_lora

        folder = Path(folder)
        text = self.text_state() if self.text_encoder is not None else None
        with replace_folder(folder) as tmp:
            save_diffusers_lora(tmp, self.module, self.module_state(), self.text_encoder, text)
            if self.lora.kohya and not self.lora.use_dora:
                written = save_kohya_lora(tmp / KOHYA_FILE, self.module_state(), self.lora, text, self.text_encoder,
                                          base_model=cfg.model.pretrained, resolution=cfg.data.resolution,
                                          steps=cfg.train.max_steps)
                if written is None:
                    print(f"no {KOHYA_FILE}: the kohya format names CLIP text encoders only, not a "
                          f"{type(self.text_encoder).__name__}; {DIFFUSERS_FILE} holds both adapters")
            save_config(cfg, tmp / "ldm_config.yaml")
        if self.lora.fuse:
            from ldm.checkpoint import export_pipeline

            fused = fused_pipeline(cfg.model.pretrained, [(folder, 1.0)])
            export_pipeline(folder.parent / "pipeline", fused.vae, fused.text_encoder, fused.tokenizer, fused.unet,
                            fused.scheduler, cfg)
        return folder

    def describe(self) -> dict:
        from ldm.lora import alpha_of

        return {**super().describe(), "rank": self.lora.rank, "alpha": alpha_of(self.lora),
                "targets": list(self.lora.targets), "use_dora": self.lora.use_dora}


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
        from ldm.distillation import ConsistencyDistillation

        trainable: Trainable = ConsistencyDistillation(cfg, unet, text)
    else:
        trainable = table[kind]()
    if cfg.lora.enabled:
        trainable = LoRA(trainable, cfg.lora)
    if cfg.model.text_encoder.train != "frozen":
        assert text is not None, "a trained text encoder needs text=(tokenizer, text_encoder)"
        train_text_encoder(trainable, *text(), cfg.model.text_encoder.train, cfg.lora)
    return trainable


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
        from ldm.lora import peft_config

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
