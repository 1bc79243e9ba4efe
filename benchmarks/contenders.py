"""What the benchmark times: contender specs as given on the command line, the contenders themselves (a
sampler of ours, our decoder alone, the public loop in benchmarks/reference_loop.py), the transformer meter of
the baseline, and the interleaved rounds with the summary of their wall times. benchmarks/benchmark.py runs the
protocol on top of them; benchmarks/rows.py turns what they measured into the result rows."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from samplers import build_sampler, sampler_class
from samplers.cli import parse_sampler_args, parse_sampler_spec
from benchmarks.measure import flop_counter, median_iqr, sync
from benchmarks.reference_loop import ReferenceContender

ENGINE_KEYS = ("compile", "rng", "precision")  # Sampler keywords, as opposed to accelerator options


def summarise(times: list[float], batch: int, threshold: float) -> dict:
    """One row's wall times: median, IQR (and `noisy` when it exceeds `threshold` of the median), throughput."""
    spread = median_iqr(times)
    median, iqr = spread["median"], spread["iqr"]
    return {"median_s": median, "iqr_s": iqr, "iqr_frac": iqr / median, "noisy": iqr > threshold * median,
            "per_image_s": median / batch, "images_per_s": batch / median, "repeats": len(times), "times_s": times}


class TransformerMeter:
    """Times (and, when `counting`, counts the FLOPs of) every call of a VAR's blocks and head, by shadowing
    the two methods on the instance; the engine looks them up per sample, so nothing in samplers/ changes."""

    def __init__(self, var):
        self.var, self.calls_s, self.flops, self.counting = var, [], 0, False
        self.rounds_s: list[float] = []  # transformer seconds of each metered call of the sampler

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            device = args[0].device
            sync(device)
            start = time.perf_counter()
            if self.counting:
                with flop_counter() as counter:
                    out = fn(*args, **kwargs)
                self.flops += counter.get_total_flops()
            else:
                out = fn(*args, **kwargs)
            sync(device)
            self.calls_s.append(time.perf_counter() - start)
            self.rounds_s[-1] += self.calls_s[-1]
            return out
        return timed

    def __enter__(self):
        self.rounds_s.append(0.0)
        self.var.run_blocks = self._wrap(type(self.var).run_blocks.__get__(self.var))
        self.var.logits = self._wrap(type(self.var).logits.__get__(self.var))
        return self

    def __exit__(self, *exc):
        del self.var.run_blocks, self.var.logits


@dataclass
class Spec:
    label: str  # as given on the command line
    name: str  # accelerator stack, "default", or "reference" (the public loop)
    options: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    batches: list[int] | None = None  # None: every --batch-sizes entry


def parse_spec(text: str) -> Spec:
    name, items = parse_sampler_spec(text.strip())
    engine = {}
    rest = []
    for item in items:
        key, sep, value = item.partition("=")
        if key in ENGINE_KEYS and sep:
            engine[key] = None if value.lower() in ("none", "eager") else value
        else:
            rest.append(item)
    batches = None
    for item in list(rest):
        if item.startswith("batches="):  # this contender runs only at these batch sizes
            batches = [int(b) for b in item.split("=", 1)[1].split("/")]
            rest.remove(item)
    if name == "reference":
        if engine or set(rest) - {"full"}:
            raise ValueError(f"--sampler reference takes only 'full' and 'batches=' (got {text!r}): it is the "
                             f"public loop as released")
        return Spec(text, name, {"full": "full" in rest}, batches=batches)
    return Spec(text, name, parse_sampler_args(sampler_class(name), rest), engine, batches)


def split_specs(text: str) -> list[str]:
    """Legacy --samplers: separated by ';' (commas then separate each one's options) or, without options, by ','."""
    return [s.strip() for s in text.split(";" if ":" in text else ",") if s.strip()]


class OursContender:
    kind = "ours"

    def __init__(self, spec: Spec, sampler, labels_B, seed: int, sampling: dict, decode: bool):
        self.spec, self.sampler, self.labels_B, self.seed = spec, sampler, labels_B, seed
        self.kwargs = dict(sampling, decode=decode)
        self.out = None

    def __call__(self) -> float:
        device = self.labels_B.device
        sync(device)
        start = time.perf_counter()
        self.out = self.sampler.sample(self.labels_B, seed=self.seed, **self.kwargs)
        sync(device)
        return time.perf_counter() - start


class DecoderContender:
    """Our tokenizer's decoder alone, on the baseline's latent: what --no-decode leaves out of every row."""
    kind = "decoder"

    def __init__(self, sampler, f_hat):
        self.sampler, self.f_hat = sampler, f_hat

    @torch.no_grad()
    def __call__(self) -> float:
        sync(self.f_hat.device)
        start = time.perf_counter()
        self.sampler.decode(self.f_hat)
        sync(self.f_hat.device)
        return time.perf_counter() - start


def measure(contenders: dict, repeats: int, warmup: int, meter: TransformerMeter | None = None,
            meter_key: str | None = None) -> tuple[dict, dict]:
    """Warm-up, then `repeats` interleaved rounds (ABC, CBA, ...). Returns {label: times}, {label: first call}."""
    first = {}
    for label, c in contenders.items():
        for i in range(max(warmup, 0)):
            t = c()
            first.setdefault(label, t)
        if isinstance(getattr(c, "decoder_times", None), list):
            c.decoder_times.clear()
    times = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(repeats):
        for label in (order if r % 2 == 0 else order[::-1]):
            if meter is not None and label == meter_key:
                with meter:
                    times[label].append(contenders[label]())
            else:
                times[label].append(contenders[label]())
    return times, first


def build_contender(spec: Spec, var, vae, extras, labels_B, args, sampling, ref_var):
    if spec.name == "reference":
        full = spec.options["full"] or not args.no_decode
        return ReferenceContender(ref_var, labels_B.shape[0], labels_B, args.seed, sampling, full)
    cls = sampler_class(spec.name)
    models = {k: v for k, v in extras.items() if k in cls.extra_models + cls.optional_models}
    missing = [m for m in cls.extra_models if m not in models]
    if missing:
        raise ValueError(f"--sampler {spec.label!r} needs --model {missing[0]}=PATH")
    sampler = build_sampler(spec.name, var=var, vae=vae, **models, **spec.engine, **spec.options)
    return OursContender(spec, sampler, labels_B, args.seed, sampling, decode=not args.no_decode)
