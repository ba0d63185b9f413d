"""ldm: latent-diffusion text-to-image training and generation on Hugging Face Diffusers.

Import what you need from the modules (`ldm.train`, `ldm.pipeline`, …); this package import itself
loads nothing heavy. `ldm.generate(...)` is the one shortcut.
"""

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """Generate images from a pipeline folder, Hub id or pipeline object; see `ldm.pipeline.generate`."""
    from ldm.pipeline import generate as _generate

    return _generate(*args, **kwargs)
