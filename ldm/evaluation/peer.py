"""ldm against the training script a user would otherwise run: Diffusers' `train_text_to_image.py` example.

Both fine-tune the same tiny Stable-Diffusion-layout pipeline (written here with `save_pretrained`) on the same
imagefolder, with the same batch, learning rate, optimizer, clipping and precision. Each run is a whole fresh
process, timed by its wall clock; the kinds of run are alternated so that a drift of the machine touches them all
alike, and the steady-state cost of a step is (wall of the long run − wall of the short run) / (difference in
steps), which cancels start-up, loading, caching and the final save.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ldm.errors import ConfigError
from ldm.evaluation.benchmark import cpu_name
from ldm.evaluation.stand_ins import save_letter_tokenizer
from ldm.inference.fast import native_bf16
from ldm.shapes import write_imagefolder

CLIP_VOCAB_SIZE = 49408


# A display of the example's progress bar: "… 37/80 [00:41<…, step_loss=0.123, lr=0.0001]".
EXAMPLE_STEP_LOSS = re.compile(r"(\d+)/\d+ \[[^\]]*?step_loss=([-+0-9.eE]+)")


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE writes bytes as, in CLIP's order: the bytes that are
    printable Latin-1 stand for themselves, the others are moved past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order, codes = list(printable), list(printable)
    for b in range(256):
        if b not in printable:
            order.append(b)
            codes.append(256 + len(codes) - len(printable))
    return [chr(c) for c in codes]


def clip_bpe_file() -> Path:
    """The CLIP byte-pair merges file that the `open-clip-torch` package ships (found without importing the
    package, which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        raise ConfigError("the real CLIP tokenizer is built from the vocabulary that open-clip-torch ships: "
                          "pip install --no-deps open-clip-torch (its torchvision dependency is not needed)")
    return path


def save_clip_tokenizer(folder: Path, bpe: Optional[Path] = None):
    """CLIP's own 49,408-token tokenizer, built from the merges file and saved as a Transformers folder."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe or clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]  # line 0 is a version header
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_sd_pipeline(folder: Path, resolution: int = 64, seed: int = 0, real_tokenizer: bool = True) -> dict:
    """A Stable-Diffusion-layout pipeline of random weights: AutoencoderKL with f = 4, a 2-layer CLIP text model
    with the real tokenizer (or, `real_tokenizer=False`, a letter-level one where open-clip-torch is absent),
    a 6.6M-parameter (64, 128, 128) UNet with cross-attention below the top level, DDPM with the scaled-linear
    betas. Returns its sizes."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if real_tokenizer:
        tokenizer = save_clip_tokenizer(folder / "tokenizer")
    else:
        tokenizer = save_letter_tokenizer(folder / "tokenizer", 77)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=resolution)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=resolution // 4, in_channels=4, out_channels=4,
                                block_out_channels=(64, 128, 128), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_parameters": count(unet), "vae_parameters": count(vae), "text_parameters": count(text_encoder),
            "vocabulary": len(tokenizer)}


def example_command(example: Path, pipeline: Path, images: Path, out: Path, steps: int, batch: int,
                    lr: float) -> list[str]:
    """Diffusers' example as its README runs it, at this size: fp32, no EMA, no validation, the final save."""
    return [sys.executable, str(example), f"--pretrained_model_name_or_path={pipeline}", f"--train_data_dir={images}",
            "--resolution=64", "--center_crop", f"--train_batch_size={batch}", f"--learning_rate={lr}",
            f"--max_train_steps={steps}", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=0",
            "--mixed_precision=no", "--max_grad_norm=1.0", f"--output_dir={out}", "--checkpointing_steps=1000000",
            "--report_to=tensorboard"]


def ldm_overrides(pipeline: Path, images: Path, out: Path, steps: int, batch: int, lr: float) -> list[str]:
    """The same fine-tune in ldm: full UNet, AdamW (weight decay 1e-2), clipping 1.0, constant lr, no EMA, no
    validation, one checkpoint and the export at the end."""
    return [f"model.pretrained={pipeline}", f"data.dataset={images}", "data.resolution=64", "data.center_crop=true",
            "data.caption_dropout=0.0", f"train.batch_size={batch}", f"train.lr={lr}", f"train.max_steps={steps}",
            "train.lr_scheduler=constant", "train.lr_warmup_steps=0", "train.adam_weight_decay=0.01",
            "train.max_grad_norm=1.0", "train.ema_decay=null", "train.validate_every=0", "train.log_every=10",
            f"train.checkpoint_every={steps}", f"train.output_dir={out}", "train.seed=0",
            "train.overwrite_output_dir=true"]


def _wall(command: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} … failed (exit {done.returncode}); its output: {log}")
    return wall


def _final_loss(kind: str, out: Path, log: Path, window: int = 10) -> Optional[float]:
    """The mean training loss of a run's last `window` steps: ldm's last train_log.jsonl row (its log window is
    `window` steps), or the mean of the example's last `window` per-step losses, read from its progress bar
    (the last display of each step counts)."""
    if kind != "example":
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
        return rows[-1]["loss"] if rows else None
    per_step = {int(k): float(v) for k, v in EXAMPLE_STEP_LOSS.findall(log.read_text(errors="replace"))}
    last = [per_step[k] for k in sorted(per_step)[-window:]]
    return sum(last) / len(last) if last else None


