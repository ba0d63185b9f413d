"""The model card (README.md) of an export: what it is, how it was trained, how to use it; paths made public-safe."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from ldm.config.schema import Config, downsampling_factor
from ldm.models.loading import is_local, native_size_of

# Config keys that hold paths on this machine: what leaves it says only the folder's name.
PATH_KEYS = ("model.pretrained", "model.vae.path", "model.text_encoder.path", "model.unet.path", "data.dataset",
             "data.cache_dir", "train.output_dir", "train.resume", "autoencoder.output_dir")


def _local_name(value: str) -> str:
    return f"<local>/{Path(value).name}"


def public_name(value: str) -> str:
    """A Hub id as it is; a local path reduced to `<local>/<folder name>` (nothing about this machine leaves it)."""
    return _local_name(value) if is_local(value) else value


def public_config(cfg: Config) -> Config:
    """A copy of `cfg` whose local paths are reduced to `<local>/<folder name>` (Hub ids and the shapes
    dataset stay as they are), for the model card and the uploaded `ldm_config.yaml`."""
    import copy

    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, leaf)
        if isinstance(value, str) and value not in ("shapes", "latest") and not value.startswith("pkg://") \
                and is_local(value):
            setattr(node, leaf, _local_name(value))
    return cfg


def _public_tree(conf):
    """A parsed JSON value with every `_name_or_path` (where a component was loaded from) that is a local path
    reduced to its folder name, at any depth."""
    if isinstance(conf, dict):
        return {k: (_local_name(v) if k in ("_name_or_path", "name_or_path") and isinstance(v, str) and v
                    and is_local(v) else _public_tree(v)) for k, v in conf.items()}
    if isinstance(conf, list):
        return [_public_tree(v) for v in conf]
    return conf


def public_json(text: str) -> str:
    """A component config with Diffusers' / Transformers' `_name_or_path` reduced to the folder name when it is a
    local path."""
    import json

    return json.dumps(_public_tree(json.loads(text)), indent=2, sort_keys=True) + "\n"


def public_metadata(meta: dict[str, str]) -> dict[str, str]:
    """A safetensors file's metadata with nothing local left: a value that is a local path becomes its folder
    name; a JSON value (a component config) loses its local `_name_or_path`."""
    import json

    public = {}
    for key, value in meta.items():
        try:
            parsed = json.loads(value)
        except (ValueError, TypeError):
            parsed = None
        if isinstance(parsed, (dict, list)):
            cleaned = _public_tree(parsed)
            public[key] = value if cleaned == parsed else json.dumps(cleaned)
        else:
            public[key] = public_name(value) if isinstance(value, str) and value else value
    return public


def count_parameters(weights: Path) -> int:
    """Parameters in a safetensors file, read from its header (nothing loaded)."""
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def _params(folder: Path, sub: str) -> int:
    return sum(count_parameters(p) for p in sorted((folder / sub).glob("*.safetensors")))


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not name.startswith("<local>/") and not is_local(name)


def _evaluation_rows(evaluation: dict) -> list[str]:
    """Rows of `| split | metric | value |` from {"scores": {...}} or {split: {metric: value}}."""
    if "scores" in evaluation:
        evaluation = {"all": evaluation["scores"]}
    rows = []
    for split, scores in evaluation.items():
        if not isinstance(scores, dict):
            continue
        for metric, value in scores.items():
            if isinstance(value, float):
                rows.append(f"| {split.replace('_', ' ')} | {metric} | {100 * value:.1f} % |")
            elif isinstance(value, int):
                rows.append(f"| {split.replace('_', ' ')} | {metric} | {value} |")
    return rows


def model_card(folder: str | Path, cfg: Config, repo_id: Optional[str] = None,
               evaluation: Optional[dict] = None, facts: Optional[dict] = None):
    """A `huggingface_hub.ModelCard` for the pipeline in `folder` trained with `cfg`; `facts`: what the kind that
    trained says of itself (a distilled student: how to sample it)."""
    facts = facts or {}
    import json

    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    cfg = public_config(cfg)  # the card is for others: no local paths
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return lora_card(folder, cfg, repo_id, evaluation, facts)
    unet, vae = (json.loads((folder / sub / "config.json").read_text()) for sub in ("unet", "vae"))
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    name = repo_id or cfg.hub.repo_id or folder.name
    factor = downsampling_factor(vae["block_out_channels"])
    resolution = native_size_of(unet, vae)
    base = cfg.model.pretrained
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", license=cfg.hub.license,
        tags=["ldm", "text-to-image", "diffusers", "latent-diffusion",
              *(["lcm", "latent-consistency"] if "distilled" in facts else []),
              *(["controlnet"] if (folder / "controlnet").is_dir() else []),
              *(["ip-adapter"] if (folder / "ip_adapter").is_dir() else []), *cfg.hub.tags],
        base_model=base if _is_hub_id(base) else None,
        datasets=[cfg.data.dataset] if _is_hub_id(cfg.data.dataset) else None,
        # With the app beside the weights, the same folder pushed as a Space (repo_type="space") serves it.
        **({"sdk": "gradio", "app_file": "app.py"} if (folder / "app.py").is_file() else {}),
    )
    s = cfg.sample
    attends = [str(i) for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")]
    prompt = s.prompts[0].replace('"', "'") if s.prompts else "a photograph"
    lines = [
        f"# {name.split('/')[-1]}", "",
        f"A text-to-image latent diffusion model ({resolution}×{resolution} px) trained with ldm, "
        f"a latent-diffusion trainer built on Diffusers"
        + (f", fine-tuned from `{base}`." if base else ", from scratch."), "",
        "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{name}")',
        f'image = pipe("{prompt}", num_inference_steps={s.num_inference_steps}, '
        f"guidance_scale={s.guidance_scale}).images[0]",
        'image.save("sample.png")', "```", "",
        "## Model", "",
        "| component | architecture | parameters |", "| --- | --- | --- |",
        f"| UNet | `UNet2DConditionModel`, channels {list(unet['block_out_channels'])}, "
        f"layers_per_block {unet['layers_per_block']}, cross-attention at levels {', '.join(attends) or 'none'} | "
        f"{_params(folder, 'unet'):,} |",
        f"| VAE | `AutoencoderKL`, downsampling ×{factor}, {vae['latent_channels']} latent channels, "
        f"scaling factor {vae.get('scaling_factor')} | {_params(folder, 'vae'):,} |",
        f"| text encoder | `{(text.get('architectures') or [text.get('model_type')])[0]}`, width "
        f"{text.get('hidden_size')} | {_params(folder, 'text_encoder'):,} |",
        *([f"| ControlNet | `ControlNetModel` (sketch: edges of the picture) | {_params(folder, 'controlnet'):,} |"]
          if (folder / "controlnet").is_dir() else []),
        *([f"| style adapter | IP-Adapter (image encoder + decoupled cross-attention), "
           f"`ip_adapter/`: load with `pipe.load_ip_adapter(repo, subfolder='ip_adapter', "
           f"weight_name='ip_adapter.safetensors')` | "
           f"{_params(folder, 'ip_adapter') + _params(folder, 'ip_adapter/image_encoder'):,} |"]
          if (folder / "ip_adapter").is_dir() else []), "",
        f"Noise schedule: {cfg.model.scheduler.beta_schedule}, T = {cfg.model.scheduler.num_train_timesteps}, "
        f"{cfg.model.scheduler.prediction_type} prediction. Default sampler: {s.sampler}.", "",
        *_distill_lines(cfg, facts, lora=False), *_demo_lines(folder, name), *_training_lines(cfg),
        *_samples_and_evaluation(folder, evaluation),
    ]
    singles = sorted(p.name for p in folder.glob("*.safetensors") if is_model_file(p))
    if singles:
        lines += ["## Single-file checkpoint", "",
                  f"`{singles[0]}` holds the same weights in the original Stable-Diffusion key layout "
                  "(for AUTOMATIC1111, ComfyUI or `from_single_file`).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


_STAMP = re.compile(r"\n<!-- written by ldm \(sha256 ([0-9a-f]{16})\); edits are kept: publish\.py then leaves "
                    r"this card as it is -->\n$")


def _stamp(text: str) -> str:
    """The card ldm writes ends with the hash of its own text: a card edited by hand no longer matches."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return (f"{text}\n<!-- written by ldm (sha256 {digest}); edits are kept: publish.py then leaves this card as "
            "it is -->\n")


