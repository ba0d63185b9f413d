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

Sampler = Literal["ddpm", "ddim", "dpm++", "dpm++sde", "euler", "euler-a", "unipc", "heun", "lcm"]


@dataclass
class VAEConfig:
    path: Optional[str] = "stabilityai/sd-vae-ft-mse"  # Hub id or local folder (AutoencoderKL)
    subfolder: Optional[str] = None
    # fp32 by default: the SD VAE overflows in fp16 and turns whole batches into NaN.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass
class TextEncoderConfig:
    path: str = "openai/clip-vit-large-patch14"  # Hub id or local folder (tokenizer + encoder)
    subfolder: Optional[str] = None  # e.g. "text_encoder" inside a pipeline folder
    tokenizer_subfolder: Optional[str] = None
    max_length: Optional[int] = None  # tokens; None keeps the tokenizer's own limit (77 for CLIP)
    # frozen (default); lora: adapters on its attention projections (with lora.enabled, same rank and alpha);
    # full: every weight (a full fine-tune, lora.enabled=false). Trained, its prompt embeddings are not cached.
    train: Literal["frozen", "lora", "full"] = "frozen"
    lr: Optional[float] = None  # its learning rate when it trains; null: train.lr


@dataclass
class UNetConfig:
    path: Optional[str] = None  # load a pretrained UNet; None builds one from the fields below
    subfolder: Optional[str] = None
    # One entry per resolution level, highest resolution first (the SD-1.5 layout by default).
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    cross_attention: list[bool] = field(default_factory=lambda: [True, True, True, False])
    layers_per_block: int = 2
    attention_head_dim: int = 8
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    cross_attention_dim: Optional[int] = None  # None: derived from the text encoder's width


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False


