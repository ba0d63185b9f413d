"""Latent consistency distillation: the math against its formulas and against Diffusers' LCMScheduler, and a
distillation run on tiny real components through the loop (checkpoint, exact resume after SIGKILL, two
processes, export that plain Diffusers samples like ldm.generate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, write_config
from helpers import kill_resume_and_compare, max_diff, train_on_two_processes
from ldm.config.loading import load_config
from ldm.errors import ConfigError

PROMPTS = ["a red circle in the center", "a blue square on the left"]


def _alphas(T: int = 1000) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear").alphas_cumprod


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


def test_solver_grid_is_the_lcm_schedulers_own():
    from diffusers import LCMScheduler

    from ldm.diffusion import solver_timesteps

    t, s = solver_timesteps(torch.arange(1000), 1000, 50)
    grid = sorted(set(t.tolist()))
    assert grid == [(n + 1) * 20 - 1 for n in range(50)]  # t_n = (n + 1)·k − 1, k = 20
    assert torch.equal(s, torch.clamp(t - 20, min=0))
    assert torch.equal(t[:20], torch.full((20,), 19)) and s[0] == 0  # the first cell steps to t = 0
    lcm = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    for steps in (1, 2, 4, 8, 50):
        lcm.set_timesteps(steps)
        assert set(lcm.timesteps.tolist()) <= set(grid)  # sampling only ever meets trained timesteps


def test_boundary_scalings_match_the_formula_and_lcmscheduler():
    from diffusers import LCMScheduler

    from ldm.diffusion import boundary_scalings

    t = torch.tensor([0, 1, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    lcm_skip, lcm_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t)
    assert torch.allclose(c_skip, lcm_skip.float()) and torch.allclose(c_out, lcm_out.float())
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    st = 10.0 * 999
    assert c_skip[-1].item() == pytest.approx(0.25 / (st**2 + 0.25)) and c_out[-1].item() == pytest.approx(
        st / (st**2 + 0.25) ** 0.5)


def test_one_skipped_ddim_step_equals_k_single_steps_of_the_teachers_ode():
    """For a teacher that knows its data exactly (one point x₀*: ε(x, t) = (x − √ᾱ_t x₀*)/√(1−ᾱ_t)) DDIM is
    exact, so the skipping step must land where k single steps land; for Gaussian data (exact ε, curved
    trajectories) the one step stays within the discretisation error of k small steps. And a single step is
    Diffusers' DDIMScheduler.step."""
    from diffusers import DDIMScheduler

    from ldm.diffusion import ddim_step, predicted_original

    a = _alphas()
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(3, 4, 4, 4, generator=g)
    t, k = 519, 20
    x_t = a[t].sqrt() * x0_star + (1 - a[t]).sqrt() * torch.randn(3, 4, 4, 4, generator=g)

    def point_teacher(x, tt):
        return (x - a[tt].sqrt() * x0_star) / (1 - a[tt]).sqrt()

    def gaussian_teacher(x, tt, var=0.25):  # data N(0, var·I): E[ε | x_t] in closed form
        return (1 - a[tt]).sqrt() * x / (a[tt] * var + 1 - a[tt])

    for teacher, tol in ((point_teacher, 1e-5), (gaussian_teacher, 2e-2)):
        x0, eps = predicted_original(teacher(x_t, t), x_t, a[t].expand(3), "epsilon")
        jump = ddim_step(x0, eps, a[t - k].expand(3))
        x = x_t
        for tt in range(t, t - k, -1):
            x0, eps = predicted_original(teacher(x, tt), x, a[tt].expand(3), "epsilon")
            x = ddim_step(x0, eps, a[tt - 1].expand(3))
        assert (jump - x).abs().max() <= tol * x.abs().max(), teacher.__name__
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False)
    ddim.set_timesteps(50)  # steps of 20: t → t − 20
    eps = gaussian_teacher(x_t, t)
    x0, _ = predicted_original(eps, x_t, a[t].expand(3), "epsilon")
    theirs = ddim.step(eps, t, x_t, eta=0.0).prev_sample
    assert torch.allclose(ddim_step(x0, eps, a[t - k].expand(3)), theirs, atol=1e-5)


def test_v_prediction_converts_to_the_same_x0_and_eps():
    from ldm.diffusion import predicted_original

    a = _alphas()[torch.tensor([10, 500, 990])]
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    col = a.view(-1, 1, 1, 1)
    x_t = col.sqrt() * x0 + (1 - col).sqrt() * eps
    v = col.sqrt() * eps - (1 - col).sqrt() * x0
    for pred, kind in ((eps, "epsilon"), (v, "v_prediction")):
        got_x0, got_eps = predicted_original(pred, x_t, a, kind)
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4), kind


