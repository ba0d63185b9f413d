"""The data section of the schema: where pictures and captions come from and how they become batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class BucketConfig:
    """Aspect-ratio buckets: each image trains at the bucket of about resolution² pixels nearest its shape."""

    enabled: bool = False
    """aspect-ratio buckets: each image trains at the bucket of about `resolution`² px nearest its shape"""
    step: Optional[int] = None  # px between bucket sides; null: what the VAE and UNet divide (f · 2^(levels − 1))
    """px between bucket sides; null: what the VAE and UNet divide (f · 2^(levels − 1); 64 for SD)"""
    min_side: Optional[int] = None  # px; null: resolution / 2
    """shortest bucket side (px); null: resolution / 2"""
    max_side: Optional[int] = None  # px; null: resolution · 2
    """longest bucket side (px); null: resolution · 2"""
    max_aspect_ratio: float = 2.0  # longer / shorter side of the widest bucket
    """longer / shorter side of the most elongated bucket"""
    no_upscale: bool = False  # an image smaller than its bucket trains at its own size (rounded down to step)
    """an image smaller than its bucket trains at its own size (rounded down to the step) instead of enlarged"""
    # A bucket holding fewer images merges into its nearest neighbour (never dropped); null: one global batch.
    min_images: Optional[int] = None
    """buckets with fewer images merge into their nearest neighbour (never dropped); null: one global micro-batch"""


@dataclass
class ShapesConfig:
    num_images: int = 4096
    """size of the built-in shapes dataset"""
    seed: int = 0
    """its seed"""
    # Combinations kept out of training, "colour shape position" with * for any part (e.g. "red triangle *");
    # the probe scores them separately, to measure generalisation to unseen captions.
    holdout: list[str] = field(default_factory=list)
    """combinations kept out of training, `"colour shape position"` with `*` (e.g. `red triangle *`)"""
    # Fraction of pictures captioned by colour alone ("a red shape"), e.g. for sketch runs, where shape
    # and position are meant to come from the sketch.
    colour_only_captions: float = 0.0
    """fraction of pictures captioned by colour alone ("a red shape"), for sketch runs"""
    # Background styles to draw (white, grey, dark), one per picture at random; captions never name them.
    styles: list[str] = field(default_factory=list)
    """background styles drawn at random per picture (`white`, `grey`, `dark`); captions never name them"""
    # Combinations ("colour shape position", * for any part) that make up `focus_fraction` of the pictures,
    # the rest cycling through the others (e.g. a new concept with a replay of the rest, for fine-tuning).
    focus: list[str] = field(default_factory=list)
    """combinations (as in `holdout`) that make up `focus_fraction` of the pictures, the rest cycling through the
    others: a new concept plus a replay of what the model knows"""
    focus_fraction: float = 0.5
    """that fraction, evenly interleaved"""


@dataclass
class DataConfig:
    # "shapes" (built in), a local folder (imagefolder with metadata.jsonl/.csv) or a Hub dataset name.
    dataset: str = "shapes"
    """`shapes`, a local imagefolder (metadata file or `.txt` captions), a folder of `.tar` / `.parquet` shards (or a
    glob or fsspec URL ending in one), or a Hub dataset name"""
    split: str = "train"
    """dataset split"""
    image_column: str = "image"
    """image column of a Hub dataset (an imagefolder always yields `image`)"""
    caption_column: str = "text"
    """caption column"""
    metadata_encoding: str = "utf-8"  # of a local folder's metadata.jsonl / .csv (a UTF-8 byte-order mark is fine)
    """encoding of a folder's `metadata.jsonl` / `.csv` (a UTF-8 byte-order mark is fine; other bytes stop the run
    naming the line)"""
    resolution: int = 512
    """training size in pixels (square)"""
    center_crop: bool = True
    """centre crop; `false` crops at random"""
    # Off by default: a flipped image contradicts captions that say "left" or "right".
    random_flip: bool = False
    """horizontal flips (off: they contradict "left"/"right" captions)"""
    caption_dropout: float = 0.1  # the empty caption teaches the unconditional model CFG needs
    """probability of training on the empty caption (for CFG)"""
    max_samples: Optional[int] = None
    """use only the first N samples"""
    num_workers: int = 0
    """dataloader worker processes"""
    # Encode latents and prompt embeddings once into a fingerprinted cache on disk (needs centre crops;
    # flips are cached as their own variant). Training then reads the cache and loads no encoder.
    cache: bool = False
    """encode latents and captions once into a fingerprinted on-disk cache"""
    cache_dir: str = "outputs/cache"
    """where the cache lives (shared by runs; fingerprints keep it correct)"""
    # The last N samples never enter training; their loss with fixed noise and timesteps, per timestep
    # bucket, is logged at every validation (and at the end).
    validation_images: int = 0
    """hold back the last N samples; log their loss per timestep bucket (fixed noise and t)"""
    # Latents used for training: a fresh sample of q(z|x) each time (the LDM recipe) or its mean.
    latent_sample: Literal["sample", "mean"] = "sample"
    """train on a fresh sample of q(z\\|x) each time, or on its `mean`"""
    # The audit decodes every sample once before training, converting or skipping bad ones.
    audit: bool = True
    """decode every sample once before training; convert or skip and count bad ones"""
    min_image_size: Optional[int] = None  # shorter side in px below which an image is skipped; null: resolution / 4
    """shorter side (px) below which an image is skipped; null: resolution / 4"""
    max_aspect_ratio: float = 4.0  # longer / shorter side above which an image is skipped
    """longer / shorter side above which an image is skipped"""
    max_bad_fraction: float = 0.05  # stop before training if more than this fraction is unusable
    """stop before training, listing files, if more than this is unusable"""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    # Shards larger than local disk: stream them, each process (each machine) reading only its own shards.
    streaming: bool = False
    """stream shards: each process reads its own (no cache, buckets or held-back samples; resume exact by replay)"""
    shuffle_buffer: int = 1000  # samples in the streaming shuffle buffer (shard order shuffled too); 0: in order
    """streaming shuffle window (shard order shuffled too, dealt anew each epoch); 0: fixed shards per process, in
    order"""
    # Comma-separated tags shuffled on every use (kohya-ss's shuffle_caption), the first keep_tags in place.
    shuffle_tags: bool = False
    """shuffle comma-separated tags on every use (kohya's `shuffle_caption`); not with `data.cache`"""
    keep_tags: int = 0
    """the first N tags stay in place when shuffling (kohya's `keep_tokens`)"""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
