"""The checks a config passes before anything loads: each failure names the key and what to do."""

from __future__ import annotations

import dataclasses
import math

from ldm.config.schema import Config
from ldm.errors import ConfigError
from ldm.shapes import parse_holdout


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def check_config(cfg: Config) -> None:
    """Every check of a loaded config, section by section; the first failure raises a ConfigError that names
    the key and the fix."""
    _check_finite(cfg)
    _check_counts(cfg)
    _check_model(cfg)
    _check_training(cfg)
    _check_data(cfg)
    _check_conditioning(cfg)
    _check_lora(cfg)
    _check_distillation(cfg)
    _check_text_encoder(cfg)
    _check_hub(cfg)
    _check_data_path(cfg)
    _check_processes_and_stage_1(cfg)


def _check_finite(node, prefix: str = "") -> None:
    """Every number of the config is finite: `inf` or `nan` (which YAML and the command line both accept) would
    pass a range check like `train.lr > 0` and only show up as non-finite weights."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"config key '{key}': {item} is not a finite number; give a finite value")


def _check_counts(cfg: Config) -> None:
    """Counts and ranges that the later checks divide by or rely on."""
    d, t, s, a, u = cfg.data, cfg.train, cfg.sample, cfg.autoencoder, cfg.model.unet
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


def _check_model(cfg: Config) -> None:
    """The UNet's levels, widths and heads, and the positive integers of every section."""
    m, d, t, s, a, u = cfg.model, cfg.data, cfg.train, cfg.sample, cfg.autoencoder, cfg.model.unet
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


def _check_training(cfg: Config) -> None:
    """The noise schedule, learning rates, cadences, EMA and sampling settings."""
    m, d, t, s, a = cfg.model, cfg.data, cfg.train, cfg.sample, cfg.autoencoder
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


def _check_data(cfg: Config) -> None:
    """The data section: the shapes world's specs, aspect ratios, bad-data limits, caption lengths."""
    m, d = cfg.model, cfg.data
    if d.shapes.holdout:
        try:
            parse_holdout(d.shapes.holdout)
        except ValueError as err:
            raise ConfigError(f"config key 'data.shapes.holdout': {err}") from err
    if d.shapes.focus:
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


def _check_conditioning(cfg: Config) -> None:
    """Sketch and style conditions, which train on top of a trained model."""
    m, c = cfg.model, cfg.conditioning
    _require(0.0 <= c.sketch.dropout < 1.0, "conditioning.sketch.dropout", "must be in [0, 1)")
    _require(c.sketch.threshold > 0.0, "conditioning.sketch.threshold", "must be > 0")
    _require(c.type == "text" or m.pretrained is not None or m.unet.path is not None, "conditioning.type",
             f"'{c.type}' trains on top of a trained text-to-image model: set model.pretrained to its pipeline")
    _require(0.0 <= c.style.dropout < 1.0, "conditioning.style.dropout", "must be in [0, 1)")
    _require(c.style.encoder_width % 4 == 0 and c.style.encoder_width > 0, "conditioning.style.encoder_width",
             "must be a positive multiple of 4 (4 attention heads)")


def _check_lora(cfg: Config) -> None:
    """A LoRA's rank, alpha and targets, and what it can adapt."""
    m, c, lo = cfg.model, cfg.conditioning, cfg.lora
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


def _check_distillation(cfg: Config) -> None:
    """A distillation's teacher, solver grid and loss, and what it combines with."""
    m, c = cfg.model, cfg.conditioning
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


def _check_text_encoder(cfg: Config) -> None:
    """A trained text encoder: what it trains with, its learning rate."""
    c, lo, te = cfg.conditioning, cfg.lora, cfg.model.text_encoder
    if te.train != "frozen":
        _require(c.type == "text", "model.text_encoder.train", f"a {c.type} run trains its own module on a frozen "
                 "model; train the text encoder in the text-to-image run (conditioning.type=text)")
        _require(te.lr is None or te.lr > 0, "model.text_encoder.lr", f"must be positive or null, got {te.lr}")
    _require(te.train != "lora" or lo.enabled, "model.text_encoder.train",
             "'lora' puts adapters on the text encoder beside the UNet's: set lora.enabled=true (or train it 'full')")
    _require(te.train != "full" or not lo.enabled, "model.text_encoder.train",
             "'full' with lora.enabled cannot be exported as LoRA files: use 'lora' (adapters on both), or "
             "lora.enabled=false for a full fine-tune of both")


def _check_hub(cfg: Config) -> None:
    """Publishing settings, and the VAE every latent model needs."""
    m = cfg.model
    h = cfg.hub
    _require(h.repo_id is None or (h.repo_id.count("/") == 1 and all(h.repo_id.split("/"))), "hub.repo_id",
             f"{h.repo_id!r} must look like 'user-or-org/model-name'")
    _require(h.retries >= 1, "hub.retries", "must be ≥ 1")
    _require(not h.push_checkpoints or h.repo_id is not None, "hub.push_checkpoints", "needs hub.repo_id")
    _require(m.vae.path is not None, "model.vae.path",
             "a latent model needs a VAE: a Hub id, a folder, or the output of scripts/train_autoencoder.py")


def _check_data_path(cfg: Config) -> None:
    """What the cache, tag shuffling, streaming and buckets combine with."""
    d = cfg.data
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


def _check_processes_and_stage_1(cfg: Config) -> None:
    """Sharding, then the autoencoder's widths."""
    a = cfg.autoencoder
    check_sharding(cfg)
    for i, ch in enumerate(a.block_out_channels):
        _require(ch > 0 and ch % a.norm_num_groups == 0, f"autoencoder.block_out_channels[{i}]",
                 f"{ch} must be a positive multiple of autoencoder.norm_num_groups ({a.norm_num_groups})")


def check_sharding(cfg: Config) -> None:
    """What `train.sharding=fsdp` cannot be combined with, before anything loads."""
    if cfg.train.sharding != "fsdp":
        return
    m, t = cfg.model, cfg.train
    for key, ok, why in (
        ("lora.enabled", not cfg.lora.enabled, "a LoRA trains a few MB of adapters, which DDP holds cheaply"),
        ("conditioning.type", cfg.conditioning.type == "text",
         "sharding a ControlNet or style adapter is not tested here; they train a fraction of the UNet's size"),
        ("distill.enabled", not cfg.distill.enabled, "the student's target network is not sharded"),
        ("model.text_encoder.train", m.text_encoder.train == "frozen", "the text encoder would train unsharded"),
        ("train.compile", not t.compile, "compiling a sharded module is not tested here"),
        ("hub.push_checkpoints", not cfg.hub.push_checkpoints,
         "a mid-run export would need every process; the final export is still pushed"),
    ):
        if not ok:
            raise ConfigError(f"config key '{key}': cannot be combined with train.sharding=fsdp ({why}); "
                              f"change it or use train.sharding=none (DDP)")
