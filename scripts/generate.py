"""Generate images from an exported pipeline (a folder or a Hub id).

    python scripts/generate.py --model outputs/quickstart/text2img/pipeline \
        --prompt "a red circle in the top left corner" --num-images 4 --sampler dpm++ --steps 20
"""

import argparse
from typing import get_args

from ldm.cli import image_argument, run_script, text_argument
from ldm.config.schema import SampleConfig, Sampler

SAMPLE = SampleConfig()  # generate()'s defaults: the config's sample section


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--guidance-scale", type=float, default=SAMPLE.guidance_scale,
                   help="1 disables guidance (no unconditional pass)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="for zero-terminal-SNR models, e.g. 0.7")
    p.add_argument("--steps", type=int, default=SAMPLE.num_inference_steps, help="num_inference_steps")
    p.add_argument("--sampler", default=SAMPLE.sampler, choices=list(get_args(Sampler)))
    p.add_argument("--seed", type=int, default=SAMPLE.seed, help="image j is seeded seed + j")
    p.add_argument("--height", type=int), p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int, default=SAMPLE.num_images_per_prompt, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=SAMPLE.batch_size)
    p.add_argument("--device", default="cpu")
    p.add_argument("--init-image", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=0.6, help="image-to-image: 0 keeps the input, 1 ignores it")
    p.add_argument("--sketch", help="a sketch for a ControlNet pipeline (white lines on black)")
    p.add_argument("--conditioning-scale", type=float, default=1.0, help="how strongly the sketch steers")
    p.add_argument("--style", help="a reference picture for a style-adapter pipeline")
    p.add_argument("--style-scale", type=float, default=1.0, help="how strongly the reference's style steers")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file or exported lora/ folder (Diffusers or kohya format), scale 1 by default; "
                        "repeatable")
    p.add_argument("--fast", action="store_true",
                   help="channels-last, bf16 where the hardware has it, the UNet compiled with frozen weights: "
                        "faster per image once compiled, for long jobs (not with --lora)")
    p.add_argument("--out", default="outputs/samples")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.images import check_unused, save_generations
    from ldm.inference.generate import generate
    from ldm.inference.modes import mode_of
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [line.strip() for line in text_argument(a.prompts_file, "--prompts-file").splitlines()
                    if line.strip()]
    if not prompts:
        p.error("give at least one --prompt or a --prompts-file")
    if not a.overwrite:  # before the model loads: a used folder is refused at once
        check_unused(a.out)
    results = generate(a.model, prompts, negative_prompt=a.negative_prompt, guidance_scale=a.guidance_scale,
                       num_inference_steps=a.steps, sampler=a.sampler, seed=a.seed, height=a.height,
                       width=a.width, num_images_per_prompt=a.num_images, batch_size=a.batch_size, device=a.device,
                       guidance_rescale=a.guidance_rescale, loras=a.lora, fast=a.fast,
                       mode=mode_of(image_argument(a.init_image, "--init-image"), a.strength,
                                    image_argument(a.sketch, "--sketch"), a.conditioning_scale,
                                    image_argument(a.style, "--style"), a.style_scale))
    paths = save_generations(results, a.out, overwrite=a.overwrite)
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")


if __name__ == "__main__":
    run_script(main)
