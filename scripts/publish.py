"""Publish an exported pipeline to the Hugging Face Hub: model card, allow-listed files, retries.

    python scripts/publish.py --model outputs/quickstart/text2img/pipeline --repo-id you/shapes-ldm --dry-run
    python scripts/publish.py --model outputs/quickstart/text2img/pipeline --repo-id you/shapes-ldm \
        --eval outputs/quickstart/probe/probe.json --single-file fp16
The token comes from HF_TOKEN or `hf auth login`; it is never a flag and never printed. Only the
allow-listed files go up (ldm.hub.ALLOW_PATTERNS); --dry-run lists them and makes no network call.
"""

import argparse
import json
import sys
from pathlib import Path

from ldm.cli import run_script
from ldm.config import ConfigError, load_config
from ldm.hub import publish, upload_plan, write_model_card
from ldm.pipeline import load_pipeline
from ldm.single_file import export_single_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported pipeline folder")
    p.add_argument("--repo-id", required=True, help="user-or-org/model-name")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--eval", help="evaluation JSON for the card (scripts/quickstart.py or evaluate.py output)")
    p.add_argument("--single-file", choices=["fp32", "fp16", "bf16"], help="also upload an LDM-layout single file")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="write the card, list the files, upload nothing")
    a = p.parse_args()
    folder = Path(a.model)
    if not ((folder / "model_index.json").is_file() or (folder / "pytorch_lora_weights.safetensors").is_file()):
        raise ConfigError(f"--model {str(folder)!r} is not an exported pipeline folder (model_index.json) nor a LoRA "
                          "folder (pytorch_lora_weights.safetensors): give the pipeline/ or lora/ folder of a run")
    saved = folder / "ldm_config.yaml"
    cfg = load_config(saved if saved.is_file() else None, [f"hub.repo_id={a.repo_id}"])
    if a.single_file:
        export_single_file(load_pipeline(folder), folder / f"{a.repo_id.split('/')[1]}-{a.single_file}.safetensors",
                           a.single_file)
    evaluation = json.loads(Path(a.eval).read_text()) if a.eval else None
    card = write_model_card(folder, cfg, a.repo_id, evaluation)
    if a.dry_run:
        files, refused = upload_plan(folder)
        print(f"would upload {len(files)} files to {a.repo_id} ({'public' if a.public else 'private'}):")
        print("\n".join(f"  {f}" for f in files))
        if refused:
            print(f"never uploaded (not on the allow-list): {', '.join(refused)}")
        print(f"model card: {card}")
        return
    result = publish(folder, a.repo_id, private=not a.public, retries=a.retries)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    run_script(main)
