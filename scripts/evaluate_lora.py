"""Score fine-tunes that teach a shapes model a new concept: the new concept's accuracy, and what the rest of
the probe keeps (retention), against the base; with each run's s/step, peak memory and file sizes.

    python scripts/evaluate_lora.py --base outputs/newconcept/text2img/pipeline --concept "purple * *" \\
        --run lora-r8=outputs/newconcept/lora --run lora-r8@0.5=outputs/newconcept/lora:0.5 \\
        --run full=outputs/newconcept/full/pipeline

A run is NAME=PATH[:SCALE]: an exported lora/ folder or LoRA file (applied to the base at SCALE) or a
pipeline folder (a full fine-tune). Writes lora_eval.json and lora_eval.md to --out.
"""

import argparse
import json
from pathlib import Path

from ldm.cli import run_script


def _row(name: str, scores: dict, base_rest: float, summary: dict) -> str:
    new, rest = scores["held_out"], scores["seen"]
    cost = (f"{summary['seconds_per_step']:.3f} | {summary['peak_memory_mib']:.0f} | "
            f"{summary['checkpoint_mib']:.2f} | {summary['export_mib']:.2f} | {summary['parameters']:,}"
            if summary else "– | – | – | – | –")
    pct = {k: f"{100 * v:.1f} %" for k, v in new.items() if k != "n"}
    return (f"| {name} | {pct['colour']} | {pct['shape']} | {pct['position']} | **{pct['all']}** | "
            f"{100 * rest['all']:.1f} % | {100 * (rest['all'] - base_rest):+.1f} | {cost} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base pipeline (never trained on the concept)")
    p.add_argument("--concept", action="append", required=True,
                   help='combinations of the new concept, "colour shape position" with * (repeatable)')
    p.add_argument("--run", action="append", default=[], help="NAME=PATH[:SCALE] (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="probe seeds (216 prompts each)")
    p.add_argument("--steps", type=int, default=20), p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default="outputs/lora_eval")
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.evaluation.probes import shapes_probe, split_scores
    from ldm.inference.pipeline import load_pipeline
    from ldm.interop.lora import parse_lora
    from ldm.shapes import parse_holdout
    concept = parse_holdout(a.concept)
    probe = dict(seeds=range(a.seeds), sampler="dpm++", num_inference_steps=a.steps, guidance_scale=a.guidance)
    results = {"base": {"scores": split_scores(shapes_probe(load_pipeline(a.base), **probe), concept)}}
    for spec in a.run:
        name, _, target = spec.partition("=")
        path, scale = parse_lora(target)
        if (Path(path) / "model_index.json").is_file():  # a full fine-tune: its own pipeline
            pipe = load_pipeline(path)
        else:
            from ldm.interop.lora import load_loras

            pipe = load_pipeline(a.base)
            load_loras(pipe, [(path, scale)])
        # The run's train_summary.json sits in train.output_dir: the path itself or a folder above it.
        found = [d / "train_summary.json" for d in (Path(path), *Path(path).parents)
                 if (d / "train_summary.json").is_file()]
        summary_file = found[0] if found else Path(path) / "train_summary.json"
        results[name] = {"scores": split_scores(shapes_probe(pipe, **probe), concept), "scale": scale,
                         "summary": json.loads(summary_file.read_text()) if summary_file.is_file() else {}}
        print(name, json.dumps(results[name]["scores"]))
    base_rest = results["base"]["scores"]["seen"]["all"]
    lines = ["| run | new: colour | new: shape | new: position | new: all | rest: all | rest vs base (points) | "
             "s/step | peak MiB | checkpoint MiB | export MiB | trained parameters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row(name, r["scores"], base_rest, r.get("summary", {})) for name, r in results.items()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_eval.json").write_text(json.dumps(results, indent=1))
    (out / "lora_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
