"""Convert between a Diffusers pipeline folder and one `.safetensors` file in the original SD (LDM) layout.

    python scripts/single_file.py export --model outputs/quickstart/text2img/pipeline --out model.safetensors \\
        --precision fp16
    python scripts/single_file.py import --file model.safetensors --out outputs/imported
The file loads in AUTOMATIC1111 / ComfyUI (CLIP text encoders), in Diffusers' `from_single_file`
(with `--configs` written beside it) and everywhere ldm names a model (`generate.py --model model.safetensors`).
"""

import argparse

from ldm.cli import run_script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="pipeline folder or Hub id -> one file")
    e.add_argument("--model", required=True), e.add_argument("--out", required=True)
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    e.add_argument("--configs", help="also write the configs Diffusers' from_single_file needs to this folder")
    i = sub.add_parser("import", help="one file -> pipeline folder")
    i.add_argument("--file", required=True), i.add_argument("--out", required=True)
    a = p.parse_args()
    # imported after parsing, so that --help answers at once
    from ldm.inference.pipeline import load_pipeline
    from ldm.interop.single_file import export_single_file, load_single_file, write_config_folder
    if a.command == "export":
        path = export_single_file(load_pipeline(a.model), a.out, a.precision)
        if a.configs:
            write_config_folder(a.model, a.configs)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {a.precision})")
    else:
        load_single_file(a.file).save_pretrained(a.out, safe_serialization=True)
        print(f"wrote the pipeline folder {a.out}")


if __name__ == "__main__":
    run_script(main)
