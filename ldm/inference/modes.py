"""What `generate` draws from beyond the prompt, one small typed object per mode:

    ImageToImage(image, strength)        start from a picture (SDEdit, Meng et al. 2022)
    Sketch(image, conditioning_scale)    draw on a sketch through the pipeline's ControlNet
    Style(reference, scale)              draw in a reference picture's style through the image-prompt adapter

Each mode checks its own numbers (before any model loads) and that the pipeline takes it, prepares its
pictures for the prompts, makes the pipeline call of a batch and names the parameters a PNG records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from diffusers import StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline
from PIL import Image, ImageOps

from ldm.data.decode import BadSample, to_rgb
from ldm.errors import ConfigError

Images = Union[Image.Image, Sequence[Image.Image]]  # one picture for every prompt, or one per prompt


def as_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """A picture given to `generate` prepared as training prepares one: EXIF rotation applied, transparency on
    white, 16-bit and float pixels on their own scale."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (unreadable EXIF: keep the pixels as stored)
        pass
    try:
        return to_rgb(image, what)
    except BadSample as bad:
        raise ConfigError(f"{what}: {bad}") from bad


def per_prompt(images: Images, prompts: Sequence[str], what: str, width: Optional[int] = None,
               height: Optional[int] = None) -> list[Image.Image]:
    """One image per prompt (one given for all is repeated), RGB, resized to width × height if given."""
    images = [images] * len(prompts) if isinstance(images, Image.Image) else list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} {what} for {len(prompts)} prompts: give one, or one per prompt")
    images = [as_rgb(im, what) for im in images]
    return [im.resize((width, height), Image.BICUBIC) for im in images] if width and height else images


def _scale(value, name: str, flag: str) -> None:
    """A scale of a mode: a finite number ≥ 0 (the message names the argument and scripts/generate.py's flag)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} (--{flag}) {value!r}: must be ≥ 0")


def takes_sketch(pipe) -> bool:
    return isinstance(pipe, StableDiffusionControlNetPipeline)


def takes_style(pipe) -> bool:
    return getattr(pipe, "image_encoder", None) is not None


class Text:
    """The prompt alone: the mode of `generate(mode=None)`."""

    def check(self, num_inference_steps: int) -> None:
        pass

    def check_pipeline(self, pipe) -> None:
        if takes_sketch(pipe):
            raise ConfigError("a sketch goes with a ControlNet pipeline and only with one: this pipeline has a "
                              "ControlNet; give mode=Sketch(…) (--sketch)")

    def prepare(self, pipe, prompts: Sequence[str], width: int, height: int) -> None:
        pass

    def references(self) -> list:
        """The style reference of each prompt (none here)."""
        return []

    def calls_per_prompt(self) -> bool:
        """Whether each prompt needs pipeline calls of its own (a style reference per prompt)."""
        return False

    def call(self, pipe, rows: list[int], common: dict, height: int, width: int, guidance_rescale: float) -> list:
        return pipe(guidance_rescale=guidance_rescale, height=height, width=width, **common).images

    def recorded(self) -> dict:
        return {}


@dataclass
class ImageToImage(Text):
    """Start from `image`: its latents are noised to `strength` × T and denoised with the prompt, through
    Diffusers' `StableDiffusionImg2ImgPipeline` on the same components. Low strength keeps the layout, high
    strength follows the prompt; only ⌊strength × num_inference_steps⌋ steps run."""

    image: Images
    strength: float = 0.6

    def check(self, num_inference_steps: int) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"strength {self.strength}: must be in (0, 1] (0 would return the input unchanged)")
        if int(num_inference_steps * self.strength) < 1:  # Diffusers runs ⌊steps × strength⌋ steps
            raise ConfigError(f"strength {self.strength} × {num_inference_steps} steps leaves no denoising step; "
                              "raise num_inference_steps or strength")

    def check_pipeline(self, pipe) -> None:
        if takes_sketch(pipe):
            raise ConfigError("image-to-image with a sketch is not supported: this pipeline has a ControlNet and "
                              "takes mode=Sketch(…) (--sketch)")

    def prepare(self, pipe, prompts, width, height) -> None:
        self._inits = per_prompt(self.image, prompts, "init images", width, height)
        self._runner = StableDiffusionImg2ImgPipeline(**pipe.components)
        self._runner.set_progress_bar_config(disable=True)

    def call(self, pipe, rows, common, height, width, guidance_rescale):
        return self._runner(image=[self._inits[k] for k in rows], strength=self.strength, **common).images

    def recorded(self) -> dict:
        return {"strength": self.strength}


@dataclass
class Sketch(Text):
    """Draw on `image` (white lines on black, one or one per prompt) through the pipeline's ControlNet (a
    conditioning.type=sketch export); `conditioning_scale` scales its residuals, apart from the text's guidance."""

    image: Images
    conditioning_scale: float = 1.0

    def check(self, num_inference_steps: int) -> None:
        _scale(self.conditioning_scale, "conditioning_scale", "conditioning-scale")

    def check_pipeline(self, pipe) -> None:
        if not takes_sketch(pipe):
            raise ConfigError("a sketch goes with a ControlNet pipeline and only with one: this pipeline has no "
                              "ControlNet")

    def prepare(self, pipe, prompts, width, height) -> None:
        self._sketches = per_prompt(self.image, prompts, "sketches", width, height)

    def call(self, pipe, rows, common, height, width, guidance_rescale):
        return pipe(image=[self._sketches[k] for k in rows], controlnet_conditioning_scale=self.conditioning_scale,
                    height=height, width=width, **common).images

    def recorded(self) -> dict:
        return {"conditioning_scale": self.conditioning_scale}


@dataclass
class Style(Text):
    """Draw in the style of `reference` (one picture, or one per prompt) through the pipeline's image-prompt
    adapter (a conditioning.type=style export) at `scale`."""

    reference: Images
    scale: float = 1.0

    def check(self, num_inference_steps: int) -> None:
        _scale(self.scale, "style_scale", "style-scale")

    def check_pipeline(self, pipe) -> None:
        super().check_pipeline(pipe)
        if not takes_style(pipe):
            raise ConfigError("a style reference needs a pipeline trained with conditioning.type=style (this one has "
                              "no image encoder)")

    def prepare(self, pipe, prompts, width, height) -> None:
        self._references = per_prompt(self.reference, prompts, "style references")

    def references(self) -> list:
        return self._references

    def calls_per_prompt(self) -> bool:
        # Diffusers repeats one set of image embeddings over a call's whole batch.
        return not isinstance(self.reference, Image.Image)

    def recorded(self) -> dict:
        return {"style_scale": self.scale}


Mode = Union[None, ImageToImage, Sketch, Style]


def mode_of(init_image: Optional[Images] = None, strength: float = 0.6, sketch: Optional[Images] = None,
            conditioning_scale: float = 1.0, style: Optional[Images] = None, style_scale: float = 1.0) -> Mode:
    """The mode the command line or the web page asked for: at most one of an init image, a sketch and a style
    reference (their flags named when several are given)."""
    given = [(flag, mode) for flag, image, mode in (
        ("--init-image", init_image, lambda: ImageToImage(init_image, strength)),
        ("--sketch", sketch, lambda: Sketch(sketch, conditioning_scale)),
        ("--style", style, lambda: Style(style, style_scale))) if image is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(flag for flag, _ in given)}: give one of an init image, a sketch and a "
                          "style reference")
    return given[0][1]() if given else None
