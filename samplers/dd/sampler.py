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

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.dd.flow_map import gaussian_rows
from samplers.dd.student import DDStudent
from samplers.engine import OneShotStage, Plan, VARStage
from samplers.sjd.drafts import register_draft_source
from samplers.sjd.speculation import Draft, DraftSource
from samplers.stats import SamplerStats
from tokenizers import VQVAE
from training.checkpoint import check_models_compatible
from var import VAR

SCHEDULES = ("1step", "2step", "teacher")


def check_student(student, var: VAR | None, vae: VQVAE, what: str = "student") -> None:
    if not isinstance(student, DDStudent):
        raise TypeError(f"{what} must be a DDStudent (a dd_student checkpoint from `train.py dd`), got "
                        f"{type(student).__name__}")
    check_models_compatible(student, vae, what, main=var, main_what="the teacher",
                            fix="use the student distilled from this teacher")


def draw_noise(student: DDStudent, batch: int, generator, device) -> list[torch.Tensor]:
    """Per scale (B, n_s, Cvae), scale by scale (per-row generators fill their own rows)."""
    C = student.config.z_channels
    return [gaussian_rows((batch, p * p, C), generator, device) for p in student.patch_nums]


class StudentRunner:
    """One student forward from (tokens of scales < t, noise of scales >= t) to per-scale outputs."""

    def __init__(self, student: DDStudent, vae: VQVAE, loss_split: int | None = None):
        self.student, self.vae = student, vae
        self.loss_split = student.loss_split if loss_split is None else loss_split

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
            stats.count_tokens(name, slots.shape[0], slots.shape[1] + 1)
        logits_BLV, cont_BLC = st(labels_B, slots, t)
        out_tok, out_vec = [], []
        for s, sl in enumerate(st.scale_slices()):
            if s < t:
                idx, vec = tokens[s], self.codes(tokens[s])
            elif s < self.loss_split:
                idx = logits_BLV[:, sl].argmax(-1)
                vec = self.codes(idx)
            else:
                vec = cont_BLC[:, sl]
                idx = self.snap(vec)
            out_tok.append(idx)
            out_vec.append(vec)
        return out_tok, out_vec


class StudentStage(OneShotStage):
    """Scales [begin, end) from one student forward at t = begin (committed scales < begin given as data, the
    run's noise for the rest). snap=True commits the nearest codes (the teacher-involved schedule feeds the
    teacher from codes); otherwise continuous-head scales enter f_hat as the vectors the student emitted."""

    def __init__(self, dd: "DD", begin: int, end: int, snap: bool = False):
        self.dd, self.begin, self.end, self.snap, self.name = dd, begin, end, snap, "student"

    def start(self, engine) -> None:
        self.dd.ensure_noise(engine)

    def generate(self, engine):
        K = self.dd.student.num_scales
        committed = list(engine.state.tokens) + [None] * (K - self.begin)
        tokens, vecs = self.dd.runner.step(engine.labels_B, self.dd.noise, committed, self.begin, engine.stats)
        return [(tokens[s], None if self.snap else vecs[s]) for s in range(self.begin, self.end)]


def step_list(schedule: str, num_scales: int) -> list[int]:
    """"0,2,4" -> [0, 2, 4]: student steps, strictly increasing from 0, below the number of scales."""
    try:
        steps = [int(x) for x in schedule.split(",")]
    except ValueError:
        steps = []
    if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] >= num_scales:
        raise ValueError(f"schedule must be one of {SCHEDULES} or student steps '0,t1,t2,...' strictly increasing "
                         f"from 0 and below {num_scales} (e.g. '0,2,4'), got {schedule!r}")
    return steps


