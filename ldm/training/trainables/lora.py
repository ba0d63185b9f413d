"""LoRA: a wrapper over any trainable; only low-rank adapters on its module train."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.config.kinds import LoRAConfig
from ldm.config.loading import save_config
from ldm.errors import ConfigError
from ldm.inference.pipeline import fused_pipeline
from ldm.interop.lora import DIFFUSERS_FILE, KOHYA_FILE, alpha_of, peft_config, save_diffusers_lora, save_kohya_lora
from ldm.training.export import export_pipeline, replace_folder
from ldm.training.trainables.base import Trainable, Wrapper


class LoRA(Wrapper):
    """Wraps any trainable whose module is a Diffusers model: its weights freeze, low-rank adapters are
    injected (peft), and only those train, checkpoint, average (EMA) and export. Everything else (inputs,
    prediction, validation pipeline) is the wrapped trainable's."""

    def __init__(self, inner: Trainable, cfg: LoRAConfig):
        super().__init__(inner)
        self.lora = cfg
        self.label, self.weights_file, self.export_folder = f"LoRA on the {inner.label}", "lora.safetensors", "lora"
        if not hasattr(self.module, "add_adapter"):
            raise ConfigError(f"lora.enabled: a {type(self.module).__name__} takes no peft adapters")
        self.module.requires_grad_(False)
        torch.manual_seed(inner.cfg.train.seed)  # the same A on every process (B starts at zero)
        self.module.add_adapter(peft_config(cfg))

    def named_parameters(self):
        """The adapters: what requires grad in the module once its own weights froze."""
        return Trainable.named_parameters(self)

    def param_groups(self, lr, text_lr):
        return Trainable.param_groups(self, lr, text_lr)

    def set_training(self, on: bool) -> None:
        self.module.train(on)
        self.inner.set_training(on)  # what the wrapped kind keeps in eval mode (a distillation's teacher)

    def state_dict(self):
        return Trainable.state_dict(self)

    def load_state_dict(self, state):
        Trainable.load_state_dict(self, state)

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

    def export(self, folder: Path, vae, text_encoder, tokenizer, scheduler, cfg, text_state=None) -> Path:
        """`folder` gets the Diffusers file, the kohya file (unless DoRA or lora.kohya=false), the resolved
        config; with lora.fuse, `folder.parent / "pipeline"` the base with this LoRA fused in. A trained text
        encoder's adapters (`text_state`) go into both files beside the module's."""
        folder = Path(folder)
        text = text_state
        text_encoder = text_encoder if text is not None else None
        with replace_folder(folder) as tmp:
            save_diffusers_lora(tmp, self.module, self.module_state(), text_encoder, text)
            if self.lora.kohya and not self.lora.use_dora:
                written = save_kohya_lora(tmp / KOHYA_FILE, self.module_state(), self.lora, text, text_encoder,
                                          base_model=cfg.model.pretrained, resolution=cfg.data.resolution,
                                          steps=cfg.train.max_steps)
                if written is None:
                    print(f"no {KOHYA_FILE}: the kohya format names CLIP text encoders only, not a "
                          f"{type(text_encoder).__name__}; {DIFFUSERS_FILE} holds both adapters")
            save_config(cfg, tmp / "ldm_config.yaml")
        if self.lora.fuse:
            fused = fused_pipeline(cfg.model.pretrained, [(folder, 1.0)])
            export_pipeline(folder.parent / "pipeline", fused.vae, fused.text_encoder, fused.tokenizer, fused.unet,
                            fused.scheduler, cfg)
        return folder

    def describe(self) -> dict:
        return {**Trainable.describe(self), "rank": self.lora.rank, "alpha": alpha_of(self.lora),
                "targets": list(self.lora.targets), "use_dora": self.lora.use_dora}
