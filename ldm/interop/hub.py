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
import json
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ldm.config.loading import load_config, save_config
from ldm.errors import ConfigError
from ldm.interop.model_card import is_model_file, public_config, public_json, public_metadata

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


def _allowed(path: str, folder: Path) -> bool:
    parts = path.split("/")
    if len(parts) == 1 and path.endswith(".safetensors") and path not in ALLOW_PATTERNS:
        return is_model_file(folder / path)
    return any(len(p := pattern.split("/")) == len(parts) and all(map(fnmatch.fnmatchcase, parts, p))
               for pattern in ALLOW_PATTERNS)


def check_publishable(folder: str | Path) -> Path:
    """A folder ldm can publish: an exported pipeline or LoRA folder (a checkpoint or run folder is refused)."""
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


def stage_upload(folder: Path, files: list[str]) -> Path:
    """What goes up, in a sibling folder: the allow-listed files (hard links, no copy), with local paths
    reduced to folder names in ldm_config.yaml, the component configs' `_name_or_path` and the metadata of
    every safetensors file."""
    folder = Path(folder)
    staged = folder.with_name(f".{folder.name}.upload")
    shutil.rmtree(staged, ignore_errors=True)
    for name in files:
        source, target = folder / name, staged / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "ldm_config.yaml":
            save_config(public_config(load_config(source)), target)
        elif name.endswith("config.json") and "/" in name:
            target.write_text(public_json(source.read_text()))
        elif name.endswith(".safetensors") and _write_public_safetensors(source, target):
            pass
        else:
            try:
                os.link(source, target)
            except OSError:  # another file system: copy
                shutil.copy2(source, target)
    return staged


def _write_public_safetensors(source: Path, target: Path) -> bool:
    """When `source`'s metadata names anything local, write `target` with that metadata made public (the header
    rewritten, the tensor bytes copied as they are); False when there is nothing to change."""
    with source.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        public = public_metadata(meta)
        if public == meta:
            return False
        header["__metadata__"] = public
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data keeps its 8-byte alignment
        with target.open("wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(f, out)
    return True


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