def card_is_ldms(path: Path) -> bool:
    """README.md is absent or exactly as ldm wrote it (so rewriting it loses nothing)."""
    if not path.is_file():
        return True
    text = path.read_text(errors="replace")
    found = _STAMP.search(text)
    return bool(found) and hashlib.sha256(text[:found.start()].encode()).hexdigest()[:16] == found.group(1)


def _distill_lines(cfg: Config, facts: dict, lora: bool) -> list[str]:
    """How to sample a distilled student (`facts["distilled"]`, from its kind): the steps and guidance it was
    made for."""
    if "distilled" not in facts:
        return []
    d = cfg.distill
    return [
        "## Few-step sampling", "",
        f"Distilled from `{cfg.model.pretrained}` by latent consistency distillation (Luo et al. 2023): the "
        f"teacher's classifier-free guidance at scale {d.guidance_scale:g} is folded into the weights. Sample with "
        "`LCMScheduler` in 1–8 steps (4 is the usual choice) and `guidance_scale=1`, which skips the unconditional "
        "pass: one UNet evaluation per image and step. A higher guidance scale adds guidance on top and doubles "
        "the cost.",
        *(["", "The base keeps its own scheduler; switch it before sampling with this LoRA:", "", "```python",
           "from diffusers import LCMScheduler", "", "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
           "```"] if lora else
          ["", "The pipeline's scheduler already is that `LCMScheduler` (its `original_inference_steps` = "
           f"{d.num_ddim_timesteps}, the grid it was distilled on)."]), "",
    ]


