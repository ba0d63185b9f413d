"""Training and inference throughput for a config: on-the-fly encoding vs the cache, in one run.

    python scripts/benchmark.py --config configs/quickstart.yaml --imagefolder 512 --image-size 64
writes outputs/benchmark/report.json and prints a table. --imagefolder N trains from N shapes PNGs of
--image-size px (default: the training resolution) written to outputs/benchmark/imagefolder; a
missing VAE folder is replaced by the untrained stage-1 architecture (same cost). --stand-ins replaces the
SD recipe's Hub components (SD VAE, CLIP text encoders) by random weights of the same architecture, for
machines that cannot download them:
    python scripts/benchmark.py --config configs/sd15-512.yaml --stand-ins data.dataset=shapes
--sharding-memory N runs the same training under DDP and FSDP (train.sharding), each as a fresh
`accelerate launch` of N processes, and reports peak memory per process (docs/results/long-runs.md):
    python scripts/benchmark.py --config configs/quickstart.yaml --sharding-memory 2 <overrides>
--teacher and --student time sampling only: the teacher (DPM-Solver++ 20 steps, guidance sample.guidance_scale
of the config) against its distilled student (lcm, 4 steps, no unconditional pass), back to back:
    python scripts/benchmark.py --config configs/quickstart.yaml --teacher outputs/quickstart/text2img/pipeline \
        --student outputs/quickstart/lcm/pipeline
--generation times plain Diffusers (StableDiffusionPipeline, fp32, called directly) against ldm.generate(fast=True)
on the same model, sampler, steps, guidance, batch and seeds, back to back, and with --probe-seeds N scores both on
the shapes probe (generation.json; docs/results/speed.md):
    python scripts/benchmark.py --config configs/quickstart.yaml --generation outputs/quickstart/text2img/pipeline \
        --probe-seeds 2
--peer-example runs Diffusers' own training example (examples/text_to_image/train_text_to_image.py of a Diffusers
checkout; it needs torchvision) and ldm on the same fine-tune of a tiny Stable-Diffusion-layout pipeline, as
fresh processes, alternated, and writes peer.json and peer.md (docs/results/speed.md):
    python scripts/benchmark.py --peer-example ../diffusers/examples/text_to_image/train_text_to_image.py
"""

import argparse
import json
import shutil
from pathlib import Path

