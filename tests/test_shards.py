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
from ldm.config import ConfigError, DataConfig, load_config
from ldm.shards import write_shards
from ldm.sources import FolderSource, ShardSource, audit, open_source
from test_resume import ROOT, _env, _max_diff, kill_resume_and_compare


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
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 10 samples in 2 webdataset shard(s)" in proc.stdout
    with pytest.raises(ConfigError, match="could not read the webdataset shards"):
        open_source(DataConfig(dataset=str(tmp_path / "nowhere" / "*.tar")))


def test_shards_train_to_the_folders_weights(tiny, write_imagefolder, tmp_path):
    from ldm.train import train

    folder = write_imagefolder(12)
    write_shards(folder, tmp_path / "shards", samples_per_shard=5, caption_column="caption")
    run = tiny_overrides(tiny, tmp_path) + ["data.caption_column=caption", "train.max_steps=3",
                                            "train.checkpoint_every=3"]
    for name, data in (("folder", folder), ("shards", tmp_path / "shards")):
        train(load_config(None, run + [f"data.dataset={data}", f"train.output_dir={tmp_path / name}"]),
              show_progress=False)
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step_000003" / "unet.safetensors"))
            for n in ("folder", "shards"))
    assert _max_diff(a, b) == 0.0


@pytest.mark.slow
def test_a_killed_run_on_shards_resumes_exactly(tiny, write_imagefolder, tmp_path):
    folder = write_imagefolder(12)
    write_shards(folder, tmp_path / "shards", samples_per_shard=5, caption_column="caption")
    run = ["data.caption_column=caption", f"data.dataset={tmp_path / 'shards'}", "train.max_steps=6",
           "train.checkpoint_every=2", "train.ema_decay=0.9"]
    kill_resume_and_compare(tmp_path, lambda out: tiny_overrides(tiny, out) + run,
                            ("unet.safetensors", "ema.safetensors"))
