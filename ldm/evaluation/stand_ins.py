"""Random-weight stand-ins for Hub components of known architecture, so a benchmark runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.config.schema import Config

# Architectures (from each repository's config.json) of the published components the SD recipe names, so a
# benchmark can run with random weights of the same shapes where the real ones cannot be downloaded: the cost
# of a forward pass does not depend on the values of the weights.
STAND_IN_VAES = {
    "stabilityai/sd-vae-ft-mse": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      norm_num_groups=32, scaling_factor=0.18215),
}


STAND_IN_TEXT_ENCODERS = {
    "openai/clip-vit-large-patch14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768),
    "openai/clip-vit-base-patch32": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                         num_attention_heads=8, projection_dim=512),
}


def save_letter_tokenizer(folder: Path, model_max_length: int):
    """A CLIP tokenizer whose vocabulary is single letters (ids 0/1: start/end): a valid byte-pair
    tokenizer without the real 49,408-token vocabulary, for stand-ins and tests. Returns it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in list(letters) + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_stand_ins(cfg: Config, folder: Path) -> list[str]:
    """Random-weight copies of the Hub components in `cfg` that have a known architecture, saved under `folder`;
    returns the config overrides that point at them. The tokenizer is a small letter-level BPE (tokenizing is not
    what a benchmark measures); the text model keeps the real vocabulary size and 77 positions."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    overrides = []
    vae_arch = STAND_IN_VAES.get(cfg.model.vae.path)
    if vae_arch is not None:
        n = len(vae_arch["block_out_channels"])
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      sample_size=cfg.data.resolution, **vae_arch).save_pretrained(folder / "vae")
        overrides += [f"model.vae.path={folder / 'vae'}", "model.vae.subfolder=null"]
    text_arch = STAND_IN_TEXT_ENCODERS.get(cfg.model.text_encoder.path)
    if text_arch is not None:
        out = folder / "text_encoder"
        save_letter_tokenizer(out, 77)
        torch.manual_seed(0)
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_arch)).save_pretrained(out)
        overrides += [f"model.text_encoder.path={out}", "model.text_encoder.subfolder=null"]
    return overrides