def test_consistency_loss_is_the_formula_on_a_real_step(tiny_pipeline, tmp_path):
    """The trainable's loss, recomputed here from the formulas with separate UNet calls: student
    f(x_t, t_n), teacher guided ε̂ → DDIM to t_{n−1} → target f⁻(x_s, t_{n−1}), pseudo-Huber."""
    from ldm.models.building import build_scheduler
    from ldm.training.trainables.distillation import ConsistencyDistillation

    teacher_dir = tiny_pipeline
    cfg = load_config(None, _distill_overrides(teacher_dir, tmp_path / "run", "distill.guidance_scale=2.5"))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    trainable = ConsistencyDistillation(cfg, unet)
    with torch.no_grad():  # a student that has moved away from its teacher (and a target between them)
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
        trainable.after_optimizer_step()
    sched = build_scheduler(cfg.model.scheduler)
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    embeds, uncond = torch.randn(2, 12, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    draws = torch.tensor([7, 933])  # → t_n = 19 (t_{n−1} = 0) and 939 (919)
    loss = trainable.loss(unet, sched, latents, embeds, noise, draws, "epsilon", None, uncond=uncond)

    a = sched.alphas_cumprod
    t, s = torch.tensor([19, 939]), torch.tensor([0, 919])
    at, as_ = a[t].view(-1, 1, 1, 1), a[s].view(-1, 1, 1, 1)

    def f(x, tt, eps, alpha):  # c_skip·x + c_out·x̂₀, σ_d = 0.5, timestep scaling 10
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        st = (10.0 * tt.float()).view(-1, 1, 1, 1)
        return 0.25 / (st**2 + 0.25) * x + st / (st**2 + 0.25).sqrt() * x0

    with torch.no_grad():
        x_t = at.sqrt() * latents + (1 - at).sqrt() * noise
        student = f(x_t, t, unet(x_t, t, embeds).sample, at)
        e_c, e_u = trainable.teacher(x_t, t, embeds).sample, trainable.teacher(x_t, t, uncond).sample
        e = e_u + 2.5 * (e_c - e_u)
        x0 = (x_t - (1 - at).sqrt() * e) / at.sqrt()
        x_s = as_.sqrt() * x0 + (1 - as_).sqrt() * e
        goal = f(x_s, s, trainable.target()(x_s, s, embeds).sample, as_)
        expected = (torch.sqrt((student - goal) ** 2 + 1e-6) - 1e-3).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert trainable.target() is not unet  # an EMA copy (target_decay 0.95), between teacher and student
    own = dict(unet.named_parameters())
    first = next(n for n, p in own.items() if p.requires_grad)
    student_w, teacher_w = own[first], dict(trainable.teacher.named_parameters())[first]
    target_w = dict(trainable.target().named_parameters())[first]
    assert torch.allclose(target_w, 0.95 * teacher_w + 0.05 * student_w, atol=1e-6)


def test_bf16_frozen_forwards_keep_the_loss_and_the_students_fp32_gradients(tiny_pipeline, tmp_path):
    """distill.frozen_precision=bf16 runs the teacher and the target under bf16 autocast: on a fixed batch
    the loss stays within 2 % of fp32 (it does change: the setting is live) and the student's gradients stay
    float32 and point the same way (cosine > 0.97: the target's bf16 rounding is noise on a small residual)."""
    from diffusers import UNet2DConditionModel

    from ldm.models.building import build_scheduler
    from ldm.training.trainables.distillation import ConsistencyDistillation

    teacher_dir = tiny_pipeline
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    embeds, uncond = torch.randn(4, 12, 32, generator=g), torch.randn(4, 12, 32, generator=g)
    draws = torch.tensor([3, 250, 611, 980])
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, _distill_overrides(teacher_dir, tmp_path / precision,
                                                   f"distill.frozen_precision={precision}"))
        unet = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
        trainable = ConsistencyDistillation(cfg, unet)
        with torch.no_grad():
            torch.manual_seed(0)
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        sched = build_scheduler(cfg.model.scheduler)
        loss = trainable.loss(unet, sched, latents, embeds, noise, draws, "epsilon", None, uncond=uncond)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
        results[precision] = (loss, grads)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert l16.dtype == torch.float32 and g16.dtype == torch.float32
    assert l16.item() != l32.item()
    assert l16.item() == pytest.approx(l32.item(), rel=0.02)
    cosine = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    print("loss rel", abs(l16.item() / l32.item() - 1), "grad cosine", cosine)
    assert cosine > 0.97


def test_config_errors_name_the_key(tiny, tmp_path):
    base = tiny_overrides(tiny, tmp_path / "o")
    with pytest.raises(ConfigError, match="distill.enabled.*model.pretrained"):
        load_config(None, base + ["distill.enabled=true"])
    teacher = str(tmp_path)
    for extra, key in ((["distill.guidance_scale=0.5"], "distill.guidance_scale"),
                       (["distill.num_ddim_timesteps=0"], "distill.num_ddim_timesteps"),
                       (["distill.target_decay=1.0"], "distill.target_decay"),
                       (["train.snr_gamma=5.0"], "train.snr_gamma"),
                       (["lora.enabled=true"], "distill.target_decay"),
                       (["conditioning.type=sketch"], "distill.enabled")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, base + ["distill.enabled=true", f"model.pretrained={teacher}", *extra])


