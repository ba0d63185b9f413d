"""Shards: an imagefolder written by scripts/make_shards.py (webdataset tars, parquet) reads and trains like
the folder, bad samples inside shards are still counted, and a killed run on shards resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_buckets import write_captioned_folder

from conftest import tiny_overrides
from helpers import ROOT, kill_resume_and_compare, max_diff, script_env
from ldm.config.data import DataConfig
from ldm.config.loading import load_config
from ldm.data.audit import audit
from ldm.data.shards import write_shards
from ldm.data.sources import FolderSource, ShardSource, open_source
from ldm.errors import ConfigError


@pytest.fixture
def folder(write_imagefolder) -> Path:
    """Ten captioned pictures (metadata.jsonl, column 'caption') and one damaged file among them."""
    folder = write_imagefolder(10)
    (folder / "images" / "000003.png").write_bytes((folder / "images" / "000003.png").read_bytes()[:60])  # truncated
    return folder


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_shards_hold_the_folder_in_order(folder, tmp_path, fmt):
    report = write_shards(folder, tmp_path / "shards", samples_per_shard=4, fmt=fmt, caption_column="caption")
    assert report.samples == 10 and len(report.shards) == 3 and not report.skipped
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    assert [p.name for p in report.shards] == [f"shard-{i:06d}{suffix}" for i in range(3)]
    shards = open_source(DataConfig(dataset=str(tmp_path / "shards"), caption_column="caption"))
    plain = FolderSource(folder, "caption")
    assert isinstance(shards, ShardSource) and len(shards) == len(plain) == 10
    for i in range(10):
        assert shards.caption(i) == plain.caption(i)
        assert shards.fingerprint(i) == plain.fingerprint(i)  # the same bytes: a shared latent cache
    # The audit decodes the shards' images as it does the folder's: the damaged one is counted, by name.
    cfg = DataConfig(resolution=16, max_bad_fraction=0.2)
    a, b = audit(shards, cfg), audit(plain, cfg)
    assert a.kept == b.kept and len(a.kept) == 9
    assert a.skipped == b.skipped and sum(a.skipped.values()) == 1
    (kind,) = a.skipped
    assert "000000003" in a.examples[kind][0] and b.examples[kind] == ["images/000003.png"]


def test_webdataset_layout_and_caption_alternatives(tmp_path):
    root = write_captioned_folder(tmp_path / "f", {"a": [(20, 20), (30, 20)]})
    (root / "a" / "01.txt").write_text("one way\nanother way\n")
    (root / "a" / "02.png").write_bytes((root / "a" / "00.png").read_bytes())  # no caption: not written
    report = write_shards(root, tmp_path / "wds", samples_per_shard=10)
    assert report.samples == 2 and list(report.skipped) == ["a/02.png"]
    with tarfile.open(report.shards[0]) as tar:
        assert tar.getnames() == ["000000000.png", "000000000.txt", "000000001.png", "000000001.txt"]
        assert all(m.mtime == 0 for m in tar.getmembers())
    source = open_source(DataConfig(dataset=str(tmp_path / "wds" / "*.tar")))  # a glob, as a URL would be
    assert source.caption(1) == ("one way", "another way")
    assert source.name(0) == "shard-000000.tar:000000000"
    assert json.loads((tmp_path / "wds" / "shards.json").read_text())["skipped"]["a/02.png"]
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(root, tmp_path / "wds")


def test_make_shards_script_and_a_bad_url(folder, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/make_shards.py", "--folder", str(folder), "--out",
                           str(tmp_path / "s"), "--per-shard", "5", "--caption-column", "caption"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 10 samples in 2 webdataset shard(s)" in proc.stdout
    with pytest.raises(ConfigError, match="could not read the webdataset shards"):
        open_source(DataConfig(dataset=str(tmp_path / "nowhere" / "*.tar")))


def test_shards_train_to_the_folders_weights(tiny, write_imagefolder, tmp_path):
    from ldm.training.loop import train

    folder = write_imagefolder(12)
    write_shards(folder, tmp_path / "shards", samples_per_shard=5, caption_column="caption")
    run = tiny_overrides(tiny, tmp_path) + ["data.caption_column=caption", "train.max_steps=3",
                                            "train.checkpoint_every=3"]
    for name, data in (("folder", folder), ("shards", tmp_path / "shards")):
        train(load_config(None, run + [f"data.dataset={data}", f"train.output_dir={tmp_path / name}"]),
              show_progress=False)
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step_000003" / "unet.safetensors"))
            for n in ("folder", "shards"))
    assert max_diff(a, b) == 0.0


@pytest.mark.slow
def test_a_killed_run_on_shards_resumes_exactly(tiny, write_imagefolder, tmp_path):
    folder = write_imagefolder(12)
    write_shards(folder, tmp_path / "shards", samples_per_shard=5, caption_column="caption")
    run = ["data.caption_column=caption", f"data.dataset={tmp_path / 'shards'}", "train.max_steps=6",
           "train.checkpoint_every=2", "train.ema_decay=0.9"]
    kill_resume_and_compare(tmp_path, lambda out: tiny_overrides(tiny, out) + run,
                            ("unet.safetensors", "ema.safetensors"))


# --------------------------------------------------------------------------------------------
# Streaming: each process reads its own shards
# --------------------------------------------------------------------------------------------


def _streaming_run(tiny, shards: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(tiny, out) + [f"data.dataset={shards}", "data.streaming=true", "data.shuffle_buffer=4",
                                        "train.record_samples=true", *extra]


def _sources(out: Path, rank: int) -> list[str]:
    return [s for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines()
            for s in json.loads(line)["sources"]]


def test_streaming_counts_bad_samples_and_replays_by_seed(tiny, folder, tmp_path):
    from ldm.training.loop import train

    write_shards(folder, tmp_path / "shards", samples_per_shard=3, caption_column="caption")  # 4 shards
    for name in ("a", "b"):
        train(load_config(None, _streaming_run(tiny, tmp_path / "shards", tmp_path / name, "train.max_steps=4",
                                               "train.checkpoint_every=4")), show_progress=False)
    seen = _sources(tmp_path / "a", 0)
    assert seen == _sources(tmp_path / "b", 0) and len(seen) == 16  # the order is the seed's
    assert seen[:9] != sorted(seen[:9])  # shuffled (shards and a 4-sample buffer)
    assert "shard-000001.tar:000000003" not in seen  # the truncated picture never trained…
    report = json.loads((tmp_path / "a" / "data_audit.json").read_text())
    assert report["went_bad_after_audit"]["shard-000001.tar:000000003"]["reason"] == "truncated image"  # …counted
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step_000004" / "unet.safetensors")) for n in "ab")
    assert max_diff(a, b) == 0.0


def test_streaming_refuses_what_needs_an_index():
    for key in ("data.cache=true", "data.buckets.enabled=true", "data.validation_images=2"):
        with pytest.raises(ConfigError, match="cannot be combined with data.streaming"):
            load_config(None, ["data.streaming=true", key])


@pytest.mark.slow
def test_streaming_processes_read_disjoint_shards_and_resume_exactly(tiny, folder, tmp_path):
    from conftest import write_config
    from helpers import train_on_two_processes

    write_shards(folder, tmp_path / "shards", samples_per_shard=3, caption_column="caption")  # 4 shards
    two = tmp_path / "two"
    stdout = train_on_two_processes(write_config(tmp_path / "two.yaml", _streaming_run(
        tiny, tmp_path / "shards", two, "train.batch_size=2", "train.max_steps=4", "data.shuffle_buffer=0")))
    assert "2 of 4 shards per process" in stdout
    shards = [{s.split(":")[0] for s in _sources(two, rank)} for rank in (0, 1)]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 4
    # SIGKILL after checkpoint 2, resume: each process replays its stream to where it was.
    (tmp_path / "kill").mkdir()
    kill_resume_and_compare(tmp_path / "kill", lambda out: _streaming_run(
        tiny, tmp_path / "shards", out, "train.max_steps=6", "train.checkpoint_every=2", "train.ema_decay=0.9"),
        ("unet.safetensors", "ema.safetensors"))
