"""Samplers: one engine (`samplers.engine`) and accelerators stacked on it, behind one `sample(...)`, by name.

`build_sampler("default" | "code" | "scalekv" | "sjd" | "edit" | "flow" | "dd" | "a+b", var=..., vae=..., ...)`.
"""
from samplers.base import (Accelerator, Sampler, available_samplers, build_sampler, register_sampler,
                           sampler_class)
from samplers.default import DefaultSampler
from samplers.editing import EditingSampler
from samplers.stats import SampleOutput, SamplerStats
from training.checkpoint import check_models_compatible

# Accelerators register themselves on import.
import samplers.code.sampler  # noqa: E402,F401  "code"
import samplers.dd.flow_map  # noqa: E402,F401  "flow"
import samplers.dd.sampler  # noqa: E402,F401  "dd" (and the "dd" Block-SJD draft source)
import samplers.scalekv.sampler  # noqa: E402,F401  "scalekv"
import samplers.sjd.sampler  # noqa: E402,F401  "sjd"

__all__ = ["Accelerator", "Sampler", "SampleOutput", "SamplerStats", "DefaultSampler", "EditingSampler",
           "available_samplers", "build_sampler", "register_sampler", "check_models_compatible", "sampler_class"]
