"""The schema sections of what can train beyond the text-to-image UNet: conditions, LoRA, distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SketchConfig:
    """A sketch (edges of the training picture) through a ControlNet trained on a frozen text-to-image model."""

    threshold: float = 0.1  # edge threshold (a Sobel step, in units of the full colour range)
    """edge threshold of the sketch (Sobel step per colour channel)"""
    dropout: float = 0.1  # probability of training without the sketch (independent of the caption's)
    """probability of training without the sketch (independent of caption dropout)"""
    conditioning_scale: float = 1.0  # the ControlNet residual scale in validation and the export's default
    """ControlNet residual scale in validation grids"""


@dataclass
class StyleConfig:
    """Style from a reference picture through an image-prompt adapter on a frozen text-to-image model."""

    dropout: float = 0.1  # probability of training without the reference (independent of the caption's)
    """probability of training without the reference picture (independent of caption dropout)"""
    scale: float = 1.0  # weight of the reference tokens in validation and the export's default
    """weight of the reference's tokens in validation grids"""
    encoder_width: int = 128  # the CLIP vision tower trained with the adapter
    """width of the CLIP vision tower trained with the adapter"""
    encoder_layers: int = 3
    """its transformer layers"""


@dataclass
class ConditioningConfig:
    """Which condition the run trains besides text: `text` alone (the UNet), `sketch` (a ControlNet on the
    frozen UNet of model.pretrained) or `style` (an image-prompt adapter on it)."""

    type: Literal["text", "sketch", "style"] = "text"
    """`text` trains the UNet; `sketch` a ControlNet and `style` an image-prompt adapter, on the frozen model of
    `model.pretrained`"""
    sketch: SketchConfig = field(default_factory=SketchConfig)
    style: StyleConfig = field(default_factory=StyleConfig)


LoRATarget = Literal["attention", "projections", "feed_forward", "convolutions", "time_embedding"]


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) on the trained module instead of all its weights, through peft.

    The update of a weight W is (alpha / rank) · B A, B zero at the start: training starts from the
    pretrained model exactly. kohya-ss' default alpha is 1 (scale 1/rank), Diffusers' examples use
    alpha = rank (scale 1); whatever is chosen is written into every file, so each tool applies the same."""

    enabled: bool = False
    """train low-rank adapters on the text-to-image UNet instead of all its weights; needs `model.pretrained`"""
    rank: int = 8
    """rank r of each update B·A"""
    alpha: Optional[float] = None  # null: alpha = rank (scale 1)
    """the update is scaled by alpha / rank; null: alpha = rank (kohya-ss' default is 1)"""
    dropout: float = 0.0
    """dropout on the adapters' input"""
    # attention: to_q/k/v/out of every attention layer; projections: the transformers' proj_in/out;
    # feed_forward: their MLPs; convolutions: the resnets' 3×3 convolutions; time_embedding: its MLP and
    # the resnets' time projections.
    targets: list[LoRATarget] = field(default_factory=lambda: ["attention"])
    """`attention` (to_q/k/v/out), `projections` (proj_in/out), `feed_forward`, `convolutions` (the resnets'
    3 by 3 kernels), `time_embedding`"""
    init: Literal["default", "gaussian"] = "default"  # A: Kaiming-uniform (peft's default) or N(0, 1/rank)
    """A initialised Kaiming-uniform (`default`) or `gaussian`; B is zero, so training starts at the base"""
    # DoRA (Liu et al. 2024): magnitude and direction trained apart. Loads in Diffusers and the fused export;
    # the kohya-format file is not written for it.
    use_dora: bool = False
    """DoRA (magnitude + direction); loads in Diffusers and fused, no kohya-format file"""
    trigger_words: list[str] = field(default_factory=list)  # for the model card: words the captions teach
    """words the captions teach, for the model card and the kohya file's metadata"""
    kohya: bool = True  # also write the kohya-format file AUTOMATIC1111 / ComfyUI load
    """also write `lora_kohya.safetensors` (AUTOMATIC1111, ComfyUI, Civitai)"""
    fuse: bool = False  # also export the base with the LoRA fused in (a full pipeline folder)
    """also export the base with the LoRA fused in, as `pipeline/`"""


@dataclass
class DistillConfig:
    """Latent consistency distillation (Luo et al. 2023): the pretrained model (model.pretrained) is the teacher,
    the student starts from its UNet and learns to jump to the end of the teacher's guided ODE in one step, so it
    samples in 1–4 steps with the `lcm` sampler and no unconditional pass. With lora.enabled the student is a
    LoRA on the teacher's UNet (LCM-LoRA)."""

    enabled: bool = False
    """latent consistency distillation of `model.pretrained` (the teacher) into a 1–8-step student (with
    `lora.enabled`: an LCM-LoRA)"""
    # The teacher's classifier-free guidance, folded into the student at this one scale (no w-embedding: the
    # student keeps the teacher's architecture, so it exports as a plain UNet or a LoRA, and the shapes sweep
    # picks one best scale anyway).
    guidance_scale: float = 3.0
    """the teacher's classifier-free guidance, folded into the student (sample it at guidance 1)"""
    # The teacher's ODE grid: t_n = (n + 1)·k − 1 with k = T / num_ddim_timesteps; each step of the solver skips
    # k training timesteps. It becomes the exported LCMScheduler's original_inference_steps.
    num_ddim_timesteps: int = 50
    """the teacher's DDIM grid; each solver step skips T / this timesteps; the export's
    `LCMScheduler.original_inference_steps`"""
    loss: Literal["huber", "l2"] = "huber"
    """`huber` (pseudo-Huber √(d² + c²) − c) or `l2`"""
    huber_c: float = 0.001  # the pseudo-Huber δ: √(d² + c²) − c
    """c of the pseudo-Huber loss"""
    # The consistency target comes from an EMA of the student with this decay (0: the student itself,
    # without gradients, as LCM-LoRA and improved consistency training do).
    target_decay: float = 0.95
    """EMA decay of the target network; 0 uses the student itself (required for an LCM-LoRA)"""
    # The teacher's and the target's forward passes (no gradients) in this precision. bf16 autocast speeds
    # them where the CPU has bf16 units (AVX-512 bf16 / AMX: 1.46x on the quickstart UNet, Intel Xeon) while the
    # student's forward and backward stay in the run's own precision (bf16 backward is slower on these CPUs).
    frozen_precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: the teacher's and the target's no-grad forwards under bf16 autocast (faster where the hardware has bf16
    units; see the distillation results); the student trains in the run's precision"""
