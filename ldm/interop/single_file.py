"""One `.safetensors` file in the original Stable-Diffusion (LDM) key layout, and back.

AUTOMATIC1111, ComfyUI and Diffusers' `from_single_file` read checkpoints whose keys follow the
CompVis code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.*` (text encoder). The renaming between that layout and Diffusers'
module names is derived here from each model's own config (levels, layers per level, which levels
attend), so any UNet ldm builds converts, not only SD-1.5's.

The file also carries, as safetensors metadata, everything needed to rebuild the pipeline without a
network: the component configs, the tokenizer files and the scheduler config, plus the facts a
reader wants at a glance (architecture, resolution, prediction type, scaling factor, dtype).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.interop.model_files import check_safetensors
from ldm.models.loading import native_size

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


Precision = Literal["fp32", "fp16", "bf16"]


# Inside one residual block: Diffusers' name → the LDM name of the same layer.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config: dict) -> list[tuple[str, str, dict]]:
    """(Diffusers module prefix, LDM prefix, renames inside it) for a UNet2DConditionModel config.

    LDM numbers the encoder's blocks in one list, `input_blocks`: the stem conv first, then per level
    `layers_per_block` (resnet, attention) pairs and, except at the last level, a downsampler. The
    decoder's `output_blocks` hold `layers_per_block + 1` pairs per level, the upsampler riding in the
    last block of each level after its attention, if any.
    """
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError("single-file export needs one layers_per_block for all levels")
    pairs = [("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
             ("conv_in", "input_blocks.0.0", {}), ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {}),
             ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
             ("mid_block.attentions.0", "middle_block.1", {}),
             ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", {})]
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (per + 1)}.0.op", {}))
        attends = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per + 1):
            k = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", {})]
        if i < n - 1:
            last = i * (per + 1) + per
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if attends else 1}.conv", {}))
    return pairs


def vae_prefixes(config: dict) -> list[tuple[str, str, dict]]:
    """The same for AutoencoderKL. LDM numbers the decoder's levels from the lowest resolution up."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", {}), (f"{side}.conv_out", f"{side}.conv_out", {}),
                  (f"{side}.conv_norm_out", f"{side}.norm_out", {}),
                  (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET),
                  (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET),
                  (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
                  for j in range(per)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
                  for j in range(per + 1)]
        if i < n - 1:
            pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}),
                      (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", {})]
    return pairs


def _rename(key: str, table: dict[str, tuple[str, dict]]) -> str:
    """Rename `key` by the longest prefix (whole dotted components) found in `table`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            new_prefix, inner = table[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_prefix}.{rest}"
    return key  # not inside any listed module: the same name in both layouts


def _vae_attention_weight(key: str) -> bool:
    return ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict under its LDM-layout names (`model.diffusion_model.…`); works on the meta device."""
    unet_table = {d: (ldm, inner) for d, ldm, inner in unet_prefixes(dict(unet.config))}
    return {UNET + _rename(k, unet_table): v for k, v in unet.state_dict().items()}


def to_ldm(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One flat state dict in the LDM layout (tensors shared with the models, not copied)."""
    vae_table = {d: (ldm, inner) for d, ldm, inner in vae_prefixes(dict(vae.config))}
    out = unet_to_ldm(unet)
    for k, v in vae.state_dict().items():
        name = _rename(k, vae_table)
        # LDM's VAE attention projections are 1×1 convolutions; Diffusers' are linear layers.
        out[VAE + name] = v[:, :, None, None] if _vae_attention_weight(name) and v.ndim == 2 else v
    # SD-1 files hold CLIP's text tower under `text_model.`; Transformers ≥ 5.6 flattened that level away.
    wrap = "text_model." if type(text_encoder).__name__ == "CLIPTextModel" and not hasattr(text_encoder, "text_model") \
        else ""
    out.update({TEXT + wrap + k: v for k, v in text_encoder.state_dict().items()})
    return out


def from_ldm(state: dict[str, torch.Tensor], unet_config: dict, vae_config: dict) -> tuple[dict, dict, dict]:
    """Split an LDM-layout state dict into Diffusers/Transformers state dicts (unet, vae, text)."""
    unet_table = {ldm: (d, {v: k for k, v in inner.items()}) for d, ldm, inner in unet_prefixes(unet_config)}
    vae_table = {ldm: (d, {v: k for k, v in inner.items()}) for d, ldm, inner in vae_prefixes(vae_config)}
    unet, vae, text = {}, {}, {}
    for key, value in state.items():
        if key.startswith(UNET):
            unet[_rename(key[len(UNET):], unet_table)] = value
        elif key.startswith(VAE):
            name = key[len(VAE):]
            if _vae_attention_weight(name) and value.ndim == 4:
                value = value[:, :, 0, 0]
            vae[_rename(name, vae_table)] = value
        elif key.startswith(TEXT):
            text[key[len(TEXT):]] = value
    return unet, vae, text


def _tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


def export_single_file(pipe, path: str | Path, precision: Precision = "fp32",
                       extra_metadata: Optional[dict[str, str]] = None) -> Path:
    """Write `pipe` (a StableDiffusionPipeline) to one safetensors file in the LDM layout."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(DTYPES)}")
    if getattr(pipe, "controlnet", None) is not None:
        raise ValueError("single-file export covers the text-to-image pipeline (UNet, VAE, text encoder); a "
                         "ControlNet is published as its own Diffusers folder (controlnet/)")
    dtype = DTYPES[precision]
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
             for k, v in to_ldm(pipe.unet, pipe.vae, pipe.text_encoder).items()}
    resolution = native_size(pipe)
    text_config = pipe.text_encoder.config.to_dict()
    meta = {
        # The Stability AI model-spec fields that UIs read.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": Path(path).stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": pipe.scheduler.config.prediction_type,
        # ldm's own: enough to rebuild the pipeline offline.
        "ldm.format": "1",
        "ldm.dtype": precision,
        "ldm.scaling_factor": str(pipe.vae.config.scaling_factor),
        "ldm.unet_config": json.dumps(dict(pipe.unet.config)),
        "ldm.vae_config": json.dumps(dict(pipe.vae.config)),
        "ldm.text_encoder_class": type(pipe.text_encoder).__name__,
        "ldm.text_encoder_config": json.dumps(text_config),
        "ldm.tokenizer_files": json.dumps(_tokenizer_files(pipe.tokenizer)),
        "ldm.scheduler_class": type(pipe.scheduler).__name__,
        "ldm.scheduler_config": json.dumps(dict(pipe.scheduler.config)),
        **(extra_metadata or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _component_class(module, name: str, base: type) -> type:
    """A class named in the file, accepted only if it is a `base` of that library (no arbitrary objects)."""
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"single file names {name!r}, which is not a {base.__name__} of {module.__name__}")
    return cls


def load_single_file(path: str | Path, torch_dtype: Optional[torch.dtype] = None):
    """A StableDiffusionPipeline from a file written by `export_single_file` (no network needed).

    Files from elsewhere (no ldm metadata) go to Diffusers' own loader,
    `StableDiffusionPipeline.from_single_file`, which needs their configs from the Hub or its cache.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    path = Path(path)
    meta = check_safetensors(path, "model file")  # missing, cut short or not safetensors: one message, no traceback
    if "ldm.unet_config" not in meta:
        return StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype)
    unet_config, vae_config = json.loads(meta["ldm.unet_config"]), json.loads(meta["ldm.vae_config"])
    unet_state, vae_state, text_state = from_ldm(load_file(str(path)), unet_config, vae_config)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    text_cls = _component_class(transformers, meta["ldm.text_encoder_class"], transformers.PreTrainedModel)
    text_config = json.loads(meta["ldm.text_encoder_config"])
    text_encoder = text_cls(transformers.AutoConfig.for_model(**text_config))
    if text_cls.__name__ == "CLIPTextModel" and not hasattr(text_encoder, "text_model"):
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text_state = {k: v for k, v in text_state.items() if not k.endswith("position_ids")}  # rebuilt, not learned
    for model, state in ((unet, unet_state), (vae, vae_state), (text_encoder, text_state)):
        # Buffers a model rebuilds itself (e.g. position ids) may be absent from the file.
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent = [k for k in missing if k in dict(model.named_parameters())]
        if persistent or unexpected:
            raise ValueError(f"{path.name}: {type(model).__name__} weights do not match its config "
                             f"(missing {persistent[:3]}, unexpected {unexpected[:3]})")
        model.eval()  # built from a config, it starts in training mode (dropout on)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in json.loads(meta["ldm.tokenizer_files"]).items():
            if Path(name).name != name:
                raise ValueError(f"{path.name}: tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    scheduler_cls = _component_class(diffusers, meta["ldm.scheduler_class"], diffusers.SchedulerMixin)
    scheduler = scheduler_cls.from_config(json.loads(meta["ldm.scheduler_config"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    return pipe


def write_config_folder(pipeline_folder: str | Path, dest: str | Path) -> Path:
    """The pipeline's configs and tokenizer without weights: what `from_single_file(..., config=dest)` needs."""
    src, dest = Path(pipeline_folder), Path(dest)
    for p in src.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".txt", ".model"):
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dest