def peer_comparison(example: Path, pipeline: Path, images: Path, out: Path, kinds: dict[str, list[str]],
                    lengths: tuple[int, int] = (20, 80), repeats: int = 2, batch: int = 32, lr: float = 1e-4) -> dict:
    """Time Diffusers' example and each ldm kind (name → extra config overrides) as fresh processes, alternated,
    `repeats` times at both lengths. Returns the steady-state s/step (median over repeats) of each."""
    train = Path(__file__).resolve().parents[2] / "scripts" / "train_text2img.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "1"}
    runs: dict[str, list[dict]] = {"example": [], **{k: [] for k in kinds}}
    out.mkdir(parents=True, exist_ok=True)
    for r in range(repeats):
        for name in runs:
            wall = {}
            for steps in lengths:
                run_out = out / "runs" / f"{name}-{steps}"
                cache = out / "runs" / f"{name}-{steps}-cache"  # each run builds its own: both lengths pay it
                for old in (run_out, cache):
                    shutil.rmtree(old, ignore_errors=True)
                log = out / "logs" / f"{name}-{steps}-{r}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                if name == "example":
                    cmd = example_command(example, pipeline, images, run_out, steps, batch, lr)
                else:
                    cmd = [sys.executable, str(train), *ldm_overrides(pipeline, images, run_out, steps, batch, lr),
                           f"data.cache_dir={cache}", *kinds[name]]
                wall[steps] = _wall(cmd, log, env)
                loss = _final_loss(name, run_out, log)
            short, long = lengths
            runs[name].append({"wall": wall, "s_per_step": (wall[long] - wall[short]) / (long - short),
                               "final_loss": loss})
            print(f"{name} (repeat {r + 1}/{repeats}): {runs[name][-1]['s_per_step']:.3f} s/step "
                  f"(walls {wall[short]:.1f} s, {wall[long]:.1f} s), final loss {loss}", flush=True)
    base = statistics.median(x["s_per_step"] for x in runs["example"])
    table = {name: {"s_per_step": statistics.median(x["s_per_step"] for x in rows),
                    "final_loss": statistics.median(x["final_loss"] for x in rows if x["final_loss"] is not None)
                    if any(x["final_loss"] is not None for x in rows) else None,
                    "runs": rows} for name, rows in runs.items()}
    for row in table.values():
        row["vs_example"] = base / row["s_per_step"]
    return {"table": table, "lengths": list(lengths), "repeats": repeats, "batch": batch, "lr": lr,
            "torch": torch.__version__, "cpu": cpu_name(), "threads": torch.get_num_threads(), "kinds": kinds}


def format_peer(r: dict) -> str:
    short, long = r["lengths"]
    lines = [f"{r['cpu']}, torch {r['torch']}, batch {r['batch']}, steady state = (wall of {long} steps − wall of "
             f"{short}) / {long - short}, median of {r['repeats']} alternated fresh processes", "",
             "| | s/step | vs the example | final loss |", "| --- | --- | --- | --- |"]
    for name, row in r["table"].items():
        label = "Diffusers' example" if name == "example" else f"ldm, {name}"
        loss = "–" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
        lines.append(f"| {label} | {row['s_per_step']:.3f} | {row['vs_example']:.2f}× | {loss} |")
    return "\n".join(lines)


# What each ldm row of the table adds to the shared fine-tune (`ldm_overrides`).
PEER_KINDS = {
    "nothing cached": ["data.cache=false"],
    "data.cache=true": ["data.cache=true"],
}


def peer_kinds() -> dict[str, list[str]]:
    """The rows for this machine: the two above, and where the CPU has bf16 units (AVX-512 BF16 / AMX) the
    fast settings the speed guide recommends there, the cache with bf16 autocast. Without bf16 units the fast
    settings are the cache alone (bf16 is emulated, far slower), so no third row is run."""
    kinds = dict(PEER_KINDS)
    if native_bf16("cpu"):
        kinds["cache + bf16 autocast"] = ["data.cache=true", "train.mixed_precision=bf16"]
    return kinds


def run_peer(example: Path, out: Path, pipeline: Optional[Path] = None, images: int = 512,
             kinds: Optional[dict[str, list[str]]] = None, pipeline_kwargs: Optional[dict] = None, **kwargs) -> dict:
    """The whole comparison: the pipeline (built in `out` unless given) and `images` shapes PNGs of 64 px, then
    `peer_comparison`; writes peer.json and peer.md into `out`."""
    if not example.is_file():
        raise ConfigError(f"--peer-example {example}: no such file; it is examples/text_to_image/"
                          "train_text_to_image.py of a Diffusers checkout")
    out.mkdir(parents=True, exist_ok=True)
    sizes = None
    if pipeline is None:
        pipeline = out / "pipeline"
        if not (pipeline / "model_index.json").is_file():
            sizes = save_tiny_sd_pipeline(pipeline, **(pipeline_kwargs or {}))
    elif not (pipeline / "model_index.json").is_file():
        raise ConfigError(f"--peer-pipeline {pipeline}: not a Diffusers pipeline folder (no model_index.json)")
    folder = out / "images"
    if len(list(folder.glob("*.png"))) != images:
        shutil.rmtree(folder, ignore_errors=True)
        write_imagefolder(folder, images, 64)
    report = peer_comparison(example, pipeline, folder, out, kinds or peer_kinds(), **kwargs)
    report.update(pipeline=str(pipeline), images=images, sizes=sizes)
    (out / "peer.json").write_text(json.dumps(report, indent=1))
    (out / "peer.md").write_text(format_peer(report) + "\n")
    return report
