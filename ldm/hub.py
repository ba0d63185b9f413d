"""The Hugging Face Hub: a model card for an exported pipeline, and uploads that cannot hurt a run.

What is uploaded is an explicit allow-list (pipeline weights and configs, the card, images, a
single-file checkpoint): training state (optimizer, RNG, scheduler state) can never leave the
machine, whatever else lies in the folder. Uploads retry with exponential back-off; a failure is
reported and returned, never raised into the training loop. The token comes only from the
environment (HF_TOKEN) or `hf auth login`, through huggingface_hub itself: ldm never reads, stores
or prints it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from safetensors import safe_open

from ldm.components import is_local
from ldm.config import Config, downsampling_factor

# Paths relative to the pipeline folder; `*` never crosses a `/`.
ALLOW_PATTERNS = (
    "model_index.json", "README.md", "ldm_config.yaml", "pytorch_lora_weights.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
    "ip_adapter/ip_adapter.safetensors", "ip_adapter/image_encoder/config.json",
    "ip_adapter/image_encoder/model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model-*-of-*.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
    "tokenizer/added_tokens.json", "tokenizer/vocab.json", "tokenizer/vocab.txt", "tokenizer/merges.txt",
    "tokenizer/*.model",
    "scheduler/scheduler_config.json",
    "images/*.png", "images/*.jpg",
    "app.py", "requirements.txt",  # the web demo, when `scripts/app.py --write-space` put it there (a Space)
)
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _model_file(path: Path) -> bool:
    """A top-level `.safetensors` that ldm wrote as a model: a single-file checkpoint or a kohya-format LoRA,
    both stamped `modelspec.architecture: stable-diffusion-v1…`. Training state (optimizer, EMA, RNG, a
    checkpoint's lora.safetensors) carries no such stamp, whatever its name."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return meta.get("modelspec.architecture", "").startswith("stable-diffusion-v1")


def _allowed(path: str, folder: Path) -> bool:
    parts = path.split("/")
    if len(parts) == 1 and path.endswith(".safetensors") and path not in ALLOW_PATTERNS:
        return _model_file(folder / path)
    return any(len(p := pattern.split("/")) == len(parts) and all(map(fnmatch.fnmatchcase, parts, p))
               for pattern in ALLOW_PATTERNS)


def check_publishable(folder: str | Path) -> Path:
    """A folder ldm can publish: an exported pipeline or LoRA folder (a checkpoint or run folder is refused)."""
    from ldm.config import ConfigError

    folder = Path(folder)
    if not ((folder / "model_index.json").is_file() or (folder / "pytorch_lora_weights.safetensors").is_file()):
        hint = " (that is a training checkpoint: publish the run's pipeline/ or lora/ folder)" \
            if (folder / "state.json").is_file() else ""
        raise ConfigError(f"{str(folder)!r} is not an exported pipeline folder (model_index.json) nor a LoRA folder "
                          f"(pytorch_lora_weights.safetensors){hint}; give the pipeline/ or lora/ folder of a run")
    return folder


def upload_plan(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files that would be uploaded, files refused), as sorted paths relative to `folder`."""
    folder = check_publishable(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    allowed = {f for f in files if _allowed(f, folder)}
    return [f for f in files if f in allowed], [f for f in files if f not in allowed]


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


# Config keys that hold paths on this machine: what leaves it says only the folder's name.
PATH_KEYS = ("model.pretrained", "model.vae.path", "model.text_encoder.path", "model.unet.path", "data.dataset",
             "data.cache_dir", "train.output_dir", "train.resume", "autoencoder.output_dir")


def _local_name(value: str) -> str:
    return f"<local>/{Path(value).name}"


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


def _public_json(text: str) -> str:
    """A component config with Diffusers' / Transformers' `_name_or_path` (where it was loaded from) reduced to
    the folder name when it is a local path."""
    import json

    conf = json.loads(text)
    if isinstance(conf, dict):
        for key in ("_name_or_path", "name_or_path"):
            if isinstance(conf.get(key), str) and conf[key] and is_local(conf[key]):
                conf[key] = _local_name(conf[key])
    return json.dumps(conf, indent=2, sort_keys=True) + "\n"


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
               evaluation: Optional[dict] = None):
    """A `huggingface_hub.ModelCard` for the pipeline in `folder` trained with `cfg`."""
    import json

    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    cfg = public_config(cfg)  # the card is for others: no local paths
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return lora_card(folder, cfg, repo_id, evaluation)
    unet, vae = (json.loads((folder / sub / "config.json").read_text()) for sub in ("unet", "vae"))
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    name = repo_id or cfg.hub.repo_id or folder.name
    factor = downsampling_factor(vae["block_out_channels"])
    resolution = unet["sample_size"] * factor
    base = cfg.model.pretrained
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", license=cfg.hub.license,
        tags=["ldm", "text-to-image", "diffusers", "latent-diffusion",
              *(["lcm", "latent-consistency"] if cfg.distill.enabled else []),
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
        *_distill_lines(cfg, lora=False), *_demo_lines(folder, name), *_training_lines(cfg),
        *_samples_and_evaluation(folder, evaluation),
    ]
    singles = sorted(p.name for p in folder.glob("*.safetensors") if _model_file(p))
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


def _distill_lines(cfg: Config, lora: bool) -> list[str]:
    """How to sample a distilled student: the steps and guidance it was made for."""
    d = cfg.distill
    if not d.enabled:
        return []
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


def lora_card(folder: Path, cfg: Config, repo_id: Optional[str] = None, evaluation: Optional[dict] = None):
    """The card of a LoRA folder: base model, rank, alpha, targets, trigger words, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    lo, s = cfg.lora, cfg.sample
    name = repo_id or cfg.hub.repo_id or folder.name
    base = cfg.model.pretrained or cfg.model.unet.path
    alpha = lo.alpha if lo.alpha is not None else lo.rank
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=cfg.hub.license,
                         tags=["ldm", "lora", "text-to-image", "diffusers", *(["dora"] if lo.use_dora else []),
                               *(["lcm", "latent-consistency"] if cfg.distill.enabled else []),
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
        *_distill_lines(cfg, lora=True), *_training_lines(cfg), *_samples_and_evaluation(folder, evaluation),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: str | Path, cfg: Config, repo_id: Optional[str] = None,
                     evaluation: Optional[dict] = None, images: tuple[Path, ...] = (),
                     replace_edited: bool = False) -> Path:
    """Copy `images` into folder/images and write folder/README.md. A README.md written or edited by hand is
    kept (unless `replace_edited`): only a card exactly as ldm wrote it is regenerated."""
    folder = Path(folder)
    path = folder / "README.md"
    if not replace_edited and not card_is_ldms(path):
        print(f"keeping {path}: it was written or edited by hand (pass --rewrite-card to replace it)")
        return path
    for image in images:
        (folder / "images").mkdir(exist_ok=True)
        (folder / "images" / Path(image).name).write_bytes(Path(image).read_bytes())
    path.write_text(_stamp(str(model_card(folder, cfg, repo_id, evaluation))), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------


def stage_upload(folder: Path, files: list[str]) -> Path:
    """What goes up, in a sibling folder: the allow-listed files (hard links, no copy), with local paths
    reduced to folder names in ldm_config.yaml and the component configs' `_name_or_path`."""
    from ldm.config import load_config, save_config

    folder = Path(folder)
    staged = folder.with_name(f".{folder.name}.upload")
    shutil.rmtree(staged, ignore_errors=True)
    for name in files:
        source, target = folder / name, staged / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "ldm_config.yaml":
            save_config(public_config(load_config(source)), target)
        elif name.endswith("config.json") and "/" in name:
            target.write_text(_public_json(source.read_text()))
        else:
            try:
                os.link(source, target)
            except OSError:  # another file system: copy
                shutil.copy2(source, target)
    return staged


@dataclass
class PublishResult:
    ok: bool
    attempts: int
    files: list[str]
    refused: list[str]
    url: Optional[str] = None
    error: Optional[str] = None


def _retryable(err: Exception) -> bool:
    """Network trouble and server errors are worth another try; a refused token or a bad id is not."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(err, (OSError, TimeoutError, ConnectionError)) or "Timeout" in type(err).__name__ \
        or "Connect" in type(err).__name__


def _describe_error(err: Exception) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    hint = " (not logged in? set HF_TOKEN or run `hf auth login`)" if status in (401, 403) else ""
    return _TOKEN.sub("hf_***", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]) + hint


def publish(folder: str | Path, repo_id: str, private: bool = True, retries: int = 5, backoff: float = 2.0,
            commit_message: str = "Upload pipeline with ldm", api=None,
            sleep: Optional[Callable[[float], None]] = None, log: Callable[[str], None] = print) -> PublishResult:
    """create_repo + upload_folder of the allow-listed files, retried; returns what happened, never raises."""
    files, refused = upload_plan(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # token: HF_TOKEN or the saved login, resolved by huggingface_hub
    error, repo = None, None
    staged = stage_upload(folder, files)
    try:
        for attempt in range(1, retries + 1):
            try:
                if repo is None:  # once created, only the upload is retried
                    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model", allow_patterns=files,
                                  commit_message=commit_message)
                log(f"published {len(files)} files to {repo}")
                return PublishResult(True, attempt, files, refused, url=str(repo))
            except Exception as err:  # any failure is reported, never raised into training
                error = _describe_error(err)
                if not _retryable(err) or attempt == retries:
                    break
                delay = backoff * 2 ** (attempt - 1)
                log(f"upload to {repo_id} failed (attempt {attempt}/{retries}: {error}); retrying in {delay:.0f} s")
                (sleep or time.sleep)(delay)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log(f"upload to {repo_id} failed after {attempt} attempt(s): {error}; the local files are intact, "
        f"publish them later with `python scripts/publish.py --model {folder} --repo-id {repo_id}`")
    return PublishResult(False, attempt, files, refused, error=error)


@dataclass
class BackgroundPublisher:
    """One upload at a time in a thread, so checkpoints keep coming while the last one uploads."""

    repo_id: str
    private: bool = True
    retries: int = 5
    log: Callable[[str], None] = print
    results: list[PublishResult] = field(default_factory=list)
    _thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, folder: Path, message: str) -> bool:
        if self.busy:
            self.log(f"hub: the previous upload is still running; skipping '{message}'")
            return False
        self._thread = threading.Thread(target=lambda: self.results.append(publish(
            folder, self.repo_id, self.private, self.retries, commit_message=message, log=self.log)), daemon=True)
        self._thread.start()
        return True

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
