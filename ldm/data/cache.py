"""Frozen encoders run once: latent distributions and prompt embeddings cached on disk, fingerprinted.

Layout under `data.cache_dir`:

    latents-<fp>/shard-r<rank>-<n>.safetensors   mean, std (n, C, h, w) × scaling_factor; keys in metadata
    text-<fp>/shard-r<rank>-<n>.safetensors      prompt_embeds (n, L, D); keys in metadata
    sketch-<fp>/shard-r<rank>-<n>.safetensors    sketch (n, 1, H, W) uint8 edges, for a ControlNet run

The folder fingerprint `<fp>` covers everything that changes the result besides the item itself:
for latents the VAE's weights, dtype and scaling factor, the resolution and the crop; for text the
tokenizer (vocabulary, length) and the encoder's weights. Inside, each latent is keyed by the sha256
of the image's bytes (and the flip variant), each embedding by the caption's sha256. So a changed
image re-encodes that image only, a changed resolution or VAE re-encodes the latents but keeps the
text, a changed text encoder re-encodes the text only, and stale data is never served.

The latent *distribution* is kept (mean and std), so each use of an image still draws a fresh
z = mean + std · ε, as on-the-fly encoding does. Shards are written atomically (temporary name,
rename) every `shard_size` items: an interrupted build resumes where it stopped. On several
processes each rank encodes a disjoint share of what is missing. Training memory-maps the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm.config.schema import Config
from ldm.data.audit import record_after_audit
from ldm.data.decode import BadSample, caption_variants
from ldm.data.stream import SampleStream
from ldm.data.transforms import Size, flip_decision, prepare_image
from ldm.errors import ConfigError
from ldm.models.conditions import sketch_from_pixels
from ldm.models.encoders import FrozenEncoders, encode_prompts, latent_distribution
from ldm.models.loading import resolve_path, tokenizer_subfolder

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a safetensors file as zero-copy views of a memory map (pages load on demand)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {})
    if not header:
        return {}, meta
    buffer = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n)
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > len(buffer):
            raise ValueError(f"tensor {name!r} ends at byte {end} of {len(buffer)} (the file is truncated)")
        arr = buffer[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensor = torch.from_numpy(arr)
        tensors[name] = tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor
    return tensors, meta


class ShardStore:
    """Key → tensors rows, over all shards of one fingerprinted folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards: list[dict[str, torch.Tensor]] = []
        self.rows: dict[str, tuple[int, int]] = {}
        if folder.is_dir():
            for path in sorted(folder.glob("shard-*.safetensors")):
                try:
                    tensors, meta = mmap_safetensors(path)
                    keys = json.loads(meta.get("keys", "[]"))
                    if any(len(t) != len(keys) for t in tensors.values()):
                        raise ValueError(f"{len(keys)} keys for {[len(t) for t in tensors.values()]} rows")
                except Exception as err:  # noqa: BLE001 (struct.error, JSON, offsets: any damage)
                    raise ConfigError(
                        f"data.cache_dir: the cache shard {path} is damaged ({type(err).__name__}: {err}"[:300]
                        + "); delete that file and ldm re-encodes what it held on the next run"
                    ) from err
                for row, key in enumerate(keys):
                    self.rows[key] = (len(self.shards), row)
                self.shards.append(tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, name: str, keys: list[str]) -> torch.Tensor:
        refs = [self.rows[k] for k in keys]
        return torch.stack([self.shards[s][name][r] for s, r in refs])


def _write_shard(folder: Path, rank: int, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob(f"shard-r{rank}-*.safetensors")))
    final = folder / f"shard-r{rank}-{n:06d}.safetensors"
    tmp = final.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"keys": json.dumps(keys)})
    os.replace(tmp, final)