@register_sampler("dd")
class DD(Accelerator):
    """Distilled decoding. Extra model: student (a DDStudent distilled from `var`). Options: schedule
    (1step | 2step | teacher | a comma list of student steps t_0=0 < t_1 < ... as in DD1, e.g. "0,2,4": step i
    gives scales [t_i, t_i+1) from a forward with the scales < t_i as data; "0" is 1step, "0,t2" is 2step),
    teacher_start (first scale the teacher regenerates, teacher schedule only; default t2 - 1), loss_split
    (scales below it are read through the classifier head, the rest through the continuous head; -1: the
    student's own). stats.forwards counts "student" and "var" (teacher) forwards separately."""
    slots = ("stages",)
    extra_models = ("student",)

    def __init__(self, *, student: DDStudent | None = None, schedule: str = "1step", teacher_start: int | None = None,
                 loss_split: int = -1):
        if student is None:
            raise ValueError("the dd sampler needs a distilled student (sample.py: --model student=PATH)")
        self.loss_split_option = loss_split
        if teacher_start is not None and schedule != "teacher":
            raise ValueError(f"teacher_start only applies to schedule='teacher', not {schedule!r}")
        self.student, self.schedule, self.teacher_start_option = student, schedule, teacher_start
        self.noise: list[torch.Tensor] | None = None

    def check(self, sampler, others) -> None:
        check_student(self.student, sampler.var, sampler.vae)
        st, split = self.student, self.loss_split_option
        self.steps = step_list(self.schedule, st.num_scales) if self.schedule not in SCHEDULES else None
        if not 0 <= split <= st.num_scales and split != -1:
            raise ValueError(f"loss_split must be in [0, {st.num_scales}] (or -1: the student's own {st.loss_split}), "
                             f"got {split}")
        self.loss_split = st.loss_split if split == -1 else split
        t2 = self.student.t2
        self.teacher_start = t2 - 1 if self.teacher_start_option is None else self.teacher_start_option
        if not 0 <= self.teacher_start < t2:
            raise ValueError(f"teacher_start must be in [0, t2 - 1] = [0, {t2 - 1}] (the student's t2 is {t2}), "
                             f"got {self.teacher_start_option}")
        self.runner = StudentRunner(self.student, sampler.vae, self.loss_split)
        if self.steps == [0] or self.schedule == "1step":
            if any(o.name == "edit" for o in others):
                raise ValueError("dd+edit with one student step: the student draws every scale in one forward "
                                 "before any known token is forced, so the regenerated positions would never see "
                                 "the image; use schedule=2step, teacher or a step list such as '0,4,7', whose "
                                 "later steps are conditioned on the forced coarser scales")
        for o in others:
            if o.name in ("flow", "sjd"):
                raise ValueError(f"dd+{o.name}: the student emits its scales in one forward from noise it draws "
                                 f"itself; there is no per-token draw for {o.name} to replace (for Block-SJD, use the "
                                 f"student as its draft source: sjd with draft=dd)")

    def configure(self, plan: Plan, sampler) -> None:
        K, t2, s = sampler.num_scales, self.student.t2, self.teacher_start
        self.noise = None
        if self.steps is not None:
            ends = self.steps[1:] + [K]
            plan.stages = [StudentStage(self, t, e, snap=e < K) for t, e in zip(self.steps, ends)]
        elif self.schedule == "1step":
            plan.stages = [StudentStage(self, 0, K)]
        elif self.schedule == "2step":
            plan.stages = [StudentStage(self, 0, t2, snap=True), StudentStage(self, t2, K)]
        else:
            plan.stages = ([StudentStage(self, 0, s, snap=True)] if s > 0 else []) + \
                          [VARStage("var", sampler.var, s, t2), StudentStage(self, t2, K)]

    def ensure_noise(self, engine) -> None:
        """Per scale (B, n_s, Cv), drawn once per run before anything else uses the generator (the order the
        `flow` sampler draws it: with the same seed(s) the student maps the noise the teacher's flow sampling
        would have mapped)."""
        if self.noise is None:
            self.noise = draw_noise(self.student, engine.labels_B.shape[0], engine.generator, engine.labels_B.device)

    def after_run(self, stats) -> None:
        st = self.student
        stats.extra.update({"schedule": self.schedule, "t2": st.t2, "loss_split": self.loss_split,
                            "steps": self.steps, "continuous_scales": list(range(self.loss_split, st.num_scales)),
                            "teacher_start": self.teacher_start if self.schedule == "teacher" else None})
        self.noise = None


DDSampler = sampler_class("dd")


class DDDraft(DraftSource):
    """Block-SJD drafts from the student: deterministic given the noise (q = None, one-hot), so verification
    accepts each drafted token with probability p(token). Noise is drawn once per run from the draft stream, at
    the first proposal (so a run that never drafts, e.g. window_scales=1, leaves the stream as plain sampling).
    With refresh (default), when the committed prefix differs from the student's drafts the student is re-run
    at t = a (committed tokens as data, the same noise for the rest): one student forward per such pass."""
    name = "dd"

    def __init__(self, student: DDStudent, refresh: bool = True, model_name: str = "student"):
        self.student, self.refresh, self.model_name = student, refresh, model_name

    def start(self, target, batch, generator):
        super().start(target, batch, generator)
        check_student(self.student, target.var, target.vae, "the DD draft student")
        self.runner = StudentRunner(self.student, target.vae)
        self.noise = None

    def propose(self, a, end, tokens, final):
        t = self.target
        if self.noise is None:
            self.noise = draw_noise(self.student, self.batch, self.generator, t.labels_B.device)
            empty = [None] * self.student.num_scales
            self.drafts, _ = self.runner.step(t.labels_B, self.noise, empty, 0, t.stats, self.model_name)
            self.based_on = 0  # the drafts were made with scales < based_on given as data
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
