"""The fast sampling path (`generate(fast=True)`): channels-last, bf16 only where the hardware has it, the text's
cross-attention keys and values projected once per call, and the UNet and VAE decoder compiled with their weights
frozen in. `ldm.inference.generate` applies it; docs/results/speed.md measures it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ldm.models.hooks import wrap_forward


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether bf16 runs on matrix hardware here: a CUDA device with bf16, or a CPU with AVX-512 BF16 or AMX
    (oneDNN's own check). Elsewhere (an AVX2-only CPU) bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class FastPath:
    """What `fast=True` did to a pipeline (kept on it, so it is done once)."""

    precision: Literal["bf16", "fp32"]  # the UNet's matrix products (autocast); the VAE and scheduler stay fp32
    compiled: bool  # the UNet and the VAE's decoder under torch.compile (with Inductor's weight freezing on CPU)
    text_kv: bool = False  # the text's cross-attention keys and values projected once per call, not every step


class _TextKeysValues:
    """An attention processor that takes the text's keys and values for cross-attention from a table made once
    per pipeline call (`text_kv_table`), passed in `cross_attention_kwargs["text_kv"]`. The prompt embeddings are
    the same at every denoising step, so projecting them anew each step repeats the same products; for a small
    UNet at low resolution, where the text has more tokens than the image has positions, that repetition is a
    large share of the step (12 % of the quickstart UNet's FLOPs). Without a table (or for self-attention) the
    stock processor runs."""

    def __init__(self, name: Optional[str], stock):
        self.name, self.stock = name, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 text_kv: Optional[dict] = None):
        if text_kv is None or self.name is None or encoder_hidden_states is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        key, value = text_kv[self.name]
        batch = hidden_states.shape[0]
        if key.shape[0] != batch:
            raise RuntimeError(f"{self.name}: a key/value table for a batch of {key.shape[0]}, called with {batch}")
        query = attn.to_q(hidden_states)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·d) → (B, H, N, d)
            return x.to(query.dtype).unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=attention_mask)
        out = attn.to_out[1](attn.to_out[0](mixed.transpose(1, 2).flatten(2)))
        return out / attn.rescale_output_factor


def _plain_cross_attention(attn) -> bool:
    """A cross-attention whose keys and values are plain projections of the text (no norms, no residual, no
    spatial or group norm), run by Diffusers' standard processor: what `_TextKeysValues` reproduces."""
    return (attn.is_cross_attention and isinstance(attn.processor, AttnProcessor2_0) and attn.spatial_norm is None
            and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None and attn.norm_k is None
            and not attn.residual_connection)


def _install_text_kv(unet) -> bool:
    """Give every attention of `unet` a `_TextKeysValues` processor (a table entry for the plain cross-attentions,
    a pass-through for the rest); only where all of them run Diffusers' standard processor (not an IP-adapter's,
    not LoRA-scaled ones). Whether it did."""
    modules = {name: module for name, module in unet.named_modules() if isinstance(module, Attention)}
    if not modules or not all(isinstance(m.processor, AttnProcessor2_0) for m in modules.values()):
        return False
    for name, module in modules.items():
        module.set_processor(_TextKeysValues(name if _plain_cross_attention(module) else None, module.processor))
    return True


@torch.no_grad()
def text_kv_table(pipe, embeds: torch.Tensor) -> dict:
    """module name → (keys, values) of the text `embeds` (the batch exactly as the UNet receives it: with
    classifier-free guidance, the negative half first), for every cross-attention `_TextKeysValues` serves; under
    the UNet's own autocast when the fast path runs it in bf16."""
    fast = pipe._ldm_fast
    device = pipe._execution_device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast.precision == "bf16")
    table = {}
    with autocast:
        for name, module in pipe.unet.named_modules():
            if isinstance(module, Attention) and getattr(module.processor, "name", None) is not None:
                table[name] = (module.to_k(embeds), module.to_v(embeds))
    return table


def make_fast(pipe, compile: bool = True, precision: Literal["auto", "bf16", "fp32"] = "auto") -> FastPath:
    """Prepare a pipeline for fast sampling, in place, once: channels-last UNet and VAE, bf16 autocast of the
    UNet where the hardware has bf16 units (`native_bf16`), the text's cross-attention keys and values taken from
    a table made once per call (`_TextKeysValues`, where the UNet runs Diffusers' standard attention), and the
    UNet compiled. On a CPU the compile freezes the weights into the graph (Inductor's `freezing`: constants
    folded, convolution and linear weights pre-packed for oneDNN and MKL), so weights must not change afterwards
    (no LoRA loaded later, no training). The first call compiles: tens of seconds to minutes on a small CPU; it
    pays over long generation jobs, not over a handful of images. `precision` forces bf16 or fp32 instead of the
    hardware's choice (bf16 without bf16 units is emulated: slow, but it shows what bf16 does to the pictures)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: choose auto, bf16 or fp32")
    done = getattr(pipe, "_ldm_fast", None)
    if done is not None:
        return done
    device = pipe._execution_device
    for module in (pipe.unet, pipe.vae, getattr(pipe, "controlnet", None)):
        if module is not None:
            module.to(memory_format=torch.channels_last)
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16":
        wrap_forward(pipe.unet, lambda forward: _autocast_forward(forward, device.type))
    text_kv = _install_text_kv(pipe.unet)
    if compile:
        # Frozen weights: nothing may train them after this. The VAE's decoder runs once per image, not once per
        # step, but compiled it is a third faster (2 % of a quickstart image on a CPU).
        for module in (pipe.unet, pipe.vae.decoder):
            module.requires_grad_(False)
            wrap_forward(module, lambda forward: _compiled_forward(forward, freeze=device.type == "cpu"))
    pipe._ldm_fast = FastPath(precision, compile, text_kv)
    return pipe._ldm_fast


def _autocast_forward(forward: Callable, device_type: str) -> Callable:
    """The UNet's forward under bf16 autocast, its prediction handed back in fp32 (the scheduler's arithmetic and
    the guidance stay in fp32)."""
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].float(), *out[1:])
        out.sample = out.sample.float()
        return out

    return run


def _compiled_forward(forward: Callable, freeze: bool) -> Callable:
    """`forward` under torch.compile; with `freeze`, traced and run with Inductor's weight freezing on. Dynamo
    reads that switch itself when it traces (are parameters constants of the graph?), outside the options that
    torch.compile hands Inductor, so `options={"freezing": True}` alone compiles an unfrozen graph: the switch
    must be on around every call (the first traces; later ones check guards made under it)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(forward)
    if not freeze:
        return compiled

    def run(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run
