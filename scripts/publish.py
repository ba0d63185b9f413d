"""Publish an exported pipeline to the Hugging Face Hub: model card, allow-listed files, retries.

    python scripts/publish.py --model outputs/quickstart/text2img/pipeline --repo-id you/shapes-ldm --dry-run
    python scripts/publish.py --model outputs/quickstart/text2img/pipeline --repo-id you/shapes-ldm \
        --eval outputs/quickstart/probe/probe.json --single-file fp16
The token comes from HF_TOKEN or `hf auth login`; it is never a flag and never printed. Only the
allow-listed files go up (ldm.interop.hub.ALLOW_PATTERNS); --dry-run lists them and makes no network call.
"""

import argparse
import json
import sys

from ldm.cli import run_script, text_argument


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported pipeline folder")
    p.add_argument("--repo-id", required=True, help="user-or-org/model-name")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--eval", help="evaluation JSON for the card (scripts/quickstart.py or evaluate.py output)")
    p.add_argument("--single-file", choices=["fp32", "fp16", "bf16"], help="also upload an LDM-layout single file")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="list what would go up; write and upload nothing")
    p.add_argument("--rewrite-card", action="store_true", help="replace a README.md written or edited by hand")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.config.loading import load_config
    from ldm.inference.pipeline import load_pipeline
    from ldm.interop.hub import check_publishable, publish, upload_plan
    from ldm.interop.model_card import card_is_ldms, write_model_card
    from ldm.interop.single_file import export_single_file
    from ldm.training.trainables import card_facts
    folder = check_publishable(a.model)
    saved = folder / "ldm_config.yaml"
    cfg = load_config(saved if saved.is_file() else None, [f"hub.repo_id={a.repo_id}"])
    evaluation = json.loads(text_argument(a.eval, "--eval")) if a.eval else None
    single = folder / f"{a.repo_id.split('/')[1]}-{a.single_file}.safetensors" if a.single_file else None
    if a.dry_run:  # writes nothing: the card and the single file are described, not made
        files, refused = upload_plan(folder)
        card = folder / "README.md"
        keep = card.is_file() and not a.rewrite_card and not card_is_ldms(card)
        planned = sorted(set(files) | {"README.md"} | ({single.name} if single else set()))
        print(f"would upload {len(planned)} files to {a.repo_id} ({'public' if a.public else 'private'}), local paths "
              "reduced to folder names:")
        print("\n".join(f"  {f}" for f in planned))
        if refused:
            print(f"never uploaded (not on the allow-list): {', '.join(refused)}")
        print(f"model card: {'your README.md, kept as it is' if keep else 'README.md, written by ldm'}"
              + (f"; single file {single.name} would be exported first" if single else ""))
        return
    if single is not None:
        export_single_file(load_pipeline(folder), single, a.single_file)
    write_model_card(folder, cfg, a.repo_id, evaluation, replace_edited=a.rewrite_card, facts=card_facts(cfg))
    result = publish(folder, a.repo_id, private=not a.public, retries=a.retries)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    run_script(main)
