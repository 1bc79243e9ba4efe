"""Distilled-decoding sampler (spec accelerators.md 4.6) and the DD draft source for Block-SJD.

Schedules (option `schedule`):
  1step    one student forward on all-noise slots (t = 0);
  2step    step 1, then scales < t2 kept (as tokens) and scales >= t2 reset to the SAME noise, one more
           student forward at t = t2;
  teacher  teacher-involved: a student step at t = 0 (skipped when teacher_start = 0), all slots snapped to
           codes, the teacher regenerates scales [teacher_start, t2) by ordinary stochastic sampling
           (cfg / top_k / top_p / temperature of `sample`, teacher-forcing the scales before), then a
           student step at t = t2 with the original noise.
Scales < loss_split are read by argmax of the classifier head; the others use the continuous head's vectors
as they are (not snapped) in f_hat; `tokens` reports their nearest codes. Guidance is baked into the
student's data, so cfg/top-k/top-p/temperature only affect the teacher's scales of the `teacher` schedule.
The noise is drawn scale by scale from the generator(s), in the order the `flow` sampler draws it: with the
same seed(s) the student maps the noise the teacher's flow sampling would have mapped.
"""
from __future__ import annotations

import torch
from einops import rearrange

from samplers.base import Sampler, SamplerStats, check_models_compatible, register_sampler
from samplers.sjd.drafts import register_draft_source
from samplers.dd.flow_map import gaussian_rows
from samplers.sjd.loop import Draft, DraftSource
from samplers.staged import GenerationState, run_scales
from tokenizers import VQVAE
from var import VAR
from samplers.dd.student import DDStudent

SCHEDULES = ("1step", "2step", "teacher")


def check_student(student, var: VAR | None, vae: VQVAE, what: str = "student") -> None:
    if not isinstance(student, DDStudent):
        raise TypeError(f"{what} must be a DDStudent (a dd_student checkpoint from `train.py dd`), got "
                        f"{type(student).__name__}")
    check_models_compatible(student, vae, what)
    if var is not None and student.num_classes != var.num_classes:
        raise ValueError(f"{what} has {student.num_classes} classes but the teacher {var.num_classes}; "
                         f"use the student distilled from this teacher")


def draw_noise(student: DDStudent, batch: int, generator, device) -> list[torch.Tensor]:
    """Per scale (B, n_s, Cvae), scale by scale (per-row generators fill their own rows)."""
    C = student.config.z_channels
    return [gaussian_rows((batch, p * p, C), generator, device) for p in student.patch_nums]


