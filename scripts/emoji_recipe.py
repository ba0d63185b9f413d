"""The emoji recipe: prepare the Twemoji imagefolder → stage 1 (VAE) → stage 2 (UNet) → the emoji probe, on CPU.

    python scripts/emoji_recipe.py                       # configs/emoji.yaml
    python scripts/emoji_recipe.py train.max_steps=200   # any dotted override

Writes the data folder (data.dataset) if it is not there, then outputs/emoji/{vae,text2img/pipeline,samples,
probe} (the parent of train.output_dir), and prints the checkers' scores on the real pictures of the probe's
captions (their ceiling) beside their scores on generated ones, seen and held-out captions apart.
"""

import json
import time
from pathlib import Path

from ldm.cli import argument_parser, run_script


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=4, help="probe seeds per caption")
    parser.add_argument("--colour-repeats", type=int, default=8, help="when writing the data folder: rows per "
                        "picture whose name starts with a colour word")
    args = parser.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.data.emoji import DEFAULT_HOLDOUT, write_emoji_folder
    from ldm.evaluation.emoji_probe import emoji_probe, format_emoji_scores, save_emoji_probe
    from ldm.images import save_generations
    from ldm.inference.generate import generate
    from ldm.inference.pipeline import load_pipeline
    from ldm.training.autoencoder import train_autoencoder
    from ldm.training.loop import train
    cfg = load_config(args.config or "configs/emoji.yaml",
                      ["train.overwrite_output_dir=true", "autoencoder.overwrite_output_dir=true", *args.overrides])
    start = time.time()
    data = Path(cfg.data.dataset)
    if not (data / "emoji.json").is_file():
        write_emoji_folder(data, DEFAULT_HOLDOUT, colour_repeats=args.colour_repeats)
    train_autoencoder(cfg)
    pipe = load_pipeline(str(train(cfg)))
    s = cfg.sample
    samples = generate(pipe, s.prompts, guidance_scale=s.guidance_scale, num_inference_steps=s.num_inference_steps,
                       sampler=s.sampler, seed=s.seed, num_images_per_prompt=4)
    root = Path(cfg.train.output_dir).parent
    grid = save_generations(samples, root / "samples", grid_columns=4, overwrite=True)[-1]
    settings = {"sampler": s.sampler, "num_inference_steps": s.num_inference_steps,
                "guidance_scale": s.guidance_scale}
    probe = emoji_probe(pipe, data, seeds=range(args.seeds), **settings)
    paths = save_emoji_probe(probe, root / "probe", settings)
    print(f"sample grid: {grid}\nprobe: {', '.join(map(str, paths))}")
    print(format_emoji_scores(probe))
    print(json.dumps({"minutes_total": round((time.time() - start) / 60, 1),
                      **{k: probe[k] for k in ("real", "generated")}}))


if __name__ == "__main__":
    run_script(main)
