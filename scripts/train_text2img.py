"""Stage 2: train the text-conditional UNet and export a Diffusers pipeline.

    accelerate launch scripts/train_text2img.py --config configs/quickstart.yaml [train.lr=2e-4 ...]
    python scripts/train_text2img.py --config configs/sd15-512.yaml --dry-run
"""

import json

from ldm.cli import argument_parser, run_script


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and describe the UNet (no weights, no network)")
    args = parser.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.models.loading import check_components
    from ldm.training.loop import dry_run_report, train
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        report = dry_run_report(cfg, *check_components(cfg))
        print(f"config OK. UNet parameters: {report['unet_parameters']:,} "
              f"({report['unet_parameters'] / 1e6:.1f}M); latents {tuple(report['latent_shape'])}; "
              f"prompt_embeds {tuple(report['prompt_embeds_shape'])}; "
              f"training ≈ {report['train_tflops_per_image']:.2f} TFLOP per image")
        print(json.dumps(report))
        return
    print(f"exported: {train(cfg)}")


if __name__ == "__main__":
    run_script(main)
