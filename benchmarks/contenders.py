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
    """Times (and, when `counting`, counts the FLOPs of) every pass of a VAR's blocks and of its head through
    forward hooks, PyTorch's own instrumentation points: a pass runs from the pre-hook of its first module
    (`shared_ada_lin`, the conditioning every block pass starts with; `head_nm`) to the hook of its last
    (`blocks[-1]`; `head`). Neither the model nor samplers/ changes; the hooks are removed on exit."""

    def __init__(self, var):
        self.var, self.calls_s, self.flops, self.counting = var, [], 0, False
        self.rounds_s: list[float] = []  # transformer seconds of each metered call of the sampler
        self._handles, self._start, self._counter = [], 0.0, None

    def _begin(self, module, args) -> None:
        sync(args[0].device)
        if self.counting:
            self._counter = flop_counter()
            self._counter.__enter__()
        self._start = time.perf_counter()

    def _end(self, module, args, out) -> None:
        sync(out.device)
        elapsed = time.perf_counter() - self._start
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops += self._counter.get_total_flops()
            self._counter = None
        self.calls_s.append(elapsed)
        self.rounds_s[-1] += elapsed

    def __enter__(self):
        self.rounds_s.append(0.0)
        v = self.var
        for first, last in ((v.shared_ada_lin, v.blocks[-1]), (v.head_nm, v.head)):
            self._handles += [first.register_forward_pre_hook(self._begin), last.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


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
