"""ldm: latent-diffusion text-to-image training and generation on Hugging Face Diffusers.

Import what you need from the modules (`ldm.training.loop`, `ldm.inference.generate`, …); this package import itself
loads nothing heavy. `ldm.generate(...)` is the one shortcut.
"""

import logging

__version__ = "0.1.0"


class _NoTorchvisionNotice(logging.Filter):
    """Transformers announces, on every import of Diffusers, that its image processors fall back to their PIL
    versions without torchvision. ldm does not use torchvision on purpose (DESIGN.md: its registry build does
    not import beside our torch) and wants exactly that fallback, so the notice says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


def generate(*args, **kwargs):
    """Generate images from a pipeline folder, Hub id or pipeline object; see `ldm.inference.generate.generate`."""
    from ldm.inference.generate import generate as _generate

    return _generate(*args, **kwargs)