@dataclass
class EncodedDataset:
    """Training view of the cache: per dataset index, the keys of its latents and its caption."""

    latents_store: ShardStore
    text_store: ShardStore
    latent_keys: list[list[str]]  # [index][flip] → key
    caption_keys: dict[str, str]  # caption text (every alternative, and "") → key
    empty_key: str
    flip: bool
    seed: int
    sketch_store: ShardStore | None = None
    # Items whose file went bad after the audit → the next usable item, as the uncached stream replaces them.
    substitutes: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.latent_keys)

    def usable(self, index: int) -> int:
        return self.substitutes.get(index, index)

    def _keys(self, indices: list[int], positions: list[int]) -> list[str]:
        """Each item's key, in the flip variant the stream draws for its position."""
        return [self.latent_keys[i][int(self.flip and flip_decision(self.seed, p))] for i, p in zip(indices, positions)]

    def sketches(self, indices: list[int], positions: list[int]) -> torch.Tensor:
        """(B, 3, H, W) in {0, 1}."""
        assert self.sketch_store is not None, "the cache was built without sketches"
        s = self.sketch_store.get("sketch", self._keys(indices, positions)).float()
        return s.expand(-1, 3, -1, -1).contiguous()

    def latents(self, indices: list[int], positions: list[int], eps: torch.Tensor) -> torch.Tensor:
        """A fresh sample z = mean + std · eps per item (B, C, h, w); the flip variant as drawn on the fly."""
        keys = self._keys(indices, positions)
        return self.latents_store.get("mean", keys) + self.latents_store.get("std", keys) * eps

    def embeds(self, captions: list[str], drop: torch.Tensor) -> torch.Tensor:
        """prompt_embeds (B, L, D) of the captions as used (ldm.data.transforms.caption_for), the empty caption's where
        `drop` is set."""
        keys = [self.empty_key if d else self.caption_keys[c] for c, d in zip(captions, drop.tolist())]
        return self.text_store.get("prompt_embeds", keys)


class _Decoder:
    """Decodes the items a rank encodes; an item whose file went bad after the audit is left out and its key
    remembered in `bad-r<rank>.json` (content-addressed, so it stays true for every later run)."""

    def __init__(self, stream: SampleStream, root: Path, rank: int, sizes: Optional[list[Size]] = None):
        self.stream, self.path, self.sizes = stream, root / f"bad-r{rank}.json", sizes
        self.bad: set[str] = set(json.loads(self.path.read_text())) if self.path.is_file() else set()

    def pixels(self, index: int, key: str, flip: bool) -> Optional[torch.Tensor]:
        try:
            return prepare_image(self.stream.source.get(index)[0], self.stream.cfg, flip=flip,
                                 size=self.sizes[index] if self.sizes else None)
        except BadSample as bad:
            print(f"cache: {bad} (went bad after the audit); the next usable sample takes its place")
            record_after_audit(self.stream.audit_file, bad, "cache build")
            self.bad.add(key)
            return None

    def save(self) -> None:
        if self.bad:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(sorted(self.bad)))


def known_bad(root: Path) -> set[str]:
    """Keys of every item any rank failed to decode (read after the build's barrier)."""
    return {k for path in root.glob("bad-r*.json") for k in json.loads(path.read_text())}


def _encode_missing(decoder: _Decoder, mine: list[tuple[int, int]], latent_keys: list[list[str]], variants: tuple,
                    batch_size: int, shard_size: int, encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                    write: Callable[[list[str], dict[str, torch.Tensor]], None], bar=None) -> None:
    """Decode, encode and write this rank's missing items in shards of `shard_size`; with buckets, one size at a
    time (a shard holds tensors of one shape)."""
    if decoder.sizes:
        by_size: dict[Size, list[tuple[int, int]]] = {}
        for item in mine:
            by_size.setdefault(decoder.sizes[item[0]], []).append(item)
        for size in sorted(by_size):
            _encode_same_size(decoder, by_size[size], latent_keys, variants, batch_size, shard_size, encode, write, bar)
        return
    _encode_same_size(decoder, mine, latent_keys, variants, batch_size, shard_size, encode, write, bar)


