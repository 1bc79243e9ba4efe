"""Samplers: the one engine plus a stack of accelerators, registered by name and composed with '+'.

An accelerator is a small object whose constructor signature is its configuration (as diffusers'
schedulers) and whose `configure(plan, sampler)` sets the plan slots it owns:

  slot          owner examples
  "stages"      code (drafter, then refiner), dd (student / teacher stages)
  "kv"          scalekv (ScaleKV, SnapKV, window), code's own kv_policy option
  "token_rule"  flow (flow-map transport)
  "constraint"  edit (teacher-forced known tokens)
  "speculation" sjd (Block-SJD with any draft source)

`build_sampler("code+scalekv", var=..., vae=..., refiner=..., draft_scales=8, budget_frac=0.25)` stacks
them; an option that two accelerators share must be qualified ("scalekv.calibration=..."). Two
accelerators that own the same slot, or a pairing without a defined meaning, are refused with the reason.
`sample()` is the same for every configuration.
"""
from __future__ import annotations

import inspect
import time
import types
import typing
from typing import Callable, ClassVar

import torch
from torch import nn

from samplers.engine import Engine, Plan, Sampling, VARStage, model_modules
from samplers.logits_processing import (apply_temperature, cfg_strength, check_sampling_args, guide, temperature_at,
                                        top_k_top_p_filter_)
from samplers.rules import CategoricalDraw
from samplers.stats import SampleOutput, SamplerStats
from tokenizers import VQVAE
from training.checkpoint import check_models_compatible
from var import VAR
from var.compile import MODES as COMPILE_MODES

SLOT_ORDER = ("stages", "kv", "token_rule", "constraint", "speculation")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
_REGISTRY: dict[str, type["Accelerator"]] = {}


class Accelerator:
    """Base of every accelerator. Subclasses declare `slots`, take their models and options as keyword
    arguments (the constructor signature is the config; annotated simple types are CLI options), and
    implement `configure`. `self.sampler` is set by the sampler that owns the accelerator."""
    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()
    extra_models: ClassVar[tuple[str, ...]] = ()  # checkpoints sample.py must load (--model NAME=PATH)
    optional_models: ClassVar[tuple[str, ...]] = ()  # checkpoints it can use when given
    sampler: "Sampler"

    def owned_slots(self) -> tuple[str, ...]:
        return self.slots

    def models(self) -> dict[str, nn.Module | None]:
        return {n: getattr(self, n, None) for n in self.extra_models + self.optional_models}

    def check(self, sampler: "Sampler", others: list["Accelerator"]) -> None:
        """Refuse pairings without a defined meaning (raise ValueError saying why)."""

    def configure(self, plan: Plan, sampler: "Sampler") -> None:
        raise NotImplementedError

    def after_run(self, stats: SamplerStats) -> None:
        pass

    @classmethod
    def options(cls) -> dict[str, type]:
        """CLI options: keyword parameters of the constructor annotated with int, float, str or bool."""
        hints = typing.get_type_hints(cls.__init__)
        out = {}
        for p in inspect.signature(cls.__init__).parameters.values():
            kind = hints.get(p.name)
            if p.kind == p.KEYWORD_ONLY and p.name not in cls.extra_models + cls.optional_models:
                if kind in (int, float, str, bool):
                    out[p.name] = kind
                elif typing.get_origin(kind) in (typing.Union, types.UnionType):
                    simple = [a for a in typing.get_args(kind) if a in (int, float, str, bool)]
                    if simple:
                        out[p.name] = simple[0]
        return out

    @classmethod
    def parameters(cls) -> set[str]:
        return {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY}


def register_sampler(name: str) -> Callable[[type[Accelerator]], type[Accelerator]]:
    def wrap(cls: type[Accelerator]) -> type[Accelerator]:
        if name in _REGISTRY or "+" in name:
            raise KeyError(f"sampler name {name!r} is already registered (or contains '+')")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_samplers() -> list[str]:
    return sorted(["default", *_REGISTRY])


def split_names(name: str) -> list[str]:
    names = [n.strip() for n in name.split("+") if n.strip() and n.strip() != "default"]
    for n in names:
        if n not in _REGISTRY:
            raise KeyError(f"unknown sampler {n!r}; available: {', '.join(available_samplers())} "
                           f"(stack accelerators with '+', e.g. code+scalekv)")
    if len(set(names)) != len(names):
        raise ValueError(f"{name!r} names an accelerator twice")
    return names


