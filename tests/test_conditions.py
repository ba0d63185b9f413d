"""Beyond text: image-to-image and sketch-to-image (a ControlNet), end to end on tiny components."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from ldm.config.loading import load_config
from ldm.errors import ConfigError
from ldm.inference.modes import ImageToImage, Sketch, Style
from ldm.shapes import ShapeSpec, render

PROMPTS = ["a red circle in the center", "a blue square on the left"]


@pytest.fixture(scope="module")
def text_model(tiny_pipeline) -> Path:
    return tiny_pipeline


@pytest.fixture(scope="module")
def sketch_model(text_model, tmp_path_factory) -> Path:
    """A 3-step ControlNet run on the text model, from the cache, with checkpoints."""
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("sketch_model")
    cfg = load_config(None, _sketch_overrides(text_model, out) + [f"data.cache_dir={out / 'cache'}",
                                                                   "data.validation_images=4"])
    return train(cfg, show_progress=False)


def _sketch_overrides(text_model: Path, out: Path) -> list[str]:
    return [f"model.pretrained={text_model}", "conditioning.type=sketch", "data.dataset=shapes",
            "data.resolution=16", "data.shapes.num_images=32", "data.cache=true", f"train.output_dir={out}",
            "train.batch_size=4", "train.max_steps=3", "train.lr=1e-3", "train.report_to=none",
            "train.validate_every=2", "train.checkpoint_every=1", "train.ema_decay=0.9",
            f"sample.prompts={PROMPTS}", "sample.num_inference_steps=3", "sample.guidance_scale=3.0"]


def test_sketch_is_the_outline_whatever_the_colour():
    from ldm.models.conditions import sketch_image

    counts = []
    for colour in ("yellow", "blue", "red"):
        sketch = np.asarray(sketch_image(render(ShapeSpec(colour, "square", "center"), 32)))[..., 0] > 0
        counts.append(sketch.sum())
        assert not sketch[16, 16] and sketch[:, :8].sum() == 0  # hollow, nothing away from the shape
        assert sketch[10:22, 10].any() and sketch[10, 10:22].any()  # the square's left and top sides
    assert max(counts) - min(counts) <= 0.2 * max(counts)


def test_img2img_matches_plain_diffusers_and_checks_its_arguments(text_model):
    from diffusers import StableDiffusionImg2ImgPipeline

    from ldm.inference.generate import generate
    from ldm.inference.pipeline import make_scheduler

    init = render(ShapeSpec("red", "circle", "center"), 16)
    ours = generate(text_model, PROMPTS, mode=ImageToImage(init, 0.5), num_inference_steps=4, guidance_scale=3.0,
                    seed=5)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(text_model)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    theirs = pipe(PROMPTS, image=[init, init], strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(5 + j) for j in range(2)], output_type="pil").images
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a.image), np.asarray(b))
    assert ours[0].params["strength"] == 0.5
    with pytest.raises(ValueError, match=r"strength 0.0: must be in \(0, 1\]"):
        generate(text_model, PROMPTS, mode=ImageToImage(init, 0.0), num_inference_steps=2)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        generate(text_model, PROMPTS, mode=ImageToImage(init, 0.3), num_inference_steps=2)
    with pytest.raises(ValueError, match="3 init images for 2 prompts"):
        generate(text_model, PROMPTS, mode=ImageToImage([init] * 3), num_inference_steps=2)


def test_sketch_run_exports_a_controlnet_pipeline_that_plain_diffusers_reproduces(sketch_model):
    from diffusers import DiffusionPipeline, StableDiffusionControlNetPipeline

    from ldm.inference.generate import generate
    from ldm.inference.pipeline import make_scheduler
    from ldm.models.conditions import sketch_image

    run = sketch_model.parent
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_000003"
    assert (run / "checkpoints" / "step_000003" / "controlnet.safetensors").is_file()
    assert list((run / "validation").glob("step_*.png"))  # the grid: sketches, then the pictures drawn on them
    losses = [json.loads(line) for line in (run / "validation_loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses] == [2, 3] and all(0 < row["mean"] < 10 for row in losses)
    pipe = DiffusionPipeline.from_pretrained(sketch_model)
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    sketch = sketch_image(render(ShapeSpec("green", "triangle", "top left"), 16))
    ours = generate(sketch_model, PROMPTS, mode=Sketch(sketch, 0.8), num_inference_steps=3,
                    guidance_scale=3.0, seed=1)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    theirs = pipe(PROMPTS, image=[sketch, sketch], controlnet_conditioning_scale=0.8, num_inference_steps=3,
                  guidance_scale=3.0, generator=[torch.Generator().manual_seed(1 + j) for j in range(2)]).images
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a.image), np.asarray(b))
    with pytest.raises(ValueError, match=r"has a ControlNet; give mode=Sketch\(…\) \(--sketch\)"):
        generate(sketch_model, PROMPTS, num_inference_steps=2)
    # The UNet, VAE and text encoder are the text model's, untouched.
    from safetensors.torch import load_file

    text_model = Path(load_config(sketch_model / "ldm_config.yaml").model.pretrained)
    a = load_file(text_model / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(sketch_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sketch_run_resumes_from_its_checkpoint_and_cache(sketch_model, tmp_path):
    """Resuming a sketch run restores the ControlNet; cached and freshly computed sketches agree."""
    from ldm.data.cache import build_cache, cache_fingerprints
    from ldm.data.sources import open_source
    from ldm.data.stream import SampleStream
    from ldm.models.conditions import sketch_from_pixels
    from ldm.models.encoders import FrozenEncoders
    from ldm.training.loop import train

    run = sketch_model.parent
    cfg = load_config(run / "config.yaml", ["train.max_steps=4", "train.resume=latest"])
    train(cfg, show_progress=False)
    assert (run / "checkpoints" / "step_000004" / "controlnet.safetensors").is_file()
    stream = SampleStream(open_source(cfg.data), cfg.data, cfg.train.seed)
    stream.size -= cfg.data.validation_images  # as train() holds them back
    frozen = FrozenEncoders(cfg.model, torch.device("cpu"))
    encoded = build_cache(stream, cfg.data.cache_dir, lambda: frozen.vae, lambda: frozen.text,
                          *cache_fingerprints(cfg, frozen), show_progress=False, sketch_threshold=0.1)
    assert frozen.loaded == {"vae": False, "text_encoder": False}  # complete: nothing encoded again
    items = [stream[p] for p in range(6)]
    cached = encoded.sketches([i["index"] for i in items], [i["position"] for i in items])
    fresh = sketch_from_pixels(torch.stack([i["pixel_values"] for i in items]), 0.1)
    assert torch.equal(cached, fresh)


def test_sketch_needs_a_trained_text_model():
    with pytest.raises(ConfigError, match="conditioning.type.*model.pretrained"):
        load_config(None, ["conditioning.type=sketch"])


def test_probes_score_img2img_and_sketches(text_model, sketch_model):
    from ldm.evaluation.probes import img2img_probe, sketch_probe, sketch_scores
    from ldm.shapes import all_specs

    specs = all_specs()[::27]  # 8 combinations
    scores, grids = img2img_probe(text_model, (0.3, 0.9), specs=specs, num_inference_steps=4, change="all")
    assert set(scores) == {"0.3", "0.9"} and all(v["n"] == 8 for v in scores.values())
    assert all(0.0 <= x <= 1.0 for v in scores.values() for k, x in v.items() if k != "n")
    assert [label for label, _ in grids] == ["input", 0.3, 0.9] and all(len(images) == 8 for _, images in grids)
    specs_, targets, readings, grids = sketch_probe(sketch_model, specs=specs, num_inference_steps=2)
    assert all(t.colour != s.colour and (t.shape, t.position) == (s.shape, s.position) for s, t in zip(specs_, targets))
    result = sketch_scores(specs_, targets, readings, held_out=specs[:2])
    assert result["seen"]["n"] == 6 and result["held_out"]["n"] == 2
    assert np.asarray(grids[0][1][0]).max() == 255  # the sketch: white lines on black


@pytest.mark.slow
def test_generate_script_takes_an_init_image_and_a_sketch(text_model, sketch_model, tmp_path):
    from ldm.evaluation.probes import saved_holdout
    from ldm.models.conditions import sketch_image

    picture = render(ShapeSpec("red", "circle", "center"), 16)
    picture.save(tmp_path / "input.png")
    sketch_image(picture).save(tmp_path / "sketch.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    for model, flags in ((text_model, ["--init-image", str(tmp_path / "input.png"), "--strength", "0.5"]),
                         (sketch_model, ["--sketch", str(tmp_path / "sketch.png"), "--conditioning-scale", "1.5"])):
        out = tmp_path / model.parent.name
        proc = subprocess.run([sys.executable, "scripts/generate.py", "--model", str(model), "--prompt", "a red shape",
                               "--steps", "4", "--out", str(out), *flags], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "0000_seed0.png").is_file()
    assert saved_holdout(sketch_model) == []  # read as plain YAML, whether or not the base model is still there


@pytest.fixture(scope="module")
def style_model(tiny, tmp_path_factory) -> Path:
    """A text model on styled shapes (white / grey / dark backgrounds), then a 3-step style adapter on it."""
    from ldm.training.loop import train

    root = tmp_path_factory.mktemp("style")
    styled = ["data.shapes.styles=[white, grey, dark]"]
    base = train(load_config(None, tiny_overrides(tiny, root / "base") + styled), show_progress=False)
    cfg = load_config(None, [f"model.pretrained={base}", "conditioning.type=style",
                             "conditioning.style.encoder_width=16",
                             "conditioning.style.encoder_layers=1", "data.dataset=shapes", "data.resolution=16",
                             "data.shapes.num_images=32", f"train.output_dir={root / 'adapter'}", "train.batch_size=4",
                             "train.max_steps=3", "train.lr=1e-3", "train.report_to=none", "train.validate_every=2",
                             "train.checkpoint_every=2", "train.ema_decay=0.9", f"sample.prompts={PROMPTS}",
                             "sample.num_inference_steps=3", "sample.guidance_scale=3.0", "data.validation_images=4",
                             *styled])
    return train(cfg, show_progress=False)


def test_style_run_exports_an_ip_adapter_that_plain_diffusers_reproduces(style_model):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from ldm.inference.generate import generate
    from ldm.inference.pipeline import make_scheduler

    run = style_model.parent
    assert (run / "checkpoints" / "step_000003" / "style_adapter.safetensors").is_file()
    losses = [json.loads(line) for line in (run / "validation_loss.jsonl").read_text().splitlines()]
    assert losses and all(0 < row["mean"] < 10 for row in losses)  # conditioned runs log it too
    assert list((run / "validation").glob("step_*.png"))
    weights = load_file(style_model / "ip_adapter" / "ip_adapter.safetensors")
    assert "image_proj.proj.weight" in weights and "ip_adapter.1.to_k_ip.weight" in weights
    base = Path(load_config(style_model / "ldm_config.yaml").model.pretrained)
    a = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(style_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the text model, untouched
    reference = render(ShapeSpec("green", "cross", "top left"), 16, style="dark")
    ours = generate(style_model, PROMPTS[:1], mode=Style(reference, 0.8), num_inference_steps=3,
                    guidance_scale=3.0, seed=2)[0].image
    pipe = StableDiffusionPipeline.from_pretrained(style_model)
    pipe.load_ip_adapter(str(style_model), subfolder="ip_adapter", weight_name="ip_adapter.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    theirs = pipe(PROMPTS[:1], ip_adapter_image=reference, num_inference_steps=3, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(2)]).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    # Different references in one call must not mix (Diffusers repeats one embedding over a call's batch).
    other = render(ShapeSpec("blue", "circle", "right"), 16, style="white")
    both = generate(style_model, PROMPTS, mode=Style([reference, other]), num_inference_steps=3, guidance_scale=3.0,
                    seed=2)
    alone = [generate(style_model, [PROMPTS[j]], mode=Style(ref), num_inference_steps=3, guidance_scale=3.0,
                      seed=2 + j)[0] for j, ref in enumerate([reference, other])]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(both, alone))
    plain = generate(style_model, PROMPTS[:1], num_inference_steps=3, guidance_scale=3.0, seed=2)[0].image
    assert plain.size == (16, 16)  # without a reference it draws from the text alone


def test_style_references_share_the_style_not_the_content():
    from ldm.shapes import ShapesDataset, read_image

    data = ShapesDataset(30, 32, styles=["white", "grey", "dark"])
    for i in range(30):
        image, reference = read_image(data[i]["image"]), read_image(data.reference(i))
        assert image.style == reference.style == data.style(i)
        assert reference.shape != data.spec(i).shape
    assert {data.style(i) for i in range(30)} == {"white", "grey", "dark"}


def test_style_probe_and_generate_script(style_model, tmp_path):
    from ldm.evaluation.probes import style_probe
    from ldm.shapes import all_specs

    scores, grids = style_probe(style_model, specs=all_specs()[::27], num_inference_steps=2)
    assert scores["n"] == 8 and all(0.0 <= v <= 1.0 for k, v in scores.items() if k != "n")
    assert [label for label, _ in grids] == ["reference", "generated"]
    render(ShapeSpec("red", "square", "left"), 16, style="grey").save(tmp_path / "reference.png")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "scripts/generate.py", "--model", str(style_model), "--prompt", PROMPTS[0],
                           "--style", str(tmp_path / "reference.png"), "--style-scale", "0.5", "--steps", "3",
                           "--out", str(tmp_path / "out")], cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from ldm.images import read_png_params

    assert read_png_params(tmp_path / "out" / "0000_seed0.png")["style_scale"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["sketch", "style"])
def test_conditions_train_on_two_processes(condition, text_model, style_model, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): the ControlNet / the adapter end identical on both ranks."""
    from conftest import write_config

    base = text_model if condition == "sketch" else load_config(style_model / "ldm_config.yaml").model.pretrained
    overrides = _sketch_overrides(Path(base), tmp_path / "run")
    overrides = [o for o in overrides if not o.startswith(("conditioning.type", "train.validate_every"))] + [
        f"conditioning.type={condition}", "train.validate_every=0", "conditioning.style.encoder_width=16",
        "conditioning.style.encoder_layers=1", f"data.cache_dir={tmp_path / 'cache'}"]
    if condition == "style":
        overrides.append("data.shapes.styles=[white, grey, dark]")
    config = write_config(tmp_path / "run.yaml", overrides)
    from helpers import train_on_two_processes

    train_on_two_processes(config)
    name = "controlnet" if condition == "sketch" else "style_adapter"
    assert (tmp_path / "run" / "checkpoints" / "step_000003" / f"{name}.safetensors").is_file()
    # and the run resumes from its checkpoint on one process, at the same global batch (2 × 4 = 1 × 8)
    from ldm.training.loop import train

    train(load_config(config, ["train.max_steps=4", "train.resume=latest", "train.batch_size=8"]), show_progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / f"{name}.safetensors").is_file()