class StudentRunner:
    """One student forward from (tokens of scales < t, noise of scales >= t) to per-scale outputs."""

    def __init__(self, student: DDStudent, vae: VQVAE):
        self.student, self.vae = student, vae

    def codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        return self.vae.quantize.embedding(idx_Bl).float()

    def snap(self, vec_BlC: torch.Tensor) -> torch.Tensor:
        B = vec_BlC.shape[0]
        return self.vae.quantize.nearest_codes(vec_BlC.reshape(-1, vec_BlC.shape[-1]).float()).view(B, -1)

    def step(self, labels_B, noise: list[torch.Tensor], tokens: list[torch.Tensor], t: int, stats: SamplerStats | None,
             name: str = "student") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns per scale (tokens (B, n), code vectors (B, n, Cvae)); data scales (< t) are the inputs."""
        st = self.student
        slots = torch.cat([self.codes(tokens[s]) if s < t else noise[s].float() for s in range(st.num_scales)], dim=1)
        if stats is not None:  # one forward over B rows x (start slot + L token slots)
            stats.forwards[name] = stats.forwards.get(name, 0) + 1
            stats.tokens_processed[name] = stats.tokens_processed.get(name, 0) + slots.shape[0] * (slots.shape[1] + 1)
        logits_BLV, cont_BLC = st(labels_B, slots, t)
        out_tok, out_vec = [], []
        for s, sl in enumerate(st.scale_slices()):
            if s < t:
                idx, vec = tokens[s], self.codes(tokens[s])
            elif s < st.loss_split:
                idx = logits_BLV[:, sl].argmax(-1)
                vec = self.codes(idx)
            else:
                vec = cont_BLC[:, sl]
                idx = self.snap(vec)
            out_tok.append(idx)
            out_vec.append(vec)
        return out_tok, out_vec


@register_sampler("dd")
class DDSampler(Sampler):
    """Distilled decoding. Extra model: student (a DDStudent distilled from `var`). Options: schedule
    (1step | 2step | teacher), teacher_start (first scale the teacher regenerates, teacher schedule only;
    default t2 - 1). stats.forwards counts "student" and "var" (teacher) forwards separately."""
    extra_models = ("student",)
    options = {"schedule": str, "teacher_start": int}

    def __init__(self, var: VAR, vae: VQVAE, *, student: DDStudent, schedule: str = "1step",
                 teacher_start: int | None = None):
        super().__init__(var, vae)
        check_student(student, var, vae)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        t2 = student.t2
        if teacher_start is not None and schedule != "teacher":
            raise ValueError(f"teacher_start only applies to schedule='teacher', not {schedule!r}")
        self.teacher_start = t2 - 1 if teacher_start is None else teacher_start
        if not 0 <= self.teacher_start < t2:
            raise ValueError(f"teacher_start must be in [0, t2 - 1] = [0, {t2 - 1}] (the student's t2 is {t2}), "
                             f"got {teacher_start}")
        self.student, self.schedule = student, schedule
        self.runner = StudentRunner(student, vae)

    def _generate(self, labels_B, generator, stats: SamplerStats, *, cfg, top_k, top_p, temperature, more_smooth):
        if more_smooth:
            raise ValueError("more_smooth has no meaning for the distilled student (no categorical draws); "
                             "use more_smooth=False")
        st, B, t2 = self.student, labels_B.shape[0], self.student.t2
        noise = draw_noise(st, B, generator, self.device)
        empty = [None] * st.num_scales
        if self.schedule == "1step":
            tokens, vecs = self.runner.step(labels_B, noise, empty, 0, stats)
        elif self.schedule == "2step":
            first, _ = self.runner.step(labels_B, noise, empty, 0, stats)
            tokens, vecs = self.runner.step(labels_B, noise, first, t2, stats)  # same noise for scales >= t2
        else:
            tokens, vecs = self._teacher_involved(labels_B, noise, generator, stats,
                                                  dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                                       more_smooth=False))
        stats.extra.update({"schedule": self.schedule, "t2": t2, "loss_split": st.loss_split,
                            "continuous_scales": list(range(st.loss_split, st.num_scales)),
                            "teacher_start": self.teacher_start if self.schedule == "teacher" else None})
        return tokens, self.assemble_fhat(vecs)

    def _teacher_involved(self, labels_B, noise, generator, stats, sampling):
        st, s, t2 = self.student, self.teacher_start, self.student.t2
        q = self.vae.quantize
        state = GenerationState(f_hat=self.empty_fhat(labels_B.shape[0]))
        if s > 0:
            snapped, _ = self.runner.step(labels_B, noise, [None] * st.num_scales, 0, stats)
            for si in range(s):  # teacher-forcing input of scales 1..s from the snapped student tokens
                state.tokens.append(snapped[si])
                state.f_hat, nxt = q.next_input(si, state.f_hat, q.lookup(snapped[si], st.patch_nums[si]))
                state.inputs.append(rearrange(nxt, "b c h w -> b (h w) c"))
        cache = self.var.new_cache()
        run_scales(self, self.var, "var", labels_B, cache, state, s, t2, generator, stats, sampling=sampling,
                   prefill_from=0 if s > 0 else None)
        return self.runner.step(labels_B, noise, state.tokens + [None] * (st.num_scales - t2), t2, stats)

    def assemble_fhat(self, vecs: list[torch.Tensor]) -> torch.Tensor:
        """Residual accumulation (phi, upsample) of per-scale vectors, off-codebook ones included."""
        q = self.vae.quantize
        f_hat = self.empty_fhat(vecs[0].shape[0])
        for si, (pn, vec) in enumerate(zip(self.student.patch_nums, vecs)):
            f_hat = f_hat + q.scale_contribution(si, rearrange(vec, "b (h w) c -> b c h w", h=pn, w=pn))
        return f_hat


class DDDraft(DraftSource):
    """Block-SJD drafts from the student: deterministic given the noise (q = None, one-hot), so verification
    accepts each drafted token with probability p(token). Noise is drawn once per run from the draft stream.
    With refresh (default), when the committed prefix differs from the student's drafts the student is re-run
    at t = a (committed tokens as data, the same noise for the rest): one student forward per such pass."""
    name = "dd"

    def __init__(self, student: DDStudent, refresh: bool = True, model_name: str = "student"):
        self.student, self.refresh, self.model_name = student, refresh, model_name

    def start(self, target, batch, generator):
        super().start(target, batch, generator)
        check_student(self.student, target.var, target.vae, "the DD draft student")
        self.runner = StudentRunner(self.student, target.vae)
        self.noise = draw_noise(self.student, batch, generator, target.labels_B.device)
        empty = [None] * self.student.num_scales
        self.drafts, _ = self.runner.step(target.labels_B, self.noise, empty, 0, target.stats, self.model_name)
        self.based_on = 0  # the drafts were made with scales < based_on given as data

    def propose(self, a, end, tokens, final):
        committed = tokens[:a]
        stale = any(not torch.equal(committed[s], self.drafts[s]) for s in range(self.based_on, a))
        if self.refresh and stale and a < self.student.num_scales:
            self.drafts, _ = self.runner.step(self.target.labels_B, self.noise,
                                              committed + [None] * (self.student.num_scales - a), a,
                                              self.target.stats, self.model_name)
            self.based_on = a
        return [Draft(self.drafts[b], None) for b in range(a, end)]


@register_draft_source("dd")
def _dd(sampler) -> DraftSource:
    student = sampler.draft_models.get("student")
    if student is None:
        raise ValueError("draft='dd' needs a distilled-decoding student: pass student=<DDStudent> "
                         "(sample.py: --model student=PATH, e.g. checkpoints/fmnist/dd_student.safetensors)")
    return DDDraft(student)
