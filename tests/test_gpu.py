"""What only a CUDA GPU can show: bf16 autocast against fp32, and the whole loop on the device.

Skipped without a GPU (CI has none); run on a lent GPU with `python -m pytest -q tests/test_gpu.py`.
They use the tiny VAE and CLIP builders from conftest directly, so they need no optional extra.
"""

from __future__ import annotations

import pytest
import torch

from conftest import _tiny_clip, _tiny_vae, tiny_overrides
from ldm.config.loading import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gpu_components")
    return {"vae": str(_tiny_vae(root / "vae")), "clip": str(_tiny_clip(root / "clip"))}


def test_bf16_autocast_loss_and_gradients_track_fp32(components, tmp_path):
    """One training batch of a small SD-shaped UNet: the bf16 loss within 2 % of fp32 and the gradient's
    direction within cos > 0.99 (bf16 keeps 8 bits of mantissa; the weights and optimizer stay fp32)."""
    from ldm.models.building import build_scheduler, build_unet
    from ldm.models.loading import check_components
    from ldm.training.loop import train_step

    cfg = load_config(None, tiny_overrides(components, tmp_path, "clip") + [
        "model.unet.block_out_channels=[64, 128]", "model.unet.norm_num_groups=32", "data.resolution=32"])
    vae, text = check_components(cfg)
    torch.manual_seed(0)
    unet = build_unet(cfg, vae, text).cuda()
    scheduler = build_scheduler(cfg.model.scheduler)
    g = torch.Generator("cuda").manual_seed(1)
    latents = torch.randn(8, 4, 16, 16, device="cuda", generator=g)
    embeds = torch.randn(8, text.max_length, text.hidden_size, device="cuda", generator=g)
    noise = torch.randn(latents.shape, device="cuda", generator=g)
    timesteps = torch.randint(0, 1000, (8,), device="cuda", generator=g)
    results = []
    for bf16 in (False, True):
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = train_step(unet, scheduler, latents, embeds, noise, timesteps, "epsilon", 5.0)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in unet.parameters() if p.grad is not None])
        results.append((loss.item(), grads))
    (loss32, g32), (loss16, g16) = results
    assert abs(loss16 - loss32) / loss32 < 0.02, (loss32, loss16)
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0).item() > 0.99


def test_bf16_training_on_gpu_caches_checkpoints_exports_and_generates(components, tmp_path):
    """train() on CUDA in bf16 with the cache, channels-last, EMA and a checkpoint; the export loads in plain
    Diffusers on the GPU and gives finite images; the cache-built run never loaded the encoders to train."""
    from diffusers import DiffusionPipeline

    from ldm.training.loop import train

    cfg = load_config(None, tiny_overrides(components, tmp_path / "run", "clip") + [
        "train.mixed_precision=bf16", "train.channels_last=true", "train.ema_decay=0.9", "train.max_steps=6",
        "train.checkpoint_every=3", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=2"])
    folder = train(cfg, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step_000006"
    pipe = DiffusionPipeline.from_pretrained(folder).to("cuda")
    images = pipe(["a red circle in the center"] * 2, num_inference_steps=4, guidance_scale=3.0,
                  generator=torch.Generator("cuda").manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and float(abs(images).max()) <= 1.0
    assert images.std() > 0  # not a blank image
