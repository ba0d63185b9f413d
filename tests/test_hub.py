"""Publishing: the model card, the allow-list, retries, failures that never reach the training loop,
offline errors for uncached Hub ids, and fine-tuning an exported pipeline.

The Hub client is huggingface_hub's real `HfApi`; only its two network calls (`create_repo`,
`upload_folder`) are replaced, and the uploaded files are resolved with huggingface_hub's own filter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from conftest import tiny_overrides
from ldm.config.loading import load_config
from ldm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = {
    "README.md", "ldm_config.yaml", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
}
PLANTED = ["optimizer.safetensors.tmp", "unet/diffusion_pytorch_model.bin", "checkpoints/step_000002/state.json",
           "checkpoints/step_000002/optimizer.safetensors", "scheduler/state.pt", "notes/secret.txt", "rng_state.pth"]
# What the checkpoint code writes, copied next to the pipeline's files: real safetensors, refused by content.
TRAINING_STATE = ["optimizer.safetensors", "ema.safetensors", "rng_rank0.safetensors", "lora.safetensors",
                  "unet.safetensors"]


class FakeHub:
    """Stands in for the network behind HfApi: records calls, fails the first `failures` uploads."""

    def __init__(self, failures: int = 0, error: Exception | None = None):
        self.failures, self.error = failures, error
        self.uploads: list[dict] = []
        self.created: list[dict] = []

    def install(self, monkeypatch) -> None:
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.created.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, **kwargs):
            if hub.failures:
                hub.failures -= 1
                raise hub.error or ConnectionError("connection reset by peer")
            files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            uploaded = set(filter_repo_objects(files, allow_patterns=allow_patterns))
            hub.uploads.append({"repo_id": repo_id, "files": uploaded,
                                **kwargs})
            return f"https://huggingface.co/{repo_id}/commit/abc"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr("ldm.interop.hub.time.sleep", lambda s: hub.__dict__.setdefault("sleeps", []).append(s))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("hub_run")
    cfg = load_config(None, tiny_overrides(tiny, out) + ["train.validate_every=1", "hub.license=apache-2.0",
                                                         "hub.tags=['shapes']"])
    return train(cfg, show_progress=False)


def _with_planted(folder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    for name in PLANTED:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(b"training state, never to be uploaded")
    from safetensors.torch import save_file

    for name in TRAINING_STATE:
        save_file({"exp_avg": torch.zeros(2)}, str(copy / name))
    return copy


def test_card_metadata_and_content(exported):
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and {"ldm", "text-to-image", "shapes"} <= set(card.data.tags)
    assert 'DiffusionPipeline.from_pretrained("pipeline")' in card.text
    assert "| UNet | `UNet2DConditionModel`" in card.text and "![step_000002](images/step_000002.png)" in card.text
    unet_params = sum(v.numel() for v in load_file(exported / "unet" / "diffusion_pytorch_model.safetensors").values())
    assert f"{unet_params:,}" in card.text
    assert (exported / "images" / "step_000002.png").is_file()


def test_publish_uploads_exactly_the_allow_list_after_retries(exported, tmp_path, monkeypatch):
    from ldm.interop.hub import publish
    from ldm.interop.model_card import write_model_card

    folder = _with_planted(exported, tmp_path)
    cfg = load_config(folder / "ldm_config.yaml", ["hub.repo_id=me/shapes"])
    write_model_card(folder, cfg, evaluation={"seen": {"all": 0.989, "n": 352}, "held_out": {"all": 0.95}})
    hub = FakeHub(failures=2)
    hub.install(monkeypatch)
    result = publish(folder, "me/shapes", retries=4, log=lambda m: None)
    assert result.ok and result.attempts == 3 and hub.sleeps == [2.0, 4.0]
    assert hub.created == [{"repo_id": "me/shapes", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["files"] == PIPELINE_FILES | {"images/step_000002.png"}
    assert set(result.refused) == set(PLANTED) | set(TRAINING_STATE)
    card = ModelCard.load(folder / "README.md")
    assert "| held out | all | 95.0 % |" in card.text and card.data.library_name == "diffusers"


def test_failing_upload_never_raises_and_hides_the_token(exported, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import HfHubHTTPError

    from ldm.interop.hub import publish

    token = "hf_" + "T0kenThatMustNotLeak" * 2
    monkeypatch.setenv("HF_TOKEN", token)
    hub = FakeHub(failures=99, error=ConnectionError(f"proxy said no to Bearer {token}"))
    hub.install(monkeypatch)
    result = publish(exported, "me/shapes", retries=3)
    assert not result.ok and result.attempts == 3 and hub.uploads == []
    # A refused token is not retried, and the message says what to do.
    response = SimpleNamespace(status_code=401, headers={}, request=None)
    hub.failures, hub.error = 99, HfHubHTTPError("401 Unauthorized", response=response)
    result = publish(exported, "me/shapes", retries=3)
    assert result.attempts == 1 and "HF_TOKEN" in result.error
    out = capsys.readouterr().out
    assert "failed after 3 attempt(s)" in out and token not in out and "hf_***" in out


def test_training_with_an_unreachable_hub_finishes_and_keeps_its_files(tiny, tmp_path, monkeypatch, capsys):
    from ldm.training.loop import train

    hub = FakeHub(failures=10**6)
    hub.install(monkeypatch)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [
        "train.max_steps=3", "train.checkpoint_every=1", "hub.repo_id=me/shapes", "hub.push_checkpoints=true",
        "hub.retries=2"])
    folder = train(cfg, show_progress=False)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert out.count("failed after 2 attempt(s)") >= 2  # at least one checkpoint push and the final publish
    assert hub.uploads == []


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_lists_the_files_writes_nothing_and_makes_no_network_call(exported, tmp_path):
    folder = _with_planted(exported, tmp_path)
    (folder / "README.md").unlink()  # the card the real run would write is only announced
    before = _snapshot(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/publish.py", "--model", str(folder), "--repo-id", "me/shapes",
                           "--single-file", "fp16", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == PIPELINE_FILES | {"images/step_000002.png", "shapes-fp16.safetensors"}
    assert "checkpoints/step_000002/optimizer.safetensors" in proc.stdout.split("never uploaded")[1]
    assert "single file shapes-fp16.safetensors would be exported first" in proc.stdout
    assert _snapshot(folder) == before and not (folder / "README.md").exists()  # nothing written, nothing touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no staging folder left beside it


def test_uncached_hub_ids_fail_with_one_offline_message(monkeypatch, tmp_path):
    from ldm.inference.pipeline import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(ConfigError, match=r"'nobody/not-cached-model'.*HF_HUB_OFFLINE=1"):
        load_pipeline("nobody/not-cached-model")
    from ldm.models.loading import resolve_pretrained

    cfg = load_config(None, ["model.pretrained=nobody/not-cached-model"])  # pure: reads no model folder
    with pytest.raises(ConfigError, match=r"model.pretrained.*'nobody/not-cached-model'.*HF_HUB_OFFLINE=1"):
        resolve_pretrained(cfg)


def test_fine_tuning_an_exported_pipeline_from_its_folder(exported, tmp_path):
    from ldm.training.loop import train

    cfg = load_config(None, [f"model.pretrained={exported}", "data.dataset=shapes", "data.resolution=16",
                             "data.shapes.num_images=32", f"train.output_dir={tmp_path / 'ft'}", "train.batch_size=4",
                             "train.max_steps=2", "train.lr=1e-4", "train.ema_decay=null", "train.report_to=none",
                             "train.validate_every=0", "sample.num_inference_steps=2"])
    assert cfg.model.unet.path is None  # load_config reads no model folder; resolving is the caller's step
    from ldm.models.loading import resolve_pretrained

    resolve_pretrained(cfg)
    assert cfg.model.unet.block_out_channels == [16, 32] and cfg.model.unet.path == str(exported)
    assert cfg.model.text_encoder.subfolder == "text_encoder" and cfg.model.vae.subfolder == "vae"
    assert cfg.model.text_encoder.max_length == 12  # the exported tokenizer's padding length
    folder = train(cfg, show_progress=False)
    before = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    change = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < change < 1e-3  # two Adam steps of 1e-4 from the exported weights, not a fresh UNet
    assert torch.equal(load_file(exported / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"],
                       load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"])


def _local_strings(folder: Path, markers: tuple[str, ...]) -> dict[str, list[str]]:
    """Every file under `folder` that mentions one of `markers` (local paths): in its text, or in a safetensors
    file's metadata."""
    from safetensors import safe_open

    found: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                texts = [f"{k}={v}" for k, v in (f.metadata() or {}).items()]
        elif path.suffix in (".json", ".yaml", ".md", ".txt"):
            texts = [path.read_text(errors="replace")]
        else:
            continue
        hits = [t[:120] for t in texts if any(m in t for m in markers)]
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


