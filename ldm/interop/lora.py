"""LoRA files: the adapter's config for peft (the library Diffusers' own loaders use), the files other
tools load, and loading them for generation. (What trains a LoRA is `ldm.training.trainables.lora.LoRA`.)

Three exports of the same adapter:

- Diffusers / peft: `pytorch_lora_weights.safetensors` (keys `unet.<module>.lora_A.weight`, `…lora_B…`)
  with the peft config (rank, alpha, targets) in its metadata, so `pipe.load_lora_weights(folder)`
  applies alpha exactly as training did;
- kohya-ss: one file with keys `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` and a
  per-module `.alpha`, plus `ss_*` and `modelspec.*` metadata: the format AUTOMATIC1111 and ComfyUI read
  and Civitai hosts. Those tools map `lora_unet_…` names onto the original (LDM) checkpoint layout;
  `kohya_to_ldm` writes that mapping out so a test can check every name against ldm's single file;
- fused: the base pipeline with B·A·alpha/rank added into its weights (Diffusers' `fuse_lora`).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from ldm.config.kinds import LoRAConfig
from ldm.errors import ConfigError
from ldm.interop.model_card import public_name
from ldm.interop.model_files import check_safetensors

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for


KOHYA_FILE = "lora_kohya.safetensors"


# Module-name suffixes (peft matches a target as the whole name or its last dotted parts) per target group.
TARGET_MODULES = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "projections": ["proj_in", "proj_out"],
    "feed_forward": ["ff.net.0.proj", "ff.net.2"],
    "convolutions": ["conv1", "conv2"],
    "time_embedding": ["time_embedding.linear_1", "time_embedding.linear_2", "time_emb_proj"],
}


def alpha_of(cfg: LoRAConfig) -> float:
    return float(cfg.alpha if cfg.alpha is not None else cfg.rank)


def peft_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=alpha_of(cfg), lora_dropout=cfg.dropout,
                      target_modules=[m for group in cfg.targets for m in TARGET_MODULES[group]],
                      init_lora_weights=True if cfg.init == "default" else "gaussian", use_dora=cfg.use_dora)


def lora_metadata(module: torch.nn.Module) -> dict:
    """A module's peft config as Diffusers stores it (`*_lora_adapter_metadata`): rank, alpha, targets, DoRA."""
    conf = module.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()
            if k in ("r", "lora_alpha", "target_modules", "use_dora", "lora_dropout", "init_lora_weights")}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_diffusers_lora(folder: Path, unet: torch.nn.Module, state: dict[str, torch.Tensor],
                        text_encoder: Optional[torch.nn.Module] = None,
                        text_state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` through Diffusers' own writer (the text encoder's adapters
    under `text_encoder.`, when it trained)."""
    from diffusers import StableDiffusionPipeline

    text = dict(text_encoder_lora_layers=_cpu(text_state), text_encoder_lora_adapter_metadata=lora_metadata(
        text_encoder)) if text_state else {}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=_cpu(state),
                                              unet_lora_adapter_metadata=lora_metadata(unet),
                                              safe_serialization=True, **text)
    return Path(folder) / DIFFUSERS_FILE


_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def to_kohya(state: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """peft names → kohya names: `down_blocks.0.….to_q.lora_A.weight` →
    `lora_unet_down_blocks_0_…_to_q.lora_down.weight`, lora_B → lora_up, and one `.alpha` per module (a 0-d
    tensor, as kohya writes it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{key}: not a LoRA A/B weight (DoRA magnitudes have no kohya-format equivalent here)")
        name = f"{prefix}_{m['module'].replace('.', '_')}"
        out[f"{name}.{'lora_down' if m['part'] == 'lora_A' else 'lora_up'}.weight"] = value.detach()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_text_prefix(text_encoder: torch.nn.Module) -> Optional[str]:
    """`lora_te` plus the level SD-1 files name CLIP's text tower by (Transformers ≥ 5.6 flattened
    `text_model.` away); None for an encoder that format has no names for (BERT-style)."""
    if type(text_encoder).__name__ != "CLIPTextModel":
        return None
    return "lora_te" if hasattr(text_encoder, "text_model") else "lora_te_text_model"


def save_kohya_lora(path: Path, state: dict[str, torch.Tensor], cfg: LoRAConfig,
                    text_state: Optional[dict[str, torch.Tensor]] = None,
                    text_encoder: Optional[torch.nn.Module] = None, base_model: Optional[str] = None,
                    resolution: Optional[int] = None, steps: Optional[int] = None) -> Optional[Path]:
    """One kohya-format file with the `ss_*` training metadata kohya writes and the `modelspec.*` fields
    (Stability AI's model-spec) that Civitai and ComfyUI read. With text-encoder adapters it holds them as
    `lora_te_text_model_…` (CLIP only: for another encoder no file is written and None returned)."""
    tensors = _cpu(to_kohya(state, alpha_of(cfg)))
    if text_state:
        prefix = kohya_text_prefix(text_encoder)
        if prefix is None:
            return None
        tensors.update(_cpu(to_kohya(text_state, alpha_of(cfg), prefix=prefix)))
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(alpha_of(cfg)),
        "ss_network_args": json.dumps({"targets": list(cfg.targets), "dropout": cfg.dropout}),
        "ss_base_model_version": "sd_v1", "ss_training_comment": "trained with ldm",
        "ss_tag_frequency": json.dumps({"trigger_words": {w: 1 for w in cfg.trigger_words}}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": Path(path).stem,
    }
    if base_model:
        meta["ss_sd_model_name"] = public_name(str(base_model))  # a file people share: no local path in it
    if resolution:
        meta["ss_resolution"] = f"({resolution}, {resolution})"
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    if steps:
        meta["ss_max_train_steps"] = str(steps)
    if cfg.trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(cfg.trigger_words)
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def kohya_to_ldm(name: str, layers_per_block: int = 2) -> Optional[str]:
    """The LDM-layout module (dots, without `model.`) that a kohya UNet module name stands for, by the
    renaming AUTOMATIC1111 and ComfyUI apply (input/output blocks numbered layers_per_block + 1 per level);
    None for a name outside that convention."""
    per = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}

    def inner(kind: str, rest: str) -> Optional[str]:
        return _attention_suffix(rest) if kind == "attentions" else resnet.get(rest)

    def block(kind: str) -> int:  # inside an LDM block: 0 the resnet, 1 the attention
        return 1 if kind == "attentions" else 0

    patterns = [
        (r"conv_in", lambda m: "diffusion_model.input_blocks.0.0"),
        (r"conv_out", lambda m: "diffusion_model.out.2"),
        (r"time_embedding_linear_(\d)", lambda m: f"diffusion_model.time_embed.{2 * int(m[1]) - 2}"),
        (r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: _join(f"diffusion_model.input_blocks.{1 + int(m[1]) * per + int(m[3])}.{block(m[2])}",
                         inner(m[2], m[4]))),
        (r"mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: _join(f"diffusion_model.middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}",
                         inner(m[1], m[3]))),
        (r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: _join(f"diffusion_model.output_blocks.{int(m[1]) * per + int(m[3])}.{block(m[2])}",
                         inner(m[2], m[4]))),
    ]
    if not name.startswith("lora_unet_"):
        return None
    body = name[len("lora_unet_"):]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, body)
        if m:
            return build(m)
    return None


# Inside a transformer block the LDM names equal Diffusers' (to_q, ff.net.0.proj, …): only the dots differ.
_ATTENTION_PARTS = ["transformer_blocks_(\\d+)_(attn1|attn2)_(to_q|to_k|to_v|to_out_0)",
                    "transformer_blocks_(\\d+)_ff_net_(0_proj|2)", "(proj_in|proj_out)"]


def _attention_suffix(rest: str) -> Optional[str]:
    m = re.fullmatch(_ATTENTION_PARTS[0], rest)
    if m:
        return f"transformer_blocks.{m[1]}.{m[2]}.{m[3].replace('to_out_0', 'to_out.0')}"
    m = re.fullmatch(_ATTENTION_PARTS[1], rest)
    if m:
        return f"transformer_blocks.{m[1]}.ff.net.{m[2].replace('_', '.')}"
    m = re.fullmatch(_ATTENTION_PARTS[2], rest)
    return m[1] if m else None


def _join(prefix: str, suffix: Optional[str]) -> Optional[str]:
    return f"{prefix}.{suffix}" if suffix is not None else None


def lora_modules(keys: Iterable[str]) -> list[str]:
    """The module names in a LoRA state dict (its keys without `.lora_down.weight`, `.alpha`, …)."""
    suffix = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha|lora_A\.weight|lora_B\.weight|"
                        r"lora\.(down|up)\.weight|dora_scale)$")
    return sorted({suffix.sub("", k) for k in keys})


def unmapped_modules(lora_keys: Iterable[str], ldm_keys: Iterable[str], layers_per_block: int = 2) -> list[str]:
    """The LoRA modules that AUTOMATIC1111 / ComfyUI could not place on a weight of an LDM-layout checkpoint
    with these keys (`model.diffusion_model.…`); an empty list: every module lands."""
    weights = {k[len("model."):].rsplit(".", 1)[0] for k in ldm_keys if k.startswith("model.diffusion_model.")}
    return [name for name in lora_modules(lora_keys) if kohya_to_ldm(name, layers_per_block) not in weights]


LoRASpec = Union[str, Path, tuple]


def parse_lora(spec: LoRASpec) -> tuple[str, float]:
    """`FILE_OR_FOLDER[:SCALE]` or (path, scale) → (path, scale)."""
    if isinstance(spec, tuple):
        return str(spec[0]), float(spec[1])
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"-?\d+(\.\d*)?", tail):
        return head, float(tail)
    return text, 1.0


def _split(path: str) -> tuple[str, Optional[str]]:
    p = Path(path)
    if p.is_file():
        check_safetensors(p, "LoRA")  # a pickle, a damaged or cut-short file: refused before Diffusers reads it
        return str(p.parent), p.name
    if (p / "lora" / DIFFUSERS_FILE).is_file():  # a LoRA run's train.output_dir
        p = p / "lora"
    if p.is_dir():
        return str(p), DIFFUSERS_FILE if (p / DIFFUSERS_FILE).is_file() else None
    raise ConfigError(f"LoRA {path!r}: no such file or folder (give a .safetensors file or an exported lora/ "
                      "folder, optionally followed by :SCALE)")


def load_loras(pipe, loras: Sequence[LoRASpec]) -> list[tuple[str, float]]:
    """Load each LoRA into the pipeline (Diffusers' `load_lora_weights`, which reads both the Diffusers and
    the kohya format, UNet and text-encoder adapters) and activate them together at their scales. Returns
    [(adapter name, scale)]."""
    import hashlib

    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    active = []
    for spec in loras:
        path, scale = parse_lora(spec)
        folder, weight_name = _split(path)
        # Named by the file, so a pipeline used again with the same LoRA does not load it twice.
        name = "lora_" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
        if name not in loaded:
            with _quiet_text_encoder_notice():
                pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
        active.append((name, scale))
    if active:
        pipe.set_adapters([n for n, _ in active], adapter_weights=[s for _, s in active])
    return active


@contextmanager
def _quiet_text_encoder_notice():
    """Diffusers warns that a UNet-only LoRA has no text-encoder keys: true and harmless, so not shown.
    (Unexpected or missing UNet keys are reported by another logger, which stays on.)"""
    logger = logging.getLogger("diffusers.loaders.lora_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
