"""A web demo for any ldm model (Gradio, the convention of Hugging Face Spaces), built on `ldm.generate`.

    pip install -e '.[app]'
    python scripts/app.py --model outputs/emoji/text2img/pipeline          # http://127.0.0.1:7860
    python scripts/app.py --model outputs/quickstart/text2img/pipeline --port 7861

Pick a model (an exported folder, a Hub id or one .safetensors file), a prompt, sampler, steps, guidance, seed,
size and count; image-to-image, sketch (ControlNet models) and style (style-adapter models) inputs and LoRA files
are under "More inputs". Every image is a PNG carrying its generation parameters, as scripts/generate.py writes
them. A mistake (an empty prompt, a model that does not load, a size the model cannot make) is shown in the
page, and the app keeps serving.

`--write-space FOLDER` copies this app and its requirements into FOLDER (an exported pipeline), so the folder
can be pushed as a Hugging Face Space that serves that model (`app.py` loads the folder it sits in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from ldm.errors import UserError

HERE = Path(__file__).resolve().parent
SPACE_REQUIREMENTS = ["torch", "diffusers", "transformers", "safetensors", "peft", "gradio>=5",
                      "ldm-trainer  # ldm itself: pip install it from its repository if it is not on your index"]


class Models:
    """Loaded pipelines by (model, LoRAs), the two most recent kept: a LoRA stays out of the plain model."""

    def __init__(self, device: str, keep: int = 2):
        self.device, self.keep, self.loaded = device, keep, OrderedDict()

    def get(self, model: str, loras: tuple[str, ...]):
        key = (model, loras)
        if key not in self.loaded:
            from ldm.inference.pipeline import load_pipeline

            self.loaded[key] = load_pipeline(model, self.device)
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key]


def describe(pipe) -> str:
    from ldm.models.loading import native_size

    size = native_size(pipe)
    takes = ["text", "image-to-image"]
    if hasattr(pipe, "controlnet"):
        takes.append("a sketch (ControlNet)")
    if getattr(pipe, "image_encoder", None) is not None:
        takes.append("a style reference")
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    return f"{type(pipe).__name__}, UNet {params:.1f}M parameters, {size} px by default; takes {', '.join(takes)}"


def parse_loras(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip())


def build_app(default_model: str = "", device: str = "cpu", output_dir: str | None = None):
    import gradio as gr

    from ldm.config.schema import SampleConfig
    from ldm.images import save_png
    from ldm.inference.generate import generate
    from ldm.inference.modes import mode_of
    from ldm.inference.pipeline import SAMPLERS

    models = Models(device)
    out_root = Path(output_dir or tempfile.mkdtemp(prefix="ldm-app-"))

    def run(model, prompt, negative_prompt, sampler, steps, guidance, seed, height, width, count, init_image,
            strength, sketch, conditioning_scale, style, style_scale, lora_text, progress=gr.Progress()):
        if not (prompt or "").strip():
            raise gr.Error("Type a prompt first: an empty prompt gives the model nothing to draw.",
                           print_exception=False)
        if not (model or "").strip():
            raise gr.Error("Choose a model: an exported pipeline folder, a Hub id or a .safetensors file.",
                           print_exception=False)
        try:
            loras = parse_loras(lora_text)
            pipe = models.get(model.strip(), loras)
            progress(0, desc="denoising")
            results = generate(pipe, [prompt.strip()], negative_prompt=negative_prompt or None,
                               guidance_scale=float(guidance), num_inference_steps=int(steps), sampler=sampler,
                               seed=int(seed), height=int(height) or None, width=int(width) or None,
                               num_images_per_prompt=int(count), device=device, loras=loras,
                               mode=mode_of(init_image, float(strength), sketch, float(conditioning_scale), style,
                                            float(style_scale)),
                               on_step=lambda f: progress(f, desc="denoising"))
        except (UserError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 (the page says what went wrong; the app keeps serving)
            raise gr.Error(f"generation failed: {type(err).__name__}: {err}") from None
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=out_root))
        paths = [str(save_png(r.image, folder / f"{i:02d}_seed{r.seed}.png", r.params)) for i, r in enumerate(results)]
        gallery = [(p, f"seed {r.seed}") for p, r in zip(paths, results)]
        return gallery, paths, json.dumps([r.params for r in results], indent=1), describe(pipe)

    with gr.Blocks(title="ldm") as app:
        gr.Markdown("# ldm: text to image\nA model trained with ldm. Every image downloads as a PNG that carries "
                    "its prompt, seed and settings.")
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Textbox(default_model, label="Model (folder, Hub id or .safetensors)", elem_id="model")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), value=SampleConfig().sampler, label="Sampler",
                                          elem_id="sampler")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 15.0, value=3.0, step=0.5, label="Guidance", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    count = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="count")
                    height = gr.Number(0, precision=0, label="Height (0: the model's)", elem_id="height")
                    width = gr.Number(0, precision=0, label="Width (0: the model's)", elem_id="width")
                with gr.Accordion("More inputs: image-to-image, sketch, style, LoRA", open=False):
                    with gr.Row():
                        init_image = gr.Image(type="pil", label="Start from this picture (image-to-image)")
                        sketch = gr.Image(type="pil", label="Sketch (ControlNet models)")
                        style = gr.Image(type="pil", label="Style reference (style-adapter models)")
                    with gr.Row():
                        strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Image-to-image strength")
                        conditioning_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Sketch scale")
                        style_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Style scale")
                    loras = gr.Textbox(label="LoRA files (path or path:scale, one per line)", lines=2)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                files = gr.File(label="PNG files (with their parameters)", file_count="multiple", elem_id="files")
                info = gr.Markdown(elem_id="info")
                params = gr.Code(label="Parameters", language="json", elem_id="params")
        button.click(run, [model, prompt, negative, sampler, steps, guidance, seed, height, width, count, init_image,
                           strength, sketch, conditioning_scale, style, style_scale, loras],
                     [gallery, files, params, info], concurrency_limit=1)
    return app


def write_space(folder: str | Path) -> Path:
    """app.py (this file, serving the folder it sits in) and requirements.txt, beside an exported pipeline."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--write-space {folder}: not an exported pipeline folder (no model_index.json)")
    shutil.copyfile(__file__, folder / "app.py")
    (folder / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="the model shown first (folder, Hub id or .safetensors)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; a Space sets its own)")
    p.add_argument("--port", type=int, default=None, help="default 7860")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-dir", help="where generated PNGs are kept (default: a temporary folder)")
    p.add_argument("--write-space", metavar="FOLDER", help="put this app beside an exported pipeline, then exit")
    a = p.parse_args()
    if a.write_space:
        print(f"wrote {write_space(a.write_space) / 'app.py'} and requirements.txt")
        return
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    # In a Space, app.py sits in the model folder: serve that model unless told otherwise.
    model = a.model or (str(HERE) if (HERE / "model_index.json").is_file() else "")
    build_app(model, a.device, a.output_dir).launch(server_name=a.host, server_port=a.port)


if __name__ == "__main__":
    from ldm.cli import run_script

    run_script(main)
