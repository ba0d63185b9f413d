"""Stage 1: train an AutoencoderKL on the configured dataset and save it in Diffusers format.

    python scripts/train_autoencoder.py --config configs/quickstart.yaml [autoencoder.max_steps=500 ...]
"""

from ldm.cli import argument_parser, run_script


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.training.autoencoder import train_autoencoder
    train_autoencoder(load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_script(main)
