"""Fill the fingerprinted latent + text-embedding cache for a config (training does this itself when
data.cache is on; run it ahead, e.g. once per machine, or under accelerate launch to split the work).

    python scripts/cache_dataset.py --config configs/quickstart.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/cache_dataset.py --config configs/sd15-512.yaml
"""

from pathlib import Path

from accelerate import PartialState

from ldm.cli import argument_parser, run_script


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.data.audit import open_audited
    from ldm.data.cache import build_cache, cache_fingerprints
    from ldm.data.stream import SampleStream
    from ldm.models.encoders import FrozenEncoders
    from ldm.models.loading import check_components, load_tokenizer
    from ldm.training.setup import plan_buckets
    cfg = load_config(args.config, args.overrides)
    vae_info, _ = check_components(cfg)  # (also points model.* at the pipeline of model.pretrained)
    state = PartialState()
    stream = SampleStream(open_audited(cfg.data, load_tokenizer(cfg.model.text_encoder)), cfg.data, cfg.train.seed)
    stream.size -= min(cfg.data.validation_images, stream.size - 1)  # as training holds them back
    if cfg.data.buckets.enabled:  # latents at each image's bucket size, the plan training will make
        plan_buckets(stream, cfg, vae_info.downsample, cfg.train.batch_size * state.num_processes,
                     Path(cfg.train.output_dir), False, print)
    frozen = FrozenEncoders(cfg.model, state.device)
    encoded = build_cache(stream, cfg.data.cache_dir, lambda: frozen.vae, lambda: frozen.text,
                          *cache_fingerprints(cfg, frozen), state.process_index, state.num_processes,
                          state.wait_for_everyone, show_progress=state.is_main_process)
    if state.is_main_process:
        print(f"cache complete: {len(encoded)} samples in {cfg.data.cache_dir}")


if __name__ == "__main__":
    run_script(main)