def test_nothing_local_leaves_in_any_uploaded_file_metadata_included(exported, tmp_path):
    """The kohya LoRA named its base pipeline's local path in `ss_sd_model_name`, and a single file carries its
    components' configs with their `_name_or_path`: staging for upload keeps every tensor and drops the paths."""
    import shutil

    from safetensors.torch import save_file

    from ldm.inference.pipeline import load_pipeline
    from ldm.interop.hub import stage_upload, upload_plan
    from ldm.interop.single_file import export_single_file

    folder = tmp_path / "pipeline"
    shutil.copytree(exported, folder)
    base = tmp_path / "my-private-base"
    base.mkdir()
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4)},
              str(folder / "lora_kohya.safetensors"),
              metadata={"ss_sd_model_name": str(base), "ss_network_dim": "2", "modelspec.title": "lora_kohya",
                        "modelspec.architecture": "stable-diffusion-v1/lora"})
    export_single_file(load_pipeline(folder), folder / "model.safetensors")
    markers = (str(tmp_path), str(exported.parent))
    planted = _local_strings(folder, markers)
    assert "lora_kohya.safetensors" in planted  # negative control: the check sees a local path where one is
    files, refused = upload_plan(folder)
    assert {"lora_kohya.safetensors", "model.safetensors"} <= set(files) and not refused
    staged = stage_upload(folder, files)
    assert _local_strings(staged, markers) == {}
    for name in ("lora_kohya.safetensors", "model.safetensors"):
        before, after = load_file(str(folder / name)), load_file(str(staged / name))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    from safetensors import safe_open

    with safe_open(str(staged / "lora_kohya.safetensors"), "pt") as f:
        assert f.metadata()["ss_sd_model_name"] == "<local>/my-private-base"
