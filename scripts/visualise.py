"""Pictures of the process for a trained pipeline: forward strip, reverse strip, guidance grid.

    python scripts/visualise.py --model outputs/quickstart/text2img/pipeline \
        --prompt "a red circle in the top left corner" --out outputs/visualise
The forward strip starts from --image, or from a shapes picture of the prompt's first shape.
"""

import argparse
from pathlib import Path

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="a red circle in the top left corner")
    p.add_argument("--image", help="start of the forward strip (default: a rendered shape)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/visualise")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from PIL import Image

    from ldm.evaluation.visualisation import forward_strip, guidance_grid, reverse_strip
    from ldm.inference.pipeline import load_pipeline
    from ldm.shapes import ShapeSpec, render
    pipe, out = load_pipeline(a.model), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = Image.open(a.image) if a.image else render(ShapeSpec("red", "circle", "top left"), 64)
    forward_strip(pipe, start, seed=a.seed).save(out / "forward.png")
    reverse_strip(pipe, a.prompt, seed=a.seed).save(out / "reverse.png")
    guidance_grid(pipe, a.prompt, seed=a.seed).save(out / "guidance.png")
    print(f"wrote {out / 'forward.png'}, {out / 'reverse.png'}, {out / 'guidance.png'}")


if __name__ == "__main__":
    run_script(main)