def _demo_lines(folder: Path, name: str) -> list[str]:
    """How to try the model in a browser: ldm's Gradio app, and the Space this folder can be."""
    lines = ["## Try it in a browser", "",
             f"ldm's web demo (`pip install -e '.[app]'` in ldm's repository): `python scripts/app.py --model {name}`, "
             "then open http://127.0.0.1:7860. Every image downloads as a PNG carrying its prompt, seed and settings.",
             ""]
    if (folder / "app.py").is_file():
        lines += ["This repository also holds that app (`app.py`, `requirements.txt`), serving the model beside it: "
                  "push the folder as a Gradio Space, or run `pip install -r requirements.txt && python app.py` here.",
                  ""]
    return lines


def _bucket_line(cfg: Config) -> str:
    b, res = cfg.data.buckets, cfg.data.resolution
    return (f"- aspect-ratio buckets of about {res}×{res} px each (sides {b.min_side or res // 2}–"
            f"{b.max_side or 2 * res} px, aspect ratio up to {b.max_aspect_ratio:g}): pass `height=` and `width=` "
            "(multiples of 8) to generate portrait or landscape pictures")


def _training_lines(cfg: Config) -> list[str]:
    t, te = cfg.train, cfg.model.text_encoder
    return [
        "## Training", "",
        f"- data: `{cfg.data.dataset}` at {cfg.data.resolution} px, caption dropout {cfg.data.caption_dropout}",
        *([_bucket_line(cfg)] if cfg.data.buckets.enabled else []),
        f"- {t.max_steps} optimizer steps, batch {t.batch_size} per process × {t.gradient_accumulation_steps} "
        f"accumulation, AdamW lr {t.lr} ({t.lr_scheduler}, {t.lr_warmup_steps} warm-up steps)",
        f"- text encoder: {te.train}"
        + (f", lr {te.lr if te.lr is not None else t.lr}" if te.train != "frozen" else ""),
        f"- precision {t.mixed_precision}; EMA {t.ema_decay if t.ema_decay is not None else 'off'}; "
        f"min-SNR γ {t.snr_gamma if t.snr_gamma is not None else 'off'}; seed {t.seed}",
        "- the full resolved configuration is `ldm_config.yaml` in this repository", "",
    ]