def _encode_same_size(decoder: _Decoder, mine: list[tuple[int, int]], latent_keys: list[list[str]], variants: tuple,
                      batch_size: int, shard_size: int, encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                      write: Callable[[list[str], dict[str, torch.Tensor]], None], bar=None) -> None:
    keys: list[str] = []
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(mine), batch_size):
        chunk = [(i, v) for i, v in mine[start:start + batch_size] if latent_keys[i][v] not in decoder.bad]
        decoded = [(latent_keys[i][v], decoder.pixels(i, latent_keys[i][v], variants[v])) for i, v in chunk]
        decoded = [(k, x) for k, x in decoded if x is not None]
        if decoded:
            parts.append(encode(torch.stack([x for _, x in decoded])))
            keys += [k for k, _ in decoded]
        if bar is not None:
            bar.update(len(chunk))
        if keys and (len(keys) >= shard_size or start + batch_size >= len(mine)):
            write(keys, {name: torch.cat([p[name] for p in parts]) for name in parts[0]})
            keys, parts = [], []


def _build_sketches(decoder: _Decoder, folder: Path, latent_keys: list[list[str]], variants: tuple,
                    threshold: float, rank: int, world_size: int, batch_size: int, shard_size: int) -> None:
    """Sketches (edges of the prepared picture, one per flip variant) for this rank's missing items."""
    have = ShardStore(folder)
    mine = [(i, v) for i in range(rank, decoder.stream.size, world_size) for v, _ in enumerate(variants)
            if latent_keys[i][v] not in have]
    _encode_missing(decoder, mine, latent_keys, variants, batch_size, shard_size,
                    lambda x: {"sketch": sketch_from_pixels(x, threshold)[:, :1].to(torch.uint8)},  # {0, 1}
                    lambda keys, tensors: _write_shard(folder, rank, keys, tensors))


def sketch_fingerprint(cfg, threshold: float) -> str:
    return sha256(json.dumps(["sketch-v1", cfg.resolution, cfg.center_crop, threshold]).encode())


def build_cache(stream: SampleStream, cache_dir: str | Path, get_vae: Callable, get_text: Callable,
                vae_fingerprint: str, text_fingerprint: str, rank: int = 0, world_size: int = 1,
                barrier: Callable[[], None] = lambda: None, batch_size: int = 64, shard_size: int = 4096,
                show_progress: bool = True, sketch_threshold: float | None = None) -> EncodedDataset:
    """Encode what the cache lacks (this rank's share), then return the training view.

    `get_vae()` / `get_text()` load the frozen encoders on first call, so nothing is loaded when the
    cache is complete. The fingerprints come from `cache_fingerprints`.
    """
    cfg = stream.cfg
    root = Path(cache_dir)
    latent_dir = root / f"latents-{vae_fingerprint[:16]}"
    text_dir = root / f"text-{text_fingerprint[:16]}"
    variants = (False, True) if cfg.random_flip else (False,)
    image_hash = [_fingerprint_or_none(stream, i) for i in range(stream.size)]
    # With buckets an image is cached at its bucket's size (the key names it, so a changed plan re-encodes
    # exactly the images that moved); without, at data.resolution square, as the folder fingerprint says.
    sizes = [stream.plan.sizes[b] for b in _bucket_of(stream)] if stream.plan is not None else None
    where = [f":{w}x{h}" for w, h in sizes] if sizes else [""] * stream.size
    latent_keys = [[f"{h}{where[i]}:flip={int(f)}" for f in variants] for i, h in enumerate(image_hash)]
    captions = {c for i in range(stream.size) for c in caption_variants(stream.source.caption(i))}
    caption_key = {c: sha256(c.encode()) for c in captions | {""}}
    decoder = _Decoder(stream, root, rank, sizes)
    # 1. Latents this rank must encode. Ownership is fixed (item i belongs to rank i mod W), never a
    #    split of "what is missing", which would differ between ranks that look at different moments.
    have = ShardStore(latent_dir)
    mine = [(i, v) for i in range(rank, stream.size, world_size) for v, _ in enumerate(variants)
            if image_hash[i] is not None and latent_keys[i][v] not in have]
    if mine:
        vae = get_vae()
        bar = tqdm(total=len(mine), desc=f"caching latents (rank {rank})", disable=not show_progress)

        def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            mean, std = latent_distribution(vae, pixels)
            return {"mean": mean.cpu(), "std": std.cpu()}

        _encode_missing(decoder, mine, latent_keys, variants, batch_size, shard_size, encode,
                        lambda keys, tensors: _write_shard(latent_dir, rank, keys, tensors), bar)
        bar.close()
    # 2. Prompt embeddings (one per unique caption, plus the empty caption for dropout).
    have_text = ShardStore(text_dir)
    todo_text = [c for c in sorted(caption_key)[rank::world_size] if caption_key[c] not in have_text]
    if todo_text:
        tokenizer, text_encoder = get_text()
        for start in range(0, len(todo_text), shard_size):
            part = todo_text[start:start + shard_size]
            embeds = torch.cat([encode_prompts(tokenizer, text_encoder, part[j:j + batch_size]).cpu()
                                for j in range(0, len(part), batch_size)])
            _write_shard(text_dir, rank, [caption_key[c] for c in part], {"prompt_embeds": embeds})
    # 3. Sketches for a ControlNet, keyed like the latents (they depend on the prepared picture only).
    sketch_dir = None
    if sketch_threshold is not None:
        sketch_dir = root / f"sketch-{sketch_fingerprint(cfg, sketch_threshold)[:16]}"
        _build_sketches(decoder, sketch_dir, latent_keys, variants, sketch_threshold, rank, world_size,
                        batch_size, shard_size)
    decoder.save()
    barrier()
    bad = known_bad(root)
    unusable = [i for i in range(stream.size) if image_hash[i] is None or any(k in bad for k in latent_keys[i])]
    return EncodedDataset(ShardStore(latent_dir), ShardStore(text_dir), latent_keys,
                          caption_key, caption_key[""], cfg.random_flip, stream.seed,
                          ShardStore(sketch_dir) if sketch_dir is not None else None,
                          substitutes=_substitutes(unusable, stream.size))


