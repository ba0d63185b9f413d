"""Score image-to-image and sketch-to-image on the shapes world with the analytic checker.

    python scripts/evaluate_conditions.py --model outputs/quickstart/text2img/pipeline \
        --sketch-model outputs/quickstart/sketch/pipeline
Image-to-image: every colour × shape × position picture, prompted for another colour, at each
--strengths; scores whether shape and position stay and whether the colour follows the prompt.
Sketch: sketches of pictures rendered from an unused seed, prompts naming only another colour.
Style: full captions, each with a reference in one of the styles showing another shape.
Writes conditions.json and a grid per probe.
"""

import argparse
import json
from pathlib import Path

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a text-to-image pipeline (for image-to-image)")
    p.add_argument("--strengths", default="0.3,0.8")
    p.add_argument("--sketch-model", help="a ControlNet pipeline trained with conditioning.type=sketch")
    p.add_argument("--conditioning-scale", type=float, default=1.0)
    p.add_argument("--style-model", help="a pipeline trained with conditioning.type=style")
    p.add_argument("--style-scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20), p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--out", default="outputs/eval_conditions")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.evaluation.probes import img2img_probe, saved_holdout, sketch_probe, sketch_scores, style_probe
    from ldm.images import make_grid, save_png
    out, report = Path(a.out), {}
    out.mkdir(parents=True, exist_ok=True)
    if a.model:
        for change in ("colour", "all"):  # the prompt changes the colour only, or colour, shape and position
            scores, grids = img2img_probe(a.model, [float(s) for s in a.strengths.split(",")], change=change,
                                          num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
            report[f"img2img_change_{change}"] = scores
            save_png(make_grid([im for _, images in grids for im in images[:24]], cols=24),
                     out / f"img2img_change_{change}.png")
    if a.sketch_model:
        held = saved_holdout(a.sketch_model)
        specs, targets, readings, grids = sketch_probe(a.sketch_model, conditioning_scale=a.conditioning_scale,
                                                       num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
        report["sketch"] = sketch_scores(specs, targets, readings, held)
        save_png(make_grid([im for _, images in grids for im in images[:24]], cols=24), out / "sketch.png")
    if a.style_model:
        report["style"], grids = style_probe(a.style_model, style_scale=a.style_scale, num_inference_steps=a.steps,
                                             guidance_scale=a.guidance_scale)
        save_png(make_grid([im for _, images in grids for im in images[:24]], cols=24), out / "style.png")
    (out / "conditions.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)