# --------------------------------------------------------------------------------------------
# A distillation run through the loop
# --------------------------------------------------------------------------------------------




def _distill_overrides(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={teacher}", "distill.enabled=true", "data.dataset=shapes", "data.resolution=16",
            "data.shapes.num_images=24", "data.caption_dropout=0.0", f"train.output_dir={out}",
            "train.batch_size=4", "train.lr=1e-3", "train.report_to=none", "train.log_every=1",
            "train.validate_every=0", "train.ema_decay=null", "train.checkpoint_every=2", "train.max_steps=2",
            f"sample.prompts={PROMPTS}", "sample.sampler=lcm", "sample.num_inference_steps=2",
            "sample.guidance_scale=1.0", *extra]


@pytest.fixture(scope="module")
def teacher(tiny_pipeline) -> Path:
    return tiny_pipeline


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("lcm_student")
    return train(load_config(None, _distill_overrides(teacher, out)), show_progress=False)


def test_a_two_step_distillation_checkpoints_student_and_target(teacher, student):
    ckpt = load_file(str(student.parent / "checkpoints" / "step_000002" / "student.safetensors"))
    own = {k for k in ckpt if not k.startswith("target.")}
    assert own and {k[len("target."):] for k in ckpt if k.startswith("target.")} == own
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict()
    moved = max((ckpt[k] - base[k]).abs().max().item() for k in own)
    target_moved = max((ckpt["target." + k] - base[k]).abs().max().item() for k in own)
    assert moved > 1e-4 and 0 < target_moved < moved  # the target follows the student, slowly
    assert (student / "scheduler" / "scheduler_config.json").read_text().count("LCMScheduler") == 1
    card = (student / "README.md").read_text()
    assert "## Few-step sampling" in card and "guidance_scale=1" in card and "num_inference_steps=2" in card


def test_plain_diffusers_samples_the_export_as_ldm_generate_with_lcm(student):
    from diffusers import DiffusionPipeline, LCMScheduler

    from ldm.inference.generate import generate

    ours = generate(student, PROMPTS, sampler="lcm", num_inference_steps=2, guidance_scale=1.0, seed=5)
    pipe = DiffusionPipeline.from_pretrained(student)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    pipe.set_progress_bar_config(disable=True)
    calls = []
    inner = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k)
    generators = [torch.Generator().manual_seed(5 + j) for j in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=generators).images
    assert calls == [2, 2]  # two steps, no unconditional half: one UNet evaluation per image and step
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a.image), np.asarray(b))


@pytest.mark.slow
def test_distillation_resumes_exactly_after_sigkill(teacher, tmp_path):
    run = ["train.max_steps=6", "train.gradient_accumulation_steps=2", "train.ema_decay=0.9"]
    kill_resume_and_compare(tmp_path, lambda out: _distill_overrides(teacher, out, *run),
                            ("student.safetensors", "ema.safetensors"))


def test_lcm_lora_trains_only_adapters_and_loads_in_plain_diffusers(teacher, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    from ldm.inference.generate import generate
    from ldm.training.loop import train

    out = tmp_path / "lcm_lora"
    folder = train(load_config(None, _distill_overrides(teacher, out, "lora.enabled=true", "lora.rank=4",
                                                        "distill.target_decay=0", "train.lr=2e-2")),
                   show_progress=False)
    ckpt = load_file(str(out / "checkpoints" / "step_000002" / "lora.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    assert "LCMScheduler.from_config" in (folder / "README.md").read_text()
    ours = generate(teacher, PROMPTS, loras=[folder], sampler="lcm", num_inference_steps=2, guidance_scale=1.0,
                    seed=5)
    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5 + j) for j in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=generators).images
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b)) for a, b in zip(ours, theirs))


@pytest.mark.slow
def test_distillation_on_two_processes_matches_one(teacher, tmp_path):
    from ldm.training.loop import train

    # L2 and adam_epsilon 1e-4: all-reduce sums in another order than one batch (fp32 noise, test_resume says
    # why Adam amplifies it where |g| ≈ ε), and the pseudo-Huber gradient d/√(d² + c²) has curvature 1/c = 1000
    # at d ≈ 0, which amplifies it again (2.6e-6 between batch 8 and 2 × 4 accumulated in one process, 3.4e-5
    # across processes; with L2 1.2e-7 in one process and 1.1e-6 across two, up to 3.0e-6 with the fused AdamW
    # kernel). Two updates at lr 1e-3 move a weight by up to 2e-3: 5e-6 is 400x below what a wrong split shows.
    common = ["train.adam_epsilon=1e-4", "distill.loss=l2"]
    one = tmp_path / "one"
    train(load_config(None, _distill_overrides(teacher, one, "train.batch_size=8", *common)), show_progress=False)
    two = tmp_path / "two"
    train_on_two_processes(write_config(tmp_path / "two.yaml", _distill_overrides(teacher, two, *common)))
    a = load_file(str(one / "checkpoints" / "step_000002" / "student.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_000002" / "student.safetensors"))
    assert max_diff(a, b) <= 5e-6
