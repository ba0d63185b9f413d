"""Typed configuration: dataclasses are the schema, YAML holds values, the CLI adds dotted overrides.

`load_config("configs/x.yaml", ["train.lr=2e-4"])` returns a fully typed `Config`; it reads no model
folder (resolving `model.pretrained` into component paths is `ldm.components.resolve_pretrained`). Every problem a
config can have on its own (unknown key, wrong type, impossible value, inconsistent pair) raises a
`ConfigError` naming the key and what would be valid, before any model or dataset is touched.
Checks that need a component's own config file (the VAE's downsampling factor, the text encoder's
width) live in `ldm.components.check_components`, which reads those files without loading weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from ldm.typed_yaml import ConfigError, UserError, build, parse_override, set_dotted  # noqa: F401 (re-exported)

Sampler = Literal["ddpm", "ddim", "dpm++", "dpm++sde", "euler", "euler-a", "unipc", "heun", "lcm"]


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


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
    # ldm.sharding); "none": every process holds all of them (DDP).
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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (or start from defaults), apply dotted overrides, type-check and validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model, data, train…)")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    cfg = build(Config, tree)
    check_config(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently,
    so a second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                                  "merge the two into one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax or encoding error, or a repeated key, names the file and the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem} (check the indentation "
                          "and quoting there)") from None


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Validation that needs no component files
# --------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def check_config(cfg: Config) -> None:
    m, d, t, s, a = cfg.model, cfg.data, cfg.train, cfg.sample, cfg.autoencoder
    u = m.unet
    # Counts first: the divisibility checks below divide by some of them.
    for key, val in [("model.unet.norm_num_groups", u.norm_num_groups),
                     ("model.unet.attention_head_dim", u.attention_head_dim),
                     ("autoencoder.norm_num_groups", a.norm_num_groups),
                     ("autoencoder.layers_per_block", a.layers_per_block),
                     ("conditioning.style.encoder_layers", cfg.conditioning.style.encoder_layers)]:
        _require(val > 0, key, f"must be a positive integer, got {val}")
    for key, val in [("train.seed", t.seed), ("sample.seed", s.seed), ("autoencoder.seed", a.seed),
                     ("data.shapes.seed", d.shapes.seed),
                     ("autoencoder.num_validation_images", a.num_validation_images)]:
        _require(val >= 0, key, f"must be ≥ 0, got {val}")
    _require(u.cross_attention_dim is None or u.cross_attention_dim > 0, "model.unet.cross_attention_dim",
             f"must be positive or null (derived from the text encoder), got {u.cross_attention_dim}")
    _require(d.max_samples is None or d.max_samples >= 1, "data.max_samples",
             f"must be ≥ 1 or null, got {d.max_samples}")
    _require(d.min_image_size is None or d.min_image_size >= 1, "data.min_image_size",
             f"must be ≥ 1 or null, got {d.min_image_size}")
    for key, val in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        _require(0.0 <= val < 1.0, key, f"must be in [0, 1), got {val} (AdamW's defaults are 0.9 and 0.999)")
    _require(t.adam_epsilon > 0, "train.adam_epsilon", f"must be positive, got {t.adam_epsilon} (1e-8 is typical)")
    _require(t.adam_weight_decay >= 0, "train.adam_weight_decay", f"must be ≥ 0, got {t.adam_weight_decay}")
    _require(a.kl_weight >= 0, "autoencoder.kl_weight", f"must be ≥ 0, got {a.kl_weight}")
    _require(len(a.block_out_channels) >= 1, "autoencoder.block_out_channels", "needs at least one level")
    try:
        import codecs

        codecs.lookup(d.metadata_encoding)
    except LookupError:
        raise ConfigError(f"config key 'data.metadata_encoding': {d.metadata_encoding!r} is not a text encoding "
                          "Python knows; use e.g. utf-8, cp1252 or latin-1") from None
    _require(len(u.block_out_channels) >= 1, "model.unet.block_out_channels", "needs at least one level")
    _require(
        len(u.cross_attention) == len(u.block_out_channels),
        "model.unet.cross_attention",
        f"needs one entry per level of block_out_channels ({len(u.block_out_channels)}), got {len(u.cross_attention)}",
    )
    for i, ch in enumerate(u.block_out_channels):
        _require(
            ch > 0 and ch % u.norm_num_groups == 0,
            f"model.unet.block_out_channels[{i}]",
            f"{ch} must be a positive multiple of model.unet.norm_num_groups ({u.norm_num_groups})",
        )
        if u.cross_attention[i] or i == len(u.block_out_channels) - 1:
            _require(
                ch % u.attention_head_dim == 0,
                f"model.unet.block_out_channels[{i}]",
                f"{ch} must be divisible by model.unet.attention_head_dim ({u.attention_head_dim})",
            )
    for key, val in [("model.unet.layers_per_block", u.layers_per_block),
                     ("model.unet.attention_head_dim", u.attention_head_dim),
                     ("model.unet.transformer_layers_per_block", u.transformer_layers_per_block),
                     ("model.scheduler.num_train_timesteps", m.scheduler.num_train_timesteps),
                     ("data.resolution", d.resolution), ("train.max_steps", t.max_steps),
                     ("train.batch_size", t.batch_size),
                     ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                     ("sample.num_inference_steps", s.num_inference_steps),
                     ("sample.num_images_per_prompt", s.num_images_per_prompt),
                     ("sample.batch_size", s.batch_size), ("autoencoder.max_steps", a.max_steps),
                     ("autoencoder.batch_size", a.batch_size), ("autoencoder.latent_channels", a.latent_channels),
                     ("data.shapes.num_images", d.shapes.num_images), ("train.log_every", t.log_every)]:
        _require(val > 0, key, f"must be a positive integer, got {val}")
    _require(0 < m.scheduler.beta_start < m.scheduler.beta_end < 1, "model.scheduler.beta_start",
             f"need 0 < beta_start < beta_end < 1, got {m.scheduler.beta_start} and {m.scheduler.beta_end}")
    _require(0.0 <= d.caption_dropout < 1.0, "data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}")
    _require(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    _require(a.lr > 0, "autoencoder.lr", f"must be positive, got {a.lr}")
    _require(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be ≥ 0")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be ≥ 0 (0 disables clipping)")
    _require(t.validate_every >= 0, "train.validate_every", "must be ≥ 0 (0 disables validation)")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be ≥ 0 (0 disables checkpoints)")
    _require(t.checkpoints_total_limit is None or t.checkpoints_total_limit >= 1, "train.checkpoints_total_limit",
             "must be ≥ 1 or null (keep all)")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be ≥ 1")
    _require(t.ema_decay is None or 0.0 < t.ema_decay < 1.0, "train.ema_decay",
             f"must be in (0, 1) or null to disable EMA, got {t.ema_decay}")
    _require(t.snr_gamma is None or t.snr_gamma > 0, "train.snr_gamma", "must be positive or null")
    _require(s.guidance_scale >= 1.0 or s.guidance_scale == 0.0, "sample.guidance_scale",
             f"must be ≥ 1 (1 disables guidance), got {s.guidance_scale}")
    _require(len(s.prompts) > 0, "sample.prompts", "needs at least one prompt")
    _require(d.num_workers >= 0, "data.num_workers", "must be ≥ 0")
    _require(d.validation_images >= 0, "data.validation_images", "must be ≥ 0")
    if d.shapes.holdout:
        from ldm.shapes import parse_holdout

        try:
            parse_holdout(d.shapes.holdout)
        except ValueError as err:
            raise ConfigError(f"config key 'data.shapes.holdout': {err}") from err
    if d.shapes.focus:
        from ldm.shapes import parse_holdout

        try:
            parse_holdout(d.shapes.focus)
        except ValueError as err:
            raise ConfigError(f"config key 'data.shapes.focus': {err}") from err
    _require(0.0 < d.shapes.focus_fraction <= 1.0, "data.shapes.focus_fraction",
             f"must be in (0, 1], got {d.shapes.focus_fraction}")
    _require(d.max_aspect_ratio >= 1.0, "data.max_aspect_ratio", f"must be ≥ 1, got {d.max_aspect_ratio}")
    _require(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction}")
    _require(m.text_encoder.max_length is None or m.text_encoder.max_length > 1,
             "model.text_encoder.max_length", "must be > 1 or null")
    _require(0.0 <= d.shapes.colour_only_captions <= 1.0, "data.shapes.colour_only_captions", "must be in [0, 1]")
    valid_styles = ("white", "grey", "dark")  # ldm.shapes.STYLES (not imported here: config loads first)
    for i, style in enumerate(d.shapes.styles):
        _require(style in valid_styles, f"data.shapes.styles[{i}]", f"{style!r}: choose from {', '.join(valid_styles)}")
    c = cfg.conditioning
    _require(0.0 <= c.sketch.dropout < 1.0, "conditioning.sketch.dropout", "must be in [0, 1)")
    _require(c.sketch.threshold > 0.0, "conditioning.sketch.threshold", "must be > 0")
    _require(c.type == "text" or m.pretrained is not None or m.unet.path is not None, "conditioning.type",
             f"'{c.type}' trains on top of a trained text-to-image model: set model.pretrained to its pipeline")
    _require(0.0 <= c.style.dropout < 1.0, "conditioning.style.dropout", "must be in [0, 1)")
    _require(c.style.encoder_width % 4 == 0 and c.style.encoder_width > 0, "conditioning.style.encoder_width",
             "must be a positive multiple of 4 (4 attention heads)")
    lo = cfg.lora
    if lo.enabled:
        _require(lo.rank >= 1, "lora.rank", f"must be a positive integer, got {lo.rank}")
        _require(lo.alpha is None or lo.alpha > 0, "lora.alpha", f"must be positive or null (= rank), got {lo.alpha}")
        _require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        _require(len(lo.targets) > 0, "lora.targets", "needs at least one of attention, projections, feed_forward, "
                 "convolutions, time_embedding")
        _require(m.pretrained is not None or m.unet.path is not None, "lora.enabled",
                 "a LoRA adapts a trained model: set model.pretrained to its pipeline (folder or Hub id)")
        _require(c.type == "text", "lora.enabled", f"a LoRA adapts the text-to-image UNet; a {c.type} run trains "
                 "its own small module whole (set lora.enabled=false, or conditioning.type=text)")
    ds = cfg.distill
    if ds.enabled:
        _require(m.pretrained is not None, "distill.enabled",
                 "distillation needs a teacher: set model.pretrained to a trained pipeline (folder or Hub id)")
        _require(c.type == "text", "distill.enabled", f"distils the text-to-image UNet; a {c.type} run cannot "
                 "be distilled (set conditioning.type=text)")
        _require(ds.guidance_scale >= 1.0, "distill.guidance_scale", f"must be ≥ 1 (1 = no guidance), got "
                 f"{ds.guidance_scale}")
        T = m.scheduler.num_train_timesteps
        _require(1 <= ds.num_ddim_timesteps <= T // 2, "distill.num_ddim_timesteps",
                 f"must be in [1, {T // 2}] (each solver step skips at least 2 of the {T} training timesteps)")
        _require(ds.huber_c > 0, "distill.huber_c", f"must be > 0, got {ds.huber_c}")
        _require(0.0 <= ds.target_decay < 1.0, "distill.target_decay", f"must be in [0, 1), got {ds.target_decay}")
        _require(cfg.train.snr_gamma is None, "train.snr_gamma", "weights the diffusion loss, not the consistency "
                 "loss of a distillation run: set train.snr_gamma=null")
        _require(not cfg.lora.enabled or ds.target_decay == 0, "distill.target_decay",
                 "an LCM-LoRA distils against the student itself: set distill.target_decay=0")
        _require(m.text_encoder.train == "frozen", "model.text_encoder.train",
                 "the teacher and the student share the frozen text encoder in a distillation run: set it 'frozen'")
    te = m.text_encoder
    if te.train != "frozen":
        _require(c.type == "text", "model.text_encoder.train", f"a {c.type} run trains its own module on a frozen "
                 "model; train the text encoder in the text-to-image run (conditioning.type=text)")
        _require(te.lr is None or te.lr > 0, "model.text_encoder.lr", f"must be positive or null, got {te.lr}")
    _require(te.train != "lora" or lo.enabled, "model.text_encoder.train",
             "'lora' puts adapters on the text encoder beside the UNet's: set lora.enabled=true (or train it 'full')")
    _require(te.train != "full" or not lo.enabled, "model.text_encoder.train",
             "'full' with lora.enabled cannot be exported as LoRA files: use 'lora' (adapters on both), or "
             "lora.enabled=false for a full fine-tune of both")
    h = cfg.hub
    _require(h.repo_id is None or (h.repo_id.count("/") == 1 and all(h.repo_id.split("/"))), "hub.repo_id",
             f"{h.repo_id!r} must look like 'user-or-org/model-name'")
    _require(h.retries >= 1, "hub.retries", "must be ≥ 1")
    _require(not h.push_checkpoints or h.repo_id is not None, "hub.push_checkpoints", "needs hub.repo_id")
    _require(m.vae.path is not None, "model.vae.path",
             "a latent model needs a VAE: a Hub id, a folder, or the output of scripts/train_autoencoder.py")
    if d.cache:
        _require(d.center_crop, "data.cache",
                 "caches each image once, so it cannot be combined with random crops "
                 "(set data.center_crop=true, or data.cache=false)")
        _require(not d.shuffle_tags, "data.shuffle_tags", "makes a new caption on every use, which the text cache "
                 "cannot hold: set data.shuffle_tags=false, or data.cache=false")
    _require(d.keep_tags >= 0, "data.keep_tags", f"must be ≥ 0, got {d.keep_tags}")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be ≥ 0, got {d.shuffle_buffer}")
    if d.streaming:
        for key, ok, why in (("data.cache", not d.cache, "the cache indexes every sample"),
                             ("data.buckets.enabled", not d.buckets.enabled, "the bucket plan needs every image size"),
                             ("data.validation_images", d.validation_images == 0, "held-back samples need an index"),
                             ("conditioning.type", cfg.conditioning.type == "text", "conditions index their samples")):
            _require(ok, key, f"cannot be combined with data.streaming ({why}): use the map-style shards "
                     "(data.streaming=false), which read the same shards with random access")
    b = d.buckets
    for key, val in (("step", b.step), ("min_side", b.min_side), ("max_side", b.max_side),
                     ("min_images", b.min_images)):
        _require(val is None or val > 0, f"data.buckets.{key}", f"must be a positive integer or null, got {val}")
    _require(b.max_aspect_ratio >= 1.0, "data.buckets.max_aspect_ratio", f"must be ≥ 1, got {b.max_aspect_ratio}")
    if b.min_side is not None and b.max_side is not None:
        _require(b.min_side <= b.max_side, "data.buckets.min_side", f"{b.min_side} exceeds max_side {b.max_side}")
    from ldm.sharding import check_sharding

    check_sharding(cfg)
    for i, ch in enumerate(a.block_out_channels):
        _require(ch > 0 and ch % a.norm_num_groups == 0, f"autoencoder.block_out_channels[{i}]",
                 f"{ch} must be a positive multiple of autoencoder.norm_num_groups ({a.norm_num_groups})")
