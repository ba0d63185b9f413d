"""Fuzz: thousands of damaged images in a dozen formats through the decoder every path uses (the audit, the
cache build, validation, generation inputs). The only exception allowed out is BadSample ("this sample is
bad"), and a run whose files are damaged after the audit still finishes."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from ldm.config.loading import load_config

FORMATS = {"PNG": {}, "JPEG": {}, "GIF": {}, "BMP": {}, "TIFF": {"compression": "tiff_lzw"}, "WEBP": {},
           "DDS": {}, "TGA": {}, "ICO": {}, "PPM": {}, "PCX": {}, "JPEG2000": {}}
MUTATIONS_PER_FORMAT = 300


def _originals() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    out = {}
    for fmt, kwargs in FORMATS.items():
        buf = io.BytesIO()
        if fmt == "GIF":  # animated: two frames
            picture.save(buf, fmt, save_all=True, append_images=[picture.rotate(90)])
        else:
            (picture.convert("RGBA") if fmt == "DDS" else picture).save(buf, fmt, **kwargs)
        out[fmt] = buf.getvalue()
    return out


def mutate(data: bytes, r: random.Random) -> bytes:
    """Flipped bytes, a cut, an insertion or a deletion: what disks, downloads and editors do to files."""
    b = bytearray(data)
    op = r.random()
    if op < 0.4:
        for _ in range(r.randint(1, 8)):
            b[r.randrange(len(b))] = r.randrange(256)
    elif op < 0.7:
        b = b[: r.randrange(1, len(b))]
    elif op < 0.85:
        i = r.randrange(len(b))
        b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 64)))
    else:
        i = r.randrange(len(b))
        del b[i:min(len(b), i + r.randint(1, 64))]
    return bytes(b)


def test_thousands_of_damaged_images_in_a_dozen_formats_raise_only_bad_sample():
    from ldm.data.decode import BadSample, decode_image, to_rgb

    originals = _originals()
    assert len(originals) >= 8
    for fmt, data in originals.items():  # the undamaged originals decode (ICO keeps a 32 px icon size)
        assert to_rgb(decode_image(data, fmt), fmt).size == ((32, 27) if fmt == "ICO" else (48, 40))
    r = random.Random(0)
    outcomes = {"bad": 0, "decoded": 0}
    for fmt, data in originals.items():
        for trial in range(MUTATIONS_PER_FORMAT):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = to_rgb(decode_image(mutate(data, r), f"{fmt}#{trial}"), f"{fmt}#{trial}")
                assert image.mode == "RGB"
                outcomes["decoded"] += 1
            except BadSample:
                outcomes["bad"] += 1
    assert sum(outcomes.values()) == len(originals) * MUTATIONS_PER_FORMAT >= 3000
    assert outcomes["bad"] > 1000 and outcomes["decoded"] > 300  # both kinds really happen


@pytest.mark.parametrize("cache", [False, True])
def test_a_run_whose_files_are_damaged_after_the_audit_finishes(tiny, tmp_path, monkeypatch, cache, capsys):
    """60 pictures in 12 formats pass the audit; then a third of them (training and held-back validation
    images alike) are replaced by damaged bytes. The cache build, the training stream and the validation
    loss all skip them, and the run exports its pipeline."""
    import json

    import ldm.training.loop
    import ldm.training.setup
    from ldm.data.audit import open_audited

    originals = _originals()
    folder = tmp_path / "data"
    folder.mkdir()
    rows, names = [], []
    for i in range(60):
        fmt = list(originals)[i % len(originals)]
        name = f"{i:03d}.{fmt.lower()}"
        (folder / name).write_bytes(originals[fmt])
        rows.append({"file_name": name, "text": f"picture {i % 7}"})
        names.append((name, fmt))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = random.Random(1)

    def audit_then_damage(*args, **kwargs):
        source = open_audited(*args, **kwargs)
        assert len(source) == 60
        for name, fmt in names[::3]:
            data = originals[fmt]
            while True:  # a mutation the decoder refuses (some still decode: those are not damage)
                damaged = mutate(data, r)
                try:
                    from ldm.data.decode import BadSample, decode_image, to_rgb

                    to_rgb(decode_image(damaged, name), name)
                except BadSample:
                    break
            (folder / name).write_bytes(damaged)
        return source

    monkeypatch.setattr(ldm.training.setup, "open_audited", audit_then_damage)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [
        f"data.dataset={folder}", f"data.cache={str(cache).lower()}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_images=6", "train.max_steps=4", "train.batch_size=8"])
    exported = ldm.training.loop.train(cfg, show_progress=False)
    assert (exported / "model_index.json").is_file()
    out = capsys.readouterr().out
    assert "validation: skipping held-back sample" in out and "held-back images" in out
    later = json.loads((tmp_path / "run" / "data_audit.json").read_text())["went_bad_after_audit"]
    assert all(name.endswith(tuple(n for n, _ in names[::3])) for name in later)  # only damaged files
    assert {name for name in later if later[name]["where"] == "validation"}  # 54..59 held back: two damaged
    if cache:
        damaged = [n for n, _ in names[::3] if int(n[:3]) < 54]
        assert out.count("went bad after the audit") == len(damaged)
        assert sorted(n.rsplit("/", 1)[-1] for n in later if later[n]["where"] == "cache build") == damaged
