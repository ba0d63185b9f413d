"""The offline quickstart: stage 1 (VAE) → stage 2 (text-conditional UNet) → probe, on CPU.

    python scripts/quickstart.py                       # configs/quickstart.yaml
    python scripts/quickstart.py train.max_steps=200   # any dotted override

Writes outputs/quickstart/{vae,text2img/pipeline,samples,probe} (the parent of train.output_dir) and prints
the checker's accuracy on every colour × shape × position prompt (216 prompts × 2 seeds = 432 images),
separately for the combinations seen in training and those held out of it (data.shapes.holdout).
"""

import json
import time
from pathlib import Path

from ldm.cli import argument_parser, run_script


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=2, help="probe seeds per prompt")
    args = parser.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.evaluation.probes import format_scores, save_probe, shapes_probe, split_scores
    from ldm.images import save_generations
    from ldm.inference.generate import generate
    from ldm.inference.pipeline import load_pipeline
    from ldm.shapes import parse_holdout
    from ldm.training.autoencoder import train_autoencoder
    from ldm.training.loop import train
    # The quickstart is meant to be run again: each run replaces the previous one's folders (say so).
    cfg = load_config(args.config or "configs/quickstart.yaml",
                      ["train.overwrite_output_dir=true", "autoencoder.overwrite_output_dir=true", *args.overrides])
    start = time.time()
    train_autoencoder(cfg)
    pipe = load_pipeline(str(train(cfg)))
    s = cfg.sample
    samples = generate(pipe, s.prompts, guidance_scale=s.guidance_scale, num_inference_steps=s.num_inference_steps,
                       sampler=s.sampler, seed=s.seed, num_images_per_prompt=4)
    root = Path(cfg.train.output_dir).parent  # outputs/quickstart for the quickstart config
    grid = save_generations(samples, root / "samples", grid_columns=4, overwrite=True)[-1]
    probe = shapes_probe(pipe, seeds=range(args.seeds), sampler=s.sampler,
                         num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale)
    probe_grid = save_probe(probe, root / "probe", {"sampler": s.sampler,
                            "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale})
    split = split_scores(probe, parse_holdout(cfg.data.shapes.holdout))
    print(f"sample grid: {grid}\nprobe grid: {probe_grid}")
    for name, scores in split.items():
        print(format_scores(scores, f"shapes probe, {name.replace('_', '-')} combinations"))
    print(json.dumps({"minutes_total": round((time.time() - start) / 60, 1), **split}))


if __name__ == "__main__":
    run_script(main)