class Sampler(nn.Module):
    """The engine with a stack of accelerators. `Sampler(var, vae)` is the default (public VAR) sampler."""
    name: ClassVar[str] = "default"
    accelerator_classes: ClassVar[tuple[type[Accelerator], ...]] = ()

    def __init__(self, var: VAR, vae: VQVAE, *accelerators: Accelerator, compile: str | None = None,
                 precision: str = "fp32", rng: str = "fast", **options):
        super().__init__()
        check_models_compatible(var, vae)
        self.var, self.vae = var, vae
        if options or (not accelerators and self.accelerator_classes):
            accelerators = tuple(accelerators) + tuple(self._build_accelerators(options))
        compile = "default" if compile is True else (None if compile is False else compile)
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be a torch.compile mode ({', '.join(COMPILE_MODES)}), got {compile!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and var.class_emb.weight.device.type != "cuda":
            raise ValueError("precision='bf16' needs a CUDA device (move the models there first); use fp32 on CPU")
        if rng not in ("fast", "reference"):
            raise ValueError(f"rng must be 'fast' (exact law, top-k candidates) or 'reference' (the public loop's "
                             f"random draws bitwise), got {rng!r}")
        self.compile, self.precision, self.rng = compile, precision, rng
        self._cache_pool: dict = {}  # compiled samplers keep their caches (static addresses) between calls
        self.accelerators = sorted(accelerators, key=lambda a: min(
            (SLOT_ORDER.index(s) for s in a.owned_slots()), default=len(SLOT_ORDER)))
        owners: dict[str, str] = {}
        for acc in self.accelerators:
            acc.sampler = self
            for slot in acc.owned_slots():
                if slot in owners:
                    raise ValueError(f"{owners[slot]!r} and {acc.name!r} both define the {slot} of the loop; "
                                     f"only one accelerator can own it")
                owners[slot] = acc.name
        for acc in self.accelerators:
            acc.check(self, [o for o in self.accelerators if o is not acc])
        self.extra = model_modules({k: m for acc in self.accelerators for k, m in acc.models().items()})
        self.build_plan()  # validates the configuration now, not at the first sample() call

    def _build_accelerators(self, options: dict) -> list[Accelerator]:
        classes = self.accelerator_classes
        accs = []
        for cls in classes:
            params = cls.parameters()
            mine = {}
            for key, value in options.items():
                owner, _, field = key.rpartition(".")
                if owner:
                    if owner == cls.name and field in params:
                        mine[field] = value
                elif key in params:
                    if sum(key in c.parameters() for c in classes) > 1:
                        raise ValueError(f"option {key!r} belongs to several of {[c.name for c in classes]}; "
                                         f"qualify it, e.g. '{cls.name}.{key}'")
                    mine[key] = value
            accs.append(cls(**mine))
        known = {k for c in classes for k in c.parameters()} | {f"{c.name}.{k}" for c in classes for k in c.parameters()}
        unknown = sorted(set(options) - known)
        if unknown:
            names = "+".join(c.name for c in classes) or "default"
            raise TypeError(f"sampler {names!r} has no option(s) {unknown}; its options: "
                            f"{', '.join(sorted(self.options)) or 'none'}")
        return accs

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not name.startswith("_"):
                for acc in self.__dict__.get("accelerators", ()):
                    if name in dir(acc):
                        return getattr(acc, name)
            raise

    # ---- class-level description (CLI) -----------------------------------------------------------------
    @classmethod
    def _opts(cls) -> dict[str, type]:
        out: dict[str, type] = {}
        for c in cls.accelerator_classes:
            for k, t in c.options().items():
                out[f"{c.name}.{k}"] = t
                if sum(k in o.options() for o in cls.accelerator_classes) == 1:
                    out[k] = t
        return out

    @property
    def device(self) -> torch.device:
        return self.var.class_emb.weight.device

    @property
    def num_scales(self) -> int:
        return self.var.num_scales

    # ---- the plan ---------------------------------------------------------------------------------------
    def build_plan(self) -> Plan:
        K = self.num_scales
        plan = Plan(stages=[VARStage("var", self.var, 0, K)], token_rule=CategoricalDraw(), compile=self.compile,
                    cache_dtype=PRECISIONS[self.precision], cache_pool=self._cache_pool if self.compile else None)
        for acc in self.accelerators:
            acc.configure(plan, self)
        return plan

    # ---- sampling -----------------------------------------------------------------------------------------
    def resolve_labels(self, labels, batch_size: int | None, generator) -> torch.Tensor:
        num_classes = self.var.num_classes
        if labels is None:
            if batch_size is None or batch_size < 1:
                raise ValueError("give labels, or batch_size >= 1 to draw labels uniformly")
            uniform = torch.full((1, num_classes), 1.0 / num_classes, device=self.device)
            return torch.multinomial(uniform, batch_size, replacement=True, generator=generator).view(batch_size)
        if isinstance(labels, int):
            if batch_size is None:
                raise ValueError("an integer label needs batch_size")
            return torch.full((batch_size,), num_classes if labels < 0 else labels, device=self.device, dtype=torch.long)
        labels = torch.as_tensor(labels, device=self.device)
        if labels.ndim != 1 or labels.is_floating_point() or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}")
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(f"batch_size {batch_size} does not match {labels.numel()} labels")
        if labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"labels must be in [0, {num_classes - 1}] or {num_classes} (null class), "
                             f"got values in [{labels.min().item()}, {labels.max().item()}]")
        return labels.long()

    def make_generator(self, generator, seed):
        """One generator from `seed`, or the given generator(s). A list of per-row generators (or of per-row
        seeds) makes every image independent of the batch it is generated in."""
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        if isinstance(seed, (list, tuple)):
            return [self.make_generator(None, s) for s in seed]
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        return generator

    @torch.no_grad()
    def sample(self, labels=None, *, batch_size: int | None = None, cfg: float = 1.5, top_k: int = 0,
               top_p: float = 0.0, temperature: float | list[float] = 1.0, more_smooth: bool = False,
               generator: torch.Generator | list[torch.Generator] | None = None,
               seed: int | list[int] | None = None,
               decode: bool = True, keep_logits: bool = False) -> SampleOutput:
        """Generate class-conditional images.

        labels: tensor of B class ids; an int for B copies (negative: null class, needs batch_size);
        None draws B labels uniformly with the generator. cfg: guidance strength, ramped over scales.
        top_k / top_p: 0 disables. temperature: a float or one value per scale, applied after filtering.
        generator / seed: one for the batch, or one per row (then row b never depends on other rows).
        keep_logits: also return every scale's raw logits (memory: B x L x V floats).
        """
        check_sampling_args(cfg, top_k, top_p, temperature, self.var.config.vocab_size, self.num_scales)
        generator = self.make_generator(generator, seed)
        if isinstance(generator, list):
            if labels is None or isinstance(labels, int):
                raise ValueError("per-row generators/seeds need an explicit label tensor")
            if len(generator) != len(labels):
                raise ValueError(f"{len(generator)} per-row generators/seeds for {len(labels)} labels")
        labels_B = self.resolve_labels(labels, batch_size, generator)
        stats = SamplerStats()
        kept = [] if keep_logits else None
        temps = tuple(temperature) if isinstance(temperature, (list, tuple)) else temperature
        sampling = Sampling(cfg, top_k, top_p, temps, more_smooth, self.rng)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        plan = self.build_plan()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            tokens, f_hat = Engine(plan, self.var, self.vae, labels_B, generator, stats, sampling, kept).run()
        for acc in self.accelerators:
            acc.after_run(stats)
        images = self.decode(f_hat) if decode else None
        if on_cuda:
            torch.cuda.synchronize(self.device)
            stats.cuda_max_memory_allocated = torch.cuda.max_memory_allocated(self.device)
        stats.wall_time_s = time.perf_counter() - start
        return SampleOutput(images, tokens, labels_B, f_hat, stats, kept)

    def process_logits(self, logits_2BlV: torch.Tensor, si: int, cfg: float, top_k: int, top_p: float,
                       temperature) -> torch.Tensor:
        """The processed logits (B, l, V) of scale si that the token rules draw from: the CFG ramp on the global
        scale index, top-k, top-p, temperature (the reference order)."""
        guided = guide(logits_2BlV, cfg_strength(cfg, si, self.num_scales))
        return apply_temperature(top_k_top_p_filter_(guided, top_k, top_p), temperature_at(temperature, si))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(f_hat.float()).add_(1).mul_(0.5)


class _OptionsDescriptor:
    """`SamplerClass.options`: {option: type} of the stacked accelerators (qualified 'acc.opt' always)."""

    def __get__(self, obj, owner):
        return owner._opts()


Sampler.options = _OptionsDescriptor()


_CLASSES: dict[str, type[Sampler]] = {}


def sampler_class(name: str) -> type[Sampler]:
    """The Sampler class of a registered name or a '+' stack of them (e.g. 'code+scalekv')."""
    names = split_names(name)
    if not names:
        return Sampler
    key = "+".join(names)
    if key in _CLASSES:
        return _CLASSES[key]
    classes = tuple(_REGISTRY[n] for n in names)
    attrs = {"name": "+".join(names), "accelerator_classes": classes,
             "extra_models": tuple(m for c in classes for m in c.extra_models),
             "optional_models": tuple(m for c in classes for m in c.optional_models)}
    _CLASSES[key] = type("Sampler_" + "_".join(names), (Sampler,), attrs)
    return _CLASSES[key]


def build_sampler(name: str, **kwargs) -> Sampler:
    return sampler_class(name)(**kwargs)


Sampler.extra_models = ()
Sampler.optional_models = ()