def _samples_and_evaluation(folder: Path, evaluation: Optional[dict]) -> list[str]:
    lines: list[str] = []
    images = sorted((folder / "images").glob("*.png")) if (folder / "images").is_dir() else []
    if images:
        lines += ["## Samples", ""] + [f"![{p.stem}](images/{p.name})" for p in images] + [""]
    rows = _evaluation_rows(evaluation or {})
    if rows:
        lines += ["## Evaluation", "", "| split | metric | value |", "| --- | --- | --- |", *rows, ""]
    return lines


def lora_card(folder: Path, cfg: Config, repo_id: Optional[str] = None, evaluation: Optional[dict] = None,
              facts: Optional[dict] = None):
    """The card of a LoRA folder: base model, rank, alpha, targets, trigger words, how to load it."""
    facts = facts or {}
    from huggingface_hub import ModelCard, ModelCardData

    lo, s = cfg.lora, cfg.sample
    name = repo_id or cfg.hub.repo_id or folder.name
    base = cfg.model.pretrained or cfg.model.unet.path
    alpha = lo.alpha if lo.alpha is not None else lo.rank
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=cfg.hub.license,
                         tags=["ldm", "lora", "text-to-image", "diffusers", *(["dora"] if lo.use_dora else []),
                               *(["lcm", "latent-consistency"] if "distilled" in facts else []),
                               *cfg.hub.tags],
                         base_model=base if _is_hub_id(base) else None,
                         instance_prompt=", ".join(lo.trigger_words) or None)
    prompt = s.prompts[0].replace('"', "'") if s.prompts else "a photograph"
    kohya = (folder / "lora_kohya.safetensors").is_file()
    lines = [
        f"# {name.split('/')[-1]}", "",
        f"A LoRA{' (DoRA)' if lo.use_dora else ''} for `{base}`, trained with ldm (a latent-diffusion trainer built on "
        "Diffusers).", "",
        "| | |", "| --- | --- |", f"| base model | `{base}` |", f"| rank | {lo.rank} |",
        f"| alpha | {alpha:g} (scale alpha / rank = {alpha / lo.rank:g}) |",
        f"| targets | {', '.join(lo.targets)} |", f"| trigger words | {', '.join(lo.trigger_words) or 'none'} |",
        f"| parameters | {count_parameters(folder / 'pytorch_lora_weights.safetensors'):,} |", "",
        "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}")',
        f'pipe.load_lora_weights("{name}")  # pytorch_lora_weights.safetensors',
        f'image = pipe("{prompt}", num_inference_steps={s.num_inference_steps}, '
        f"guidance_scale={s.guidance_scale}).images[0]", "```", "",
        *(["`lora_kohya.safetensors` holds the same adapter in the kohya-ss format (`lora_unet_…`, per-module "
           "alpha) for AUTOMATIC1111 and ComfyUI.", ""] if kohya else []),
        *_distill_lines(cfg, facts, lora=True), *_training_lines(cfg), *_samples_and_evaluation(folder, evaluation),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: str | Path, cfg: Config, repo_id: Optional[str] = None,
                     evaluation: Optional[dict] = None, images: tuple[Path, ...] = (),
                     replace_edited: bool = False, facts: Optional[dict] = None) -> Path:
    """Copy `images` into folder/images and write folder/README.md. A README.md written or edited by hand is
    kept (unless `replace_edited`): only a card exactly as ldm wrote it is regenerated. `facts`: what the kind
    that trained says of itself (ldm.training.trainables.card_facts)."""
    folder = Path(folder)
    path = folder / "README.md"
    if not replace_edited and not card_is_ldms(path):
        print(f"keeping {path}: it was written or edited by hand (pass --rewrite-card to replace it)")
        return path
    for image in images:
        (folder / "images").mkdir(exist_ok=True)
        (folder / "images" / Path(image).name).write_bytes(Path(image).read_bytes())
    path.write_text(_stamp(str(model_card(folder, cfg, repo_id, evaluation, facts))), encoding="utf-8")
    return path


def is_model_file(path: Path) -> bool:
    """A top-level `.safetensors` that ldm wrote as a model: a single-file checkpoint or a kohya-format LoRA,
    both stamped `modelspec.architecture: stable-diffusion-v1…`. Training state (optimizer, EMA, RNG, a
    checkpoint's lora.safetensors) carries no such stamp, whatever its name."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return meta.get("modelspec.architecture", "").startswith("stable-diffusion-v1")
