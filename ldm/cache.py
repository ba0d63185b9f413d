"""Frozen encoders run once: latent distributions and prompt embeddings, precomputed.

`encode_stream` encodes every image of a dataset once (centre crop, no flip) and every unique
caption once, keeping the latent *distribution* (mean and std) rather than one sample, so each use
of an image still draws a fresh z = mean + std · ε from q(z|x), as on-the-fly encoding does.
Row 0 of the embedding table is the empty caption used for caption dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ldm.components import encode_prompts, latent_distribution
from ldm.data import SampleStream, prepare_image


@dataclass
class EncodedDataset:
    latent_mean: torch.Tensor  # (N, C, h, w), × scaling_factor
    latent_std: torch.Tensor  # (N, C, h, w), × scaling_factor
    caption_ids: torch.Tensor  # (N,) long, row of prompt_embeds; 0 is the empty caption
    prompt_embeds: torch.Tensor  # (K + 1, L, D)

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def latents(self, indices: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A fresh sample z = mean + std · eps for each index: (B, C, h, w)."""
        return self.latent_mean[indices] + self.latent_std[indices] * eps

    def embeds(self, indices: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """prompt_embeds (B, L, D), the empty caption's where `drop` is set."""
        rows = torch.where(drop, torch.zeros_like(indices), self.caption_ids[indices])
        return self.prompt_embeds[rows]


@torch.no_grad()
def encode_stream(stream: SampleStream, vae, tokenizer, text_encoder, batch_size: int = 64,
                  show_progress: bool = True) -> EncodedDataset:
    scaling = vae.config.scaling_factor
    means, stds, captions = [], [], []
    for start in tqdm(range(0, stream.size, batch_size), desc="encoding images", disable=not show_progress):
        items = [stream.source.get(i) for i in range(start, min(start + batch_size, stream.size))]
        pixel_values = torch.stack([prepare_image(image, stream.cfg) for image, _ in items])
        mean, std = latent_distribution(vae, pixel_values)
        means.append(mean.cpu() * scaling)
        stds.append(std.cpu() * scaling)
        captions += [caption for _, caption in items]
    unique = [""] + sorted(set(captions) - {""})
    row = {c: i for i, c in enumerate(unique)}
    embeds = torch.cat([encode_prompts(tokenizer, text_encoder, unique[i:i + batch_size]).cpu()
                        for i in range(0, len(unique), batch_size)])
    return EncodedDataset(torch.cat(means), torch.cat(stds),
                          torch.tensor([row[c] for c in captions], dtype=torch.long), embeds)
