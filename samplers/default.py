"""The reference VAR sampler: the engine's default plan (one cached transformer forward per scale).

The conditional and unconditional halves share one token history: the unconditional rows are fed the
tokens drawn from the guided distribution, as in the reference. `DefaultSampler(var, vae)` is `Sampler`
with no accelerator.
"""
from __future__ import annotations

from samplers.base import Sampler

DefaultSampler = Sampler
