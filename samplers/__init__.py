"""Samplers: the default VAR sampler and accelerators behind one `sample(...)` interface, by name."""
from samplers.base import (SampleOutput, Sampler, SamplerStats, available_samplers, build_sampler,
                           check_models_compatible, register_sampler, sampler_class)
from samplers.default import DefaultSampler
from samplers.editing import EditingSampler

__all__ = ["Sampler", "SampleOutput", "SamplerStats", "DefaultSampler", "EditingSampler", "available_samplers", "build_sampler",
           "register_sampler", "check_models_compatible", "sampler_class"]

# Accelerators register themselves on import.
import samplers.code.sampler  # noqa: E402,F401  "code"
import samplers.dd.sampler  # noqa: E402,F401  "dd" (and the "dd" Block-SJD draft source)
import samplers.dd.flow_map  # noqa: E402,F401  "flow"
import samplers.scalekv.sampler  # noqa: E402,F401  "scalekv"
import samplers.sjd.sampler  # noqa: E402,F401  "sjd"
