"""Typed configuration: dataclasses are the schema, YAML holds values, the CLI adds dotted overrides.

`load_config("configs/x.yaml", ["train.lr=2e-4"])` returns a fully typed `Config`; it reads no model
folder (resolving `model.pretrained` into component paths is `ldm.models.loading.resolve_pretrained`). Every problem a
config can have on its own (unknown key, wrong type, impossible value, inconsistent pair) raises a
`ConfigError` naming the key and what would be valid, before any model or dataset is touched.
Checks that need a component's own config file (the VAE's downsampling factor, the text encoder's
width) live in `ldm.models.loading.check_components`, which reads those files without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from ldm.config.data import DataConfig
from ldm.config.kinds import ConditioningConfig, DistillConfig, LoRAConfig
from ldm.config.model import ModelConfig

Sampler = Literal["ddpm", "ddim", "dpm++", "dpm++sde", "euler", "euler-a", "unipc", "heun", "lcm"]


@dataclass
class TrainConfig:
    output_dir: str = "outputs/text2img"
    """config, logs, validation grids, `pipeline/` (or `lora/`), `train_summary.json` (s/step, peak memory, sizes,
    parameters held per process), `train_log.jsonl` (loss, lr, grad norm, images/s every `train.log_every` steps,
    whatever `train.report_to` says; after a resume the later line of a step counts)"""
    seed: int = 0
    """seeds initialisation, data order and every per-sample draw"""
    max_steps: int = 1000  # optimizer steps
    """optimizer steps"""
    batch_size: int = 16  # per process and micro-batch
    """per process and micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """`constant`, `cosine` or `linear`, after warm-up"""
    lr_warmup_steps: int = 0
    """linear warm-up steps"""
    adam_beta1: float = 0.9
    """AdamW β1"""
    adam_beta2: float = 0.999
    """AdamW β2"""
    adam_weight_decay: float = 1e-2
    """AdamW weight decay"""
    adam_epsilon: float = 1e-8
    """AdamW ε"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 disables)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """`no`, `fp16` or `bf16` (the VAE stays in `model.vae.dtype`)"""
    gradient_checkpointing: bool = False
    """trade compute for activation memory"""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """`sdpa` (PyTorch) or `xformers` (if installed)"""
    allow_tf32: bool = True  # TF32 tensor cores for fp32 matmuls/convolutions on Ampere+ GPUs (no effect on CPU)
    """TF32 tensor cores for the fp32 work (VAE, fp32 training) on Ampere and newer GPUs; no effect on CPU"""
    channels_last: bool = False  # NHWC UNet activations: faster convolutions on recent GPUs
    """NHWC memory format for the UNet (helps convolutions on recent GPUs)"""
    compile: bool = False  # torch.compile the UNet (slow first steps, faster after)
    """`torch.compile` the UNet"""
    # "fsdp": shard the trained module's weights, gradients and AdamW moments across the processes (FSDP2,
    # ldm.training.sharding); "none": every process holds all of them (DDP).
    sharding: Literal["none", "fsdp"] = "none"
    """`fsdp`: shard the UNet's weights, gradients, AdamW moments and EMA across the processes (FSDP2); `none`: DDP"""
    snr_gamma: Optional[float] = None  # min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is typical
    """min-SNR-γ loss weighting (5.0 is typical); null is plain MSE"""
    ema_decay: Optional[float] = 0.9999  # None disables EMA
    """EMA of the trained weights (the LoRA's alone in a LoRA run); null disables"""
    # EMA warm-up: decay 1 − (1 + n)^(−2/3) capped at ema_decay (Diffusers' use_ema_warmup); without it
    # the decay still ramps as min(ema_decay, (1 + n)/(10 + n)) over the first optimizer steps.
    ema_warmup: bool = False
    """power-law EMA warm-up (else the decay ramps as (1+n)/(10+n))"""
    ema_for_export: bool = True  # export (and validate) the EMA weights when EMA is on
    """validate and export the EMA weights"""
    log_every: int = 10
    """steps between log lines / TensorBoard points"""
    validate_every: int = 500  # 0 disables the periodic validation grid
    """steps between validation grids (0: none)"""
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    """`tensorboard` or `none`"""
    checkpoint_every: int = 500  # optimizer steps between training-state checkpoints (0: none)
    """optimizer steps between crash-safe training-state checkpoints (0: none)"""
    checkpoints_total_limit: Optional[int] = 3  # keep the newest N complete checkpoints (null: all)
    """keep the newest N complete checkpoints (null: all)"""
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    """`latest` (newest complete checkpoint) or a checkpoint folder"""
    # A fresh run into an output_dir that holds another run stops; true clears what ldm wrote there first.
    overwrite_output_dir: bool = False
    """a fresh run into a folder holding another run's checkpoints or export stops; true clears what ldm wrote there
    first"""
    # A non-finite loss or gradient: skip the update (the batch is consumed) or stop at once.
    nonfinite: Literal["skip", "stop"] = "skip"
    """on a non-finite loss or gradient: `skip` the update or `stop`"""
    max_nonfinite_steps: int = 5  # stop after this many consecutive skipped updates
    """stop after this many consecutive skipped updates"""
    record_samples: bool = False  # append each step's dataset indices to samples_rank{r}.jsonl (audit)
    """log each step's dataset indices to `samples_rank{r}.jsonl`"""


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    """validation and quickstart prompts"""
    negative_prompt: Optional[str] = None
    """negative prompt"""
    sampler: Sampler = "dpm++"
    """`ddpm`, `ddim`, `dpm++`, `dpm++sde`, `euler`, `euler-a`, `unipc`, `heun`; also the export's default"""
    num_inference_steps: int = 25
    """denoising steps"""
    guidance_scale: float = 7.5
    """classifier-free guidance (1 disables)"""
    seed: int = 0
    """image *j* is seeded `seed + j`"""
    num_images_per_prompt: int = 1
    """images per prompt in validation grids"""
    batch_size: int = 16
    """images per pipeline call"""