from ldm.cli import argument_parser, run_script


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--imagefolder", type=int, default=0, help="write N shapes PNGs and train from them")
    p.add_argument("--image-size", type=int, default=0, help="side of those PNGs (default: data.resolution)")
    p.add_argument("--windows", type=int, default=5), p.add_argument("--window-steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3), p.add_argument("--out", default="outputs/benchmark")
    p.add_argument("--stand-ins", action="store_true", help="random-weight SD VAE / CLIP of the real architecture")
    p.add_argument("--cached-only", action="store_true", help="skip the on-the-fly baseline and inference")
    p.add_argument("--teacher", help="a pipeline folder: time its sampling against --student")
    p.add_argument("--student", help="a distilled pipeline of --teacher")
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--sharding-memory", type=int, default=0, metavar="N",
                   help="peak memory per process of DDP against FSDP, N processes each")
    p.add_argument("--peer-example", help="Diffusers' train_text_to_image.py: time it against ldm")
    p.add_argument("--peer-pipeline", help="the pipeline both fine-tune (default: a tiny SD layout, built in --out)")
    p.add_argument("--peer-lengths", type=int, nargs=2, default=[20, 80], metavar=("SHORT", "LONG"))
    p.add_argument("--peer-repeats", type=int, default=2)
    p.add_argument("--generation", help="a pipeline folder: plain Diffusers against ldm.generate(fast=True)")
    p.add_argument("--generation-batch", type=int, default=64)
    p.add_argument("--generation-repeats", type=int, default=3)
    p.add_argument("--probe-seeds", type=int, default=0, help="with --generation: shapes-probe seeds for both")
    p.add_argument("--generation-precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="with --generation: the fast path's precision (auto: bf16 only where the hardware has it)")
    p.add_argument("--no-compile", action="store_true", help="with --generation: the fast path without compiling")
    p.add_argument("--memory-run", help=argparse.SUPPRESS)  # one process of --sharding-memory
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.errors import ConfigError
    from ldm.evaluation.benchmark import format_report, memory_run, run_benchmark
    from ldm.evaluation.generation_speed import format_few_step, format_generation, time_few_step, time_generation
    from ldm.evaluation.memory import format_sharding_memory, sharding_memory
    from ldm.evaluation.peer import format_peer, run_peer
    from ldm.evaluation.stand_ins import save_stand_ins
    from ldm.shapes import write_imagefolder
    from ldm.training.autoencoder import save_untrained_autoencoder
    out = Path(a.out)
    if a.peer_example:
        report = run_peer(Path(a.peer_example), out / "peer", Path(a.peer_pipeline) if a.peer_pipeline else None,
                          lengths=tuple(a.peer_lengths), repeats=a.peer_repeats)
        print(format_peer(report))
        return
    if a.sharding_memory:
        out.mkdir(parents=True, exist_ok=True)
        overrides = [*a.overrides, f"data.cache_dir={out / 'cache'}"]
        cfg = load_config(a.config, overrides)
        if not Path(cfg.model.vae.path).exists():
            vae = save_untrained_autoencoder(cfg, out / "vae")
            print(f"{cfg.model.vae.path} not found: using the untrained stage-1 architecture ({vae})")
            overrides.append(f"model.vae.path={vae}")
        report = sharding_memory(Path(__file__), a.config, overrides, out, a.sharding_memory, a.warmup, a.windows,
                                 a.window_steps)
        (out / "sharding_memory.json").write_text(json.dumps(report, indent=1))
        print(format_sharding_memory(report))
        return
    if a.memory_run:
        memory_run(load_config(a.config, a.overrides), Path(a.memory_run), a.warmup, a.windows, a.window_steps)
        return
    if a.generation:
        cfg = load_config(a.config, a.overrides)
        s = cfg.sample
        report = time_generation(a.generation, s.prompts, sampler=s.sampler, steps=s.num_inference_steps,
                                 guidance=s.guidance_scale, batch=a.generation_batch, probe_seeds=a.probe_seeds,
                                 precision=a.generation_precision, compile=not a.no_compile,
                                 repeats=a.generation_repeats)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generation.json").write_text(json.dumps(report, indent=1))
        print(format_generation(report))
        return
    if a.teacher or a.student:
        if not (a.teacher and a.student):
            raise ConfigError("--teacher and --student go together (a pipeline and its distilled student)")
        cfg = load_config(a.config, a.overrides)
        s = cfg.sample
        report = time_few_step(a.teacher, a.student, s.prompts, teacher_run=("dpm++", 20, s.guidance_scale),
                               student_run=("lcm", a.student_steps, 1.0))
        out.mkdir(parents=True, exist_ok=True)
        (out / "few_step.json").write_text(json.dumps(report, indent=1))
        print(format_few_step(report))
        return
    shutil.rmtree(out / "cache", ignore_errors=True)  # the cache build is part of what is measured
    overrides = list(a.overrides) + [f"data.cache_dir={out / 'cache'}", "data.cache=false"]
    cfg = load_config(a.config, overrides)
    if a.stand_ins:
        overrides += save_stand_ins(cfg, out / "stand_ins")
        cfg = load_config(a.config, overrides)
    if a.imagefolder:
        folder = out / "imagefolder"
        shutil.rmtree(folder, ignore_errors=True)
        write_imagefolder(folder, a.imagefolder, a.image_size or cfg.data.resolution)
        cfg = load_config(a.config, overrides + [f"data.dataset={folder}"])
    if not Path(cfg.model.vae.path).exists():
        vae = save_untrained_autoencoder(cfg, out / "vae")
        print(f"{cfg.model.vae.path} not found: using the untrained stage-1 architecture ({vae})")
        cfg = load_config(a.config, overrides + ([f"data.dataset={cfg.data.dataset}"]) + [f"model.vae.path={vae}"])
    report = run_benchmark(cfg, a.warmup, a.windows, a.window_steps, cached_only=a.cached_only)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))


if __name__ == "__main__":
    run_script(main)
