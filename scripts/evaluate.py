"""Score a trained shapes pipeline: samplers × steps and guidance sweeps with the analytic checker.

    python scripts/evaluate.py --model outputs/quickstart/text2img/pipeline \
        --samplers dpm++:5,10,20,50 ddim:10,20,50 ddpm:1000 --guidance 1,2,3,4,6,8,10

Held-out combinations come from the pipeline's own ldm_config.yaml (data.shapes.holdout) and are
scored separately. Also reports the loss with fixed noise and timesteps, per timestep bucket, on
fresh shapes pictures. Writes sweep.json, sweep.md and accuracy_vs_nfe.png / accuracy_vs_guidance.png.
NFE is UNet evaluations per image (a guided step costs two); ms / image is measured in the same run.

A distilled student (configs/quickstart-lcm.yaml) is swept next to its teacher:

    python scripts/evaluate.py --model outputs/quickstart/text2img/pipeline --samplers dpm++:1,2,4,8,20 \
        --sampler-guidance 3 --guidance '' --student outputs/quickstart/lcm/pipeline --student-samplers lcm:1,2,4,8
"""

import argparse
import json
from pathlib import Path

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported pipeline folder trained on shapes")
    p.add_argument("--samplers", nargs="*", default=["dpm++:5,10,20,50"], help="NAME:STEPS,STEPS,…")
    p.add_argument("--sampler-guidance", type=float, default=4.0, help="guidance scale of the sampler sweep")
    p.add_argument("--guidance", default="1,2,3,4,6,8,10", help="scales of the guidance sweep ('' for none)")
    p.add_argument("--guidance-sampler", default="dpm++:20", help="NAME:STEPS used for the guidance sweep")
    p.add_argument("--seeds", type=int, default=1, help="probe seeds (216 prompts each)")
    p.add_argument("--validation-images", type=int, default=432,
                   help="fresh shapes pictures (never trained on) for the loss per timestep bucket")
    p.add_argument("--student", help="a distilled pipeline of --model, swept beside it")
    p.add_argument("--student-samplers", nargs="*", default=["lcm:1,2,4,8"], help="NAME:STEPS,… for --student")
    p.add_argument("--student-guidance", type=float, default=1.0, help="1: guidance folded in, no unconditional pass")
    p.add_argument("--out", default="outputs/eval")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.evaluation.probes import saved_holdout
    from ldm.evaluation.sweeps import plot_sweeps, sweep, sweep_table
    from ldm.inference.pipeline import load_pipeline
    from ldm.models.loading import native_size
    from ldm.shapes import ShapesDataset
    from ldm.training.validation import encode_images, validation_loss
    held = saved_holdout(a.model)
    pipe, seeds = load_pipeline(a.model), range(a.seeds)

    def runs(specs, guidance):
        return [(name, int(n), guidance) for spec in specs for name, steps in [spec.split(":")]
                for n in steps.split(",")]

    label = "teacher" if a.student else None
    sampler_rows = sweep(pipe, runs(a.samplers, a.sampler_guidance), seeds, held, model=label)
    if a.student:  # the student, back to back with its teacher, on the same prompts and seeds
        sampler_rows += sweep(load_pipeline(a.student), runs(a.student_samplers, a.student_guidance), seeds, held,
                              model="student")
    g_name, g_steps = a.guidance_sampler.split(":")
    scales = [float(g) for g in a.guidance.split(",") if g]
    guidance_rows = sweep(pipe, [(g_name, int(g_steps), g) for g in scales], seeds, held, model=label)
    # Validation loss: jittered renders of every combination from a seed training never uses.
    fresh = ShapesDataset(a.validation_images, native_size(pipe), seed=1_000_003)
    items = [fresh[i] for i in range(len(fresh))]
    latents, embeds = encode_images(pipe.vae, pipe.tokenizer, pipe.text_encoder, [i["image"] for i in items],
                                    [i["text"] for i in items], fresh.resolution)
    val = validation_loss(pipe.unet, pipe.scheduler, latents, embeds, pipe.scheduler.config.prediction_type)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"samplers": sampler_rows, "guidance": guidance_rows,
                                               "validation_loss": val}, indent=1))
    table = sweep_table(sampler_rows + guidance_rows)
    (out / "sweep.md").write_text(table + "\n")
    plots = plot_sweeps(sampler_rows, guidance_rows, out)
    print(table)
    print("validation loss per timestep bucket: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, " + ", ".join(map(str, plots)))


if __name__ == "__main__":
    run_script(main)