@dataclass
class AutoencoderConfig:
    """Stage 1: train an AutoencoderKL on the configured data (LDM paper, sec. 3)."""

    output_dir: str = "outputs/vae"
    """where stage 1 saves the VAE"""
    overwrite_output_dir: bool = False  # replace a VAE already in output_dir (otherwise stage 1 stops)
    """replace a VAE already in `autoencoder.output_dir` (otherwise stage 1 stops)"""
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    """channels per level; n levels downsample by 2^(n−1)"""
    layers_per_block: int = 1
    """ResNet layers per level"""
    latent_channels: int = 4
    """latent channels"""
    norm_num_groups: int = 32
    """GroupNorm groups"""
    max_steps: int = 2000
    """optimizer steps"""
    batch_size: int = 32
    """batch size"""
    lr: float = 1e-3
    """peak learning rate (cosine decay)"""
    kl_weight: float = 1e-6
    """weight of the per-pixel KL term"""
    num_validation_images: int = 128
    """held-out images for PSNR (at most a tenth of the data)"""
    seed: int = 0
    """seed"""


@dataclass
class HubConfig:
    """Publishing to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`, never from the config)."""

    repo_id: Optional[str] = None  # "user/name": publish the exported pipeline at the end of training
    """`user/name`: publish the exported pipeline at the end of training"""
    private: bool = True
    """create the repository private"""
    push_checkpoints: bool = False  # also publish the weights at each checkpoint, in the background
    """also publish the (EMA) weights at each checkpoint, in a background thread"""
    license: str = "other"  # the model card's license id (set it to what your data allows)
    """the model card's license id: set it to what your data allows"""
    tags: list[str] = field(default_factory=list)
    """extra model-card tags"""
    retries: int = 5  # attempts per upload, with exponential back-off
    """upload attempts, with exponential back-off (2, 4, 8… s)"""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """Spatial downsampling of a VAE or UNet with these levels: one factor of 2 between levels."""
    return 2 ** (len(block_out_channels) - 1)
