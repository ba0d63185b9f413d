"""Wrapping a module's forward, one way for every use: a measurement that restores it when it is done, or the
fast path that keeps its wrapper."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def wrap_forward(module: torch.nn.Module, wrapper: Callable[[Callable], Callable]) -> Callable:
    """Replace `module.forward` by `wrapper(forward)`; returns the forward it replaced."""
    inner = module.forward
    module.forward = wrapper(inner)
    return inner


@contextmanager
def wrapped_forward(module: torch.nn.Module, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    """`module.forward` is `wrapper(forward)` inside the block and the original again after it, whatever
    happens inside."""
    inner = wrap_forward(module, wrapper)
    try:
        yield
    finally:
        module.forward = inner