@dataclass
class ModelConfig:
    # Fine-tune an exported pipeline (a folder or Hub id in the Stable-Diffusion layout): its UNet, VAE,
    # text encoder and noise schedule replace the sections below (the UNet's architecture included).
    pretrained: Optional[str] = None
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets: each image trains at the bucket of about resolution² pixels nearest its shape."""

    enabled: bool = False
    step: Optional[int] = None  # px between bucket sides; null: what the VAE and UNet divide (f · 2^(levels − 1))
    min_side: Optional[int] = None  # px; null: resolution / 2
    max_side: Optional[int] = None  # px; null: resolution · 2
    max_aspect_ratio: float = 2.0  # longer / shorter side of the widest bucket
    no_upscale: bool = False  # an image smaller than its bucket trains at its own size (rounded down to step)
    # A bucket holding fewer images merges into its nearest neighbour (never dropped); null: one global batch.
    min_images: Optional[int] = None


@dataclass
class ShapesConfig:
    num_images: int = 4096
    seed: int = 0
    # Combinations kept out of training, "colour shape position" with * for any part (e.g. "red triangle *");
    # the probe scores them separately, to measure generalisation to unseen captions.
    holdout: list[str] = field(default_factory=list)
    # Fraction of pictures captioned by colour alone ("a red shape"), e.g. for sketch runs, where shape
    # and position are meant to come from the sketch.
    colour_only_captions: float = 0.0
    # Background styles to draw (white, grey, dark), one per picture at random; captions never name them.
    styles: list[str] = field(default_factory=list)
    # Combinations ("colour shape position", * for any part) that make up `focus_fraction` of the pictures,
    # the rest cycling through the others (e.g. a new concept with a replay of the rest, for fine-tuning).
    focus: list[str] = field(default_factory=list)
    focus_fraction: float = 0.5


@dataclass
class DataConfig:
    # "shapes" (built in), a local folder (imagefolder with metadata.jsonl/.csv) or a Hub dataset name.
    dataset: str = "shapes"
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    metadata_encoding: str = "utf-8"  # of a local folder's metadata.jsonl / .csv (a UTF-8 byte-order mark is fine)
    resolution: int = 512
    center_crop: bool = True
    # Off by default: a flipped image contradicts captions that say "left" or "right".
    random_flip: bool = False
    caption_dropout: float = 0.1  # the empty caption teaches the unconditional model CFG needs
    max_samples: Optional[int] = None
    num_workers: int = 0
    # Encode latents and prompt embeddings once into a fingerprinted cache on disk (needs centre crops;
    # flips are cached as their own variant). Training then reads the cache and loads no encoder.
    cache: bool = False
    cache_dir: str = "outputs/cache"
    # The last N samples never enter training; their loss with fixed noise and timesteps, per timestep
    # bucket, is logged at every validation (and at the end).
    validation_images: int = 0
    # Latents used for training: a fresh sample of q(z|x) each time (the LDM recipe) or its mean.
    latent_sample: Literal["sample", "mean"] = "sample"
    # The audit decodes every sample once before training, converting or skipping bad ones.
    audit: bool = True
    min_image_size: Optional[int] = None  # shorter side in px below which an image is skipped; null: resolution / 4
    max_aspect_ratio: float = 4.0  # longer / shorter side above which an image is skipped
    max_bad_fraction: float = 0.05  # stop before training if more than this fraction is unusable
    buckets: BucketConfig = field(default_factory=BucketConfig)
    # Shards larger than local disk: stream them, each process (each machine) reading only its own shards.
    streaming: bool = False
    shuffle_buffer: int = 1000  # samples in the streaming shuffle buffer (shard order shuffled too); 0: in order
    # Comma-separated tags shuffled on every use (kohya-ss's shuffle_caption), the first keep_tags in place.
    shuffle_tags: bool = False
    keep_tags: int = 0
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TrainConfig:
    output_dir: str = "outputs/text2img"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    allow_tf32: bool = True  # TF32 tensor cores for fp32 matmuls/convolutions on Ampere+ GPUs (no effect on CPU)
    channels_last: bool = False  # NHWC UNet activations: faster convolutions on recent GPUs
    compile: bool = False  # torch.compile the UNet (slow first steps, faster after)
    # "fsdp": shard the trained module's weights, gradients and AdamW moments across the processes (FSDP2,
    # ldm.training.sharding); "none": every process holds all of them (DDP).
    sharding: Literal["none", "fsdp"] = "none"
    snr_gamma: Optional[float] = None  # min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is typical
    ema_decay: Optional[float] = 0.9999  # None disables EMA
    # EMA warm-up: decay 1 − (1 + n)^(−2/3) capped at ema_decay (Diffusers' use_ema_warmup); without it
    # the decay still ramps as min(ema_decay, (1 + n)/(10 + n)) over the first optimizer steps.
    ema_warmup: bool = False
    ema_for_export: bool = True  # export (and validate) the EMA weights when EMA is on
    log_every: int = 10
    validate_every: int = 500  # 0 disables the periodic validation grid
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    checkpoint_every: int = 500  # optimizer steps between training-state checkpoints (0: none)
    checkpoints_total_limit: Optional[int] = 3  # keep the newest N complete checkpoints (null: all)
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    # A fresh run into an output_dir that holds another run stops; true clears what ldm wrote there first.
    overwrite_output_dir: bool = False
    # A non-finite loss or gradient: skip the update (the batch is consumed) or stop at once.
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_steps: int = 5  # stop after this many consecutive skipped updates
    record_samples: bool = False  # append each step's dataset indices to samples_rank{r}.jsonl (audit)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    negative_prompt: Optional[str] = None
    sampler: Sampler = "dpm++"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    num_images_per_prompt: int = 1
    batch_size: int = 16


@dataclass
class AutoencoderConfig:
    """Stage 1: train an AutoencoderKL on the configured data (LDM paper, sec. 3)."""

    output_dir: str = "outputs/vae"
    overwrite_output_dir: bool = False  # replace a VAE already in output_dir (otherwise stage 1 stops)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    max_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    num_validation_images: int = 128
    seed: int = 0


@dataclass
class SketchConfig:
    """A sketch (edges of the training picture) through a ControlNet trained on a frozen text-to-image model."""

    threshold: float = 0.1  # edge threshold (a Sobel step, in units of the full colour range)
    dropout: float = 0.1  # probability of training without the sketch (independent of the caption's)
    conditioning_scale: float = 1.0  # the ControlNet residual scale in validation and the export's default


@dataclass
class StyleConfig:
    """Style from a reference picture through an image-prompt adapter on a frozen text-to-image model."""

    dropout: float = 0.1  # probability of training without the reference (independent of the caption's)
    scale: float = 1.0  # weight of the reference tokens in validation and the export's default
    encoder_width: int = 128  # the CLIP vision tower trained with the adapter
    encoder_layers: int = 3


@dataclass
class ConditioningConfig:
    """Which condition the run trains besides text: `text` alone (the UNet), `sketch` (a ControlNet on the
    frozen UNet of model.pretrained) or `style` (an image-prompt adapter on it)."""

    type: Literal["text", "sketch", "style"] = "text"
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
    rank: int = 8
    alpha: Optional[float] = None  # null: alpha = rank (scale 1)
    dropout: float = 0.0
    # attention: to_q/k/v/out of every attention layer; projections: the transformers' proj_in/out;
    # feed_forward: their MLPs; convolutions: the resnets' 3×3 convolutions; time_embedding: its MLP and
    # the resnets' time projections.
    targets: list[LoRATarget] = field(default_factory=lambda: ["attention"])
    init: Literal["default", "gaussian"] = "default"  # A: Kaiming-uniform (peft's default) or N(0, 1/rank)
    # DoRA (Liu et al. 2024): magnitude and direction trained apart. Loads in Diffusers and the fused export;
    # the kohya-format file is not written for it.
    use_dora: bool = False
    trigger_words: list[str] = field(default_factory=list)  # for the model card: words the captions teach
    kohya: bool = True  # also write the kohya-format file AUTOMATIC1111 / ComfyUI load
    fuse: bool = False  # also export the base with the LoRA fused in (a full pipeline folder)


@dataclass
class DistillConfig:
    """Latent consistency distillation (Luo et al. 2023): the pretrained model (model.pretrained) is the teacher,
    the student starts from its UNet and learns to jump to the end of the teacher's guided ODE in one step, so it
    samples in 1–4 steps with the `lcm` sampler and no unconditional pass. With lora.enabled the student is a
    LoRA on the teacher's UNet (LCM-LoRA)."""

    enabled: bool = False
    # The teacher's classifier-free guidance, folded into the student at this one scale (no w-embedding: the
    # student keeps the teacher's architecture, so it exports as a plain UNet or a LoRA, and the shapes sweep
    # picks one best scale anyway).
    guidance_scale: float = 3.0
    # The teacher's ODE grid: t_n = (n + 1)·k − 1 with k = T / num_ddim_timesteps; each step of the solver skips
    # k training timesteps. It becomes the exported LCMScheduler's original_inference_steps.
    num_ddim_timesteps: int = 50
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # the pseudo-Huber δ: √(d² + c²) − c
    # The consistency target comes from an EMA of the student with this decay (0: the student itself,
    # without gradients, as LCM-LoRA and improved consistency training do).
    target_decay: float = 0.95
    # The teacher's and the target's forward passes (no gradients) in this precision. bf16 autocast speeds
    # them where the CPU has bf16 units (AVX-512 bf16 / AMX: 1.46x on the quickstart UNet, Intel Xeon) while the
    # student's forward and backward stay in the run's own precision (bf16 backward is slower on these CPUs).
    frozen_precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class HubConfig:
    """Publishing to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`, never from the config)."""

    repo_id: Optional[str] = None  # "user/name": publish the exported pipeline at the end of training
    private: bool = True
    push_checkpoints: bool = False  # also publish the weights at each checkpoint, in the background
    license: str = "other"  # the model card's license id (set it to what your data allows)
    tags: list[str] = field(default_factory=list)
    retries: int = 5  # attempts per upload, with exponential back-off


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