def _bucket_of(stream: SampleStream) -> list[int]:
    """Each training index's bucket in the stream's plan."""
    of = [0] * stream.size
    for b, members in enumerate(stream.plan.members):
        for i in members:
            of[i] = b
    return of


def _fingerprint_or_none(stream: SampleStream, index: int) -> Optional[str]:
    try:
        return stream.source.fingerprint(index)
    except BadSample as bad:
        print(f"cache: {bad} (went bad after the audit); the next usable sample takes its place")
        record_after_audit(stream.audit_file, bad, "cache build")
        return None


def _substitutes(unusable: list[int], size: int) -> dict[int, int]:
    """Each unusable index → the next usable one (cyclically), the uncached stream's rule."""
    if len(unusable) == size:
        raise ConfigError("data.dataset: no sample decodes any more (every file went bad after the audit); check "
                          "the disk and the folder")
    bad, out = set(unusable), {}
    for i in unusable:
        j = (i + 1) % size
        while j in bad:
            j = (j + 1) % size
        out[i] = j
    return out


def _files_fingerprint(path: str, subfolders: list[Optional[str]]) -> Optional[str]:
    """sha256 over the files of a local component folder (names and bytes); None for a Hub id."""
    root = Path(resolve_path(path)).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for sub in dict.fromkeys(subfolders):
        folder = root / (sub or "")
        for file in sorted(p for p in folder.glob("*") if p.is_file()):
            h.update(f"{file.relative_to(root)}\0".encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def _module_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_fingerprints(cfg: Config, frozen: FrozenEncoders) -> tuple[str, str]:
    """(latents, text) fingerprints of everything but the items that changes a cached result.

    Local component folders are hashed from their files, so checking a complete cache loads no model;
    a Hub id's weights are hashed from the loaded module.
    """
    m, d = cfg.model, cfg.data
    vae_files = _files_fingerprint(m.vae.path, [m.vae.subfolder]) or _module_fingerprint(frozen.vae)
    vae_fp = hashlib.sha256(json.dumps(
        ["latents-v1", vae_files, m.vae.dtype, d.resolution, d.center_crop]).encode()).hexdigest()
    t = m.text_encoder
    text_files = (_files_fingerprint(t.path, [t.subfolder, tokenizer_subfolder(t)])
                  or _module_fingerprint(frozen.text[1]))
    text_fp = hashlib.sha256(json.dumps(["text-v1", text_files, t.max_length]).encode()).hexdigest()
    return vae_fp, text_fp
