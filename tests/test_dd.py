"""Distilled decoding: dataset generation (determinism, resume, process count), the student (mask, init,
forward counts, overfit), the `dd` sampler and the DD draft source for Block-SJD."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import samplers.dd.sampler  # noqa: F401  (registers "dd" and the "dd" draft source)
from tests.conftest import make_tiny_pair
from samplers import build_sampler
from samplers.dd.sampler import DDSampler, draw_noise
from samplers.dd.flow_map import FlowSampler
from samplers.dd.data import DDConfig, DDDataset, generate, num_shards, sample_seed, shard_path
from samplers.dd.job import dd_loss, evaluate_pairs
from samplers.dd.student import DDStudent, DDStudentConfig, level_sibling_mask


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: deterministic, uncontended CPU runs


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(3)


def small_cfg(tmp_path, name="data", **kw) -> DDConfig:
    base = dict(data_dir=str(tmp_path / name), num_samples=10, shard_size=4, seed=7, cfg=1.5, top_k=8, flow_steps=16,
                t2=2, loss_split=2)
    return DDConfig(**{**base, **kw})


def shard_tensors(cfg: DDConfig) -> list[dict]:
    return [load_file(str(shard_path(cfg.data_dir, j))) for j in range(num_shards(cfg))]


def assert_same_shards(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# ---- dataset ------------------------------------------------------------------------------------------------
def test_dataset_is_the_flow_teacher_and_resume_and_process_count_do_not_change_it(tmp_path, pair):
    var, vae = pair
    full = small_cfg(tmp_path, "full")
    assert generate(full, var, vae, show_progress=False) == [0, 1, 2]
    ref = shard_tensors(full)
    assert [s["labels"].numel() for s in ref] == [4, 4, 2]
    # shard 1 is exactly the flow sampler on its labels with the per-index seeds
    idx = list(range(4, 8))
    flow = FlowSampler(var, vae, flow_steps=16)
    out = flow.sample(torch.tensor([i % var.num_classes for i in idx]), seed=[sample_seed(7, i) for i in idx],
                      cfg=1.5, top_k=8, decode=False)
    assert torch.equal(ref[1]["tokens"].long(), torch.cat(out.tokens, 1))
    assert torch.equal(ref[1]["noise"], torch.cat(flow.last_noise, 1))
    assert torch.equal(ref[1]["labels"], torch.tensor(idx) % var.num_classes)

    # interrupted after one shard (plus a crash leftover), then resumed
    part = small_cfg(tmp_path, "resumed")
    assert generate(part, var, vae, stop_after=1, show_progress=False) == [0]
    (shard_path(part.data_dir, 1).parent / ".shard_00001.safetensors.x.tmp").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="2 of 3 shards are missing"):
        DDDataset(part.data_dir)
    assert generate(part, var, vae, show_progress=False) == [1, 2]
    assert_same_shards(shard_tensors(part), ref)
    log = [json.loads(line) for line in (shard_path(part.data_dir, 0).parent / "generation.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in log] == [0, 1, 2]

    # two processes (run one after the other here): each writes its own shards, the union is the same data
    two = small_cfg(tmp_path, "two")
    assert generate(two, var, vae, process_index=1, num_processes=2, show_progress=False) == [1]
    assert generate(two, var, vae, process_index=0, num_processes=2, show_progress=False) == [0, 2]
    assert_same_shards(shard_tensors(two), ref)

    data = DDDataset(two.data_dir)
    labels, noise, tokens = data.fetch([9, 0], "cpu")
    assert len(data) == 10 and tokens.shape == (2, var.seq_len) and noise.shape == (2, var.seq_len, 8)
    assert torch.equal(labels, torch.tensor([9 % 5, 0]))


def test_dataset_refuses_to_mix_settings(tmp_path, pair):
    var, vae = pair
    cfg = small_cfg(tmp_path, num_samples=4)
    generate(cfg, var, vae, show_progress=False)
    with pytest.raises(ValueError, match="differs in \\['settings'\\]"):
        generate(small_cfg(tmp_path, num_samples=4, cfg=2.0), var, vae, show_progress=False)
    other_teacher, _ = make_tiny_pair(4)
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        generate(cfg, other_teacher, vae, show_progress=False)
    with pytest.raises(ValueError, match="num_samples and shard_size"):
        DDConfig(num_samples=0)


# ---- student ------------------------------------------------------------------------------------------------
def brute_force_visible(patch_nums) -> torch.Tensor:
    levels = [0] + [s + 1 for s, p in enumerate(patch_nums) for _ in range(p * p)]
    S = len(levels)
    return torch.tensor([[levels[j] < levels[i] or i == j for j in range(S)] for i in range(S)])


def test_level_sibling_mask_against_brute_force_and_in_the_forward(pair):
    for pns in [(1, 2, 3), (1, 2, 3, 4), (2, 3)]:
        assert torch.equal(level_sibling_mask(pns), brute_force_visible(pns))
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2).eval()
    torch.nn.init.normal_(student.slot_type.weight)
    for lin in student.type_proj:  # off their zero init, so the type path inside the blocks is exercised too
        torch.nn.init.normal_(lin.weight, std=0.05)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 3])
    slots = torch.randn(2, var.seq_len, 8, generator=gen)
    logits, cont = student(labels, slots, 0)
    # token 7 is in scale 2 (slots 5..13): changing a sibling (token 9) or a finer token leaves it unchanged,
    # changing a coarser token (token 2, scale 1) or itself changes it
    for j, same in [(9, True), (20, True), (2, False), (7, False)]:
        moved = slots.clone()
        moved[:, j] += 1.0
        lo, co = student(labels, moved, 0)
        assert torch.allclose(lo[:, 7], logits[:, 7], atol=1e-6) == same, j
        assert torch.allclose(co[:, 7], cont[:, 7], atol=1e-6) == same, j
    # the slot type (data vs noise) of scale 1 (t = 1 vs t = 2) reaches scale 2 but not scale 0
    lo1, _ = student(labels, slots, 1)
    lo2, _ = student(labels, slots, 2)
    assert torch.allclose(lo1[:, 0], lo2[:, 0], atol=1e-6) and not torch.allclose(lo1[:, 7], lo2[:, 7], atol=1e-4)


def test_student_is_initialised_from_the_teacher(pair):
    var, _ = pair
    s = DDStudent.from_teacher(var, t2=3, loss_split=2)
    bb, tsd = s.backbone.state_dict(), var.state_dict()
    assert torch.equal(bb["lvl_embed.weight"][1:], tsd["lvl_embed.weight"])
    assert torch.equal(bb["pos_1LC"][:, 1:], tsd["pos_1LC"])
    for k in tsd:
        if k.startswith(("blocks.", "head", "word_embed", "class_emb", "pos_start")):
            assert torch.equal(bb[k], tsd[k]), k
    assert not torch.equal(bb["lvl_embed.weight"][0], tsd["lvl_embed.weight"][0])  # the new start level row
    assert s.config.t2 == 3 and s.config.loss_split == 2 and s.config.teacher_config() == var.config
    with pytest.raises(ValueError, match="t2 must be in"):
        DDStudentConfig(patch_nums=(1, 2), vocab_size=8, z_channels=4, num_classes=2, depth=1, embed_dim=8,
                        num_heads=2, t2=2)
    with pytest.raises(ValueError, match="slots must have shape"):
        s(torch.tensor([0]), torch.randn(1, 5, 8), 0)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_forward_counts_and_two_step_reuses_the_noise(pair):
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2, loss_split=3).eval()
    s_calls, t_calls = count_calls(student.backbone.blocks[0].attn), count_calls(var.blocks[0].attn)
    labels = torch.tensor([0, 1, 2, 4])
    for schedule, kw, n_student, n_teacher in [("1step", {}, 1, 0), ("2step", {}, 2, 0),
                                               ("teacher", {"teacher_start": 1}, 2, 1),
                                               ("teacher", {"teacher_start": 0}, 1, 2)]:
        s_calls[0] = t_calls[0] = 0
        sampler = build_sampler("dd", var=var, vae=vae, student=student, schedule=schedule, **kw)
        out = sampler.sample(labels, seed=5)
        assert (s_calls[0], t_calls[0]) == (n_student, n_teacher), schedule
        assert out.stats.forwards.get("student", 0) == n_student and out.stats.forwards.get("var", 0) == n_teacher
        assert out.stats.tokens_processed["student"] == n_student * 4 * (1 + var.seq_len)
        assert out.images.shape == (4, 3, 8, 8) and out.stats.wall_time_s > 0
        assert [t.shape for t in out.tokens] == [(4, p * p) for p in var.patch_nums]

    one = build_sampler("dd", var=var, vae=vae, student=student).sample(labels, seed=5, decode=False)
    two = build_sampler("dd", var=var, vae=vae, student=student, schedule="2step").sample(labels, seed=5, decode=False)
    # the noise is the one the flow teacher maps for the same seed
    flow = FlowSampler(var, vae, flow_steps=8)
    flow.sample(labels, seed=5, decode=False)
    noise = draw_noise(student, 4, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(noise, flow.last_noise))
    # step 2 = the student at t2 on (step-1 tokens of scales < t2, the same noise for scales >= t2)
    assert all(torch.equal(a, b) for a, b in zip(one.tokens[:2], two.tokens[:2]))
    codes = vae.quantize.embedding.weight
    slots = torch.cat([codes[one.tokens[0]], codes[one.tokens[1]]] + noise[2:], dim=1)
    logits, _ = student(labels, slots, 2)
    assert torch.equal(two.tokens[2], logits[:, 5:14].argmax(-1))  # scale 2 < loss_split: argmax
    assert not torch.equal(one.f_hat, two.f_hat)


def test_continuous_scales_are_decoded_unsnapped(pair):
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2, loss_split=2).eval()
    sampler = build_sampler("dd", var=var, vae=vae, student=student)
    out = sampler.sample(torch.tensor([1, 2]), seed=0, decode=False)
    snapped = vae.quantize.tokens_to_fhat(out.tokens)
    assert not torch.allclose(out.f_hat, snapped, atol=1e-4)  # scales >= 2 are off-codebook vectors
    assert out.stats.extra["continuous_scales"] == [2, 3]


def test_student_loss_decreases_on_a_tiny_overfit_run(tmp_path, pair):
    var, vae = pair
    cfg = small_cfg(tmp_path, num_samples=8, shard_size=8, flow_steps=12)
    generate(cfg, var, vae, show_progress=False)
    labels, noise, tokens = DDDataset(cfg.data_dir).fetch(list(range(8)), "cpu")
    torch.manual_seed(0)
    student = DDStudent.from_teacher(var, t2=2, loss_split=2).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    codebook = vae.quantize.embedding.weight.detach()
    losses = []
    for step in range(40):
        t_B = torch.tensor([0, 2] * 4).roll(step % 2)  # every pair at both timesteps
        loss, metrics = dd_loss(student, student, codebook, labels, noise, tokens, t_B, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]
    assert {"ce", "mse", "acc_s0", "acc_s3"} <= set(metrics)
    held = evaluate_pairs(student, codebook, DDDataset(cfg.data_dir), batch_size=3)
    assert set(held) == {"t0", "t2"} and "acc_s1" in held["t0"] and "acc_s1" not in held["t2"]  # data slots: no score
    assert held["t0"]["acc_s0"] > 0.9  # the overfit student reproduces its training pairs


# ---- sampler interface and the Block-SJD draft source ------------------------------------------------------
def test_bad_inputs_fail_clearly(pair):
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        DDSampler(var, vae, student=student, schedule="3step")
    with pytest.raises(ValueError, match="teacher_start must be in"):
        DDSampler(var, vae, student=student, schedule="teacher", teacher_start=2)
    with pytest.raises(ValueError, match="only applies to schedule='teacher'"):
        DDSampler(var, vae, student=student, teacher_start=0)
    with pytest.raises(TypeError, match="must be a DDStudent"):
        DDSampler(var, vae, student=var)
    other, _ = make_tiny_pair(0, num_classes=3)
    with pytest.raises(ValueError, match="3 classes but the teacher 5"):
        DDSampler(var, vae, student=DDStudent.from_teacher(other, t2=2))
    with pytest.raises(ValueError, match="more_smooth"):
        DDSampler(var, vae, student=student).sample(torch.tensor([0]), more_smooth=True)
    with pytest.raises(ValueError, match="draft='dd' needs a distilled-decoding student"):
        build_sampler("sjd", var=var, vae=vae, draft="dd")
    for one_step in ("1step", "0"):
        with pytest.raises(ValueError, match="dd\\+edit with one student step"):
            build_sampler("dd+edit", var=var, vae=vae, student=student, schedule=one_step)


def test_dd_draft_source_in_block_sjd_is_exact_greedy_and_counts_student_forwards(pair):
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2).eval()
    labels = torch.tensor([0, 3, 4])
    plain = build_sampler("default", var=var, vae=vae).sample(labels, seed=1, top_k=1, decode=False)
    sjd = build_sampler("sjd", var=var, vae=vae, student=student, draft="dd", window_scales=3, max_spec_tokens=16)
    out = sjd.sample(labels, seed=1, top_k=1, decode=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, out.tokens))
    assert out.stats.extra["draft_source"] == "dd"
    assert 1 <= out.stats.forwards["student"] <= out.stats.forwards["var"] <= var.num_scales


# ---- training job through train.py ---------------------------------------------------------------------------
DD_TOML = """
[dd]
teacher = "{teacher}"
tokenizer = "{tokenizer}"
data_dir = "{data}"
num_samples = 16
shard_size = 8
flow_steps = 8
top_k = 8
t2 = 2
loss_split = 2
[optim]
base_lr = 1e-3
batch_size = 4
warmup_steps = 1
ema_decay = 0.9
[train]
steps = 4
ckpt_every = 2
log_every = 1
sample_every = 1000
samples_per_class = 1
num_threads = 1
"""


class Interrupt(Exception):
    pass


def write_dd_config(tmp_path, var, vae):
    """The teacher and tokenizer files and a dd.toml pointing at them (data in tmp_path / "data")."""
    from training.checkpoint import save_model

    save_model(tmp_path / "teacher.safetensors", var)
    save_model(tmp_path / "tok.safetensors", vae)
    cfg_path = tmp_path / "dd.toml"
    cfg_path.write_text(DD_TOML.format(teacher=tmp_path / "teacher.safetensors", tokenizer=tmp_path / "tok.safetensors",
                                       data=tmp_path / "data"))
    return cfg_path


def test_train_py_dd_job_resumes_exactly_and_exports_a_loadable_student(tmp_path, pair, monkeypatch):
    import train
    from samplers.cli import load_models
    from training.checkpoint import load_model, read_metadata
    from samplers.dd.data import load_dd_config
    from training.trainer import Trainer

    var, vae = pair
    cfg_path = write_dd_config(tmp_path, var, vae)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'none'}"])
    dd = load_dd_config(str(cfg_path), [])
    generate(dd, *(load_model(tmp_path / n) for n in ("teacher.safetensors", "tok.safetensors")), show_progress=False)

    full = train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'full'}"])
    original = Trainer._train_step

    def dying_step(self, *args):
        if self.step == 3:
            raise Interrupt()
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(Interrupt):
        train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(Trainer, "_train_step", original)
    with pytest.raises(ValueError, match=r"config differs .* in \['dd'\]"):  # the [dd] table is the job's recipe
        train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'cut'}", "--resume",
                    "--set", "dd.cont_weight=3.0"])
    cut = train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'cut'}", "--resume"])
    a, b = load_model(full).state_dict(), load_model(cut).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["cont_head.weight"], DDStudent.from_teacher(var, t2=2).state_dict()["cont_head.weight"])
    log = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and {"ce", "mse", "acc_s0"} <= set(log[-1])
    assert read_metadata(full)["kind"] == "dd_student" and read_metadata(full)["extra"]["generation"]["top_k"] == 8

    # sample.py's loader hands the student to the dd sampler
    teacher, tok, extras = load_models(str(tmp_path / "teacher.safetensors"), str(tmp_path / "tok.safetensors"),
                                       [f"student={full}"], torch.device("cpu"))
    out = build_sampler("dd", var=teacher, vae=tok, **extras, schedule="2step").sample(torch.tensor([0, 1]), seed=0)
    assert isinstance(extras["student"], DDStudent) and out.stats.forwards == {"student": 2}


def test_dd_job_trains_at_the_configured_timesteps_and_scores_held_out_pairs(tmp_path, pair, monkeypatch):
    """dd.train_t: every row's timestep comes from the list; dd.val_samples: the last pairs are never trained on,
    and the logged val_t{t}_* are the exported student's metrics on them at each timestep."""
    import train
    import samplers.dd.job as job_module
    from training.checkpoint import load_model

    var, vae = pair
    cfg_path = write_dd_config(tmp_path, var, vae)
    generate(small_cfg(tmp_path, data_dir=str(tmp_path / "data"), num_samples=16, shard_size=8, seed=0, cfg=1.5,
                       top_k=8, flow_steps=8), var, vae, show_progress=False)
    seen_t, fetched = [], {True: set(), False: set()}
    real_loss, real_fetch = job_module.dd_loss, job_module.DDJob.fetch

    def recording_loss(forward, student, *args):
        if student.training:
            seen_t.extend(args[-2].tolist())
        return real_loss(forward, student, *args)

    def recording_fetch(self, indices, device):
        fetched[self.student.training].update(indices)
        return real_fetch(self, indices, device)

    monkeypatch.setattr(job_module, "dd_loss", recording_loss)
    monkeypatch.setattr(job_module.DDJob, "fetch", recording_fetch)
    with pytest.raises(ValueError, match="train_t must start at 0"):
        train.main(["dd", "--config", str(cfg_path), "--set", "dd.train_t=[1, 2]"])
    with pytest.raises(ValueError, match="below the teacher's 4 scales"):
        train.main(["dd", "--config", str(cfg_path), "--set", "dd.train_t=[0, 4]",
                    "--set", f"train.out_dir={tmp_path / 'bad'}"])
    out = train.main(["dd", "--config", str(cfg_path), "--set", "dd.train_t=[0, 1, 2]", "--set", "dd.val_samples=4",
                      "--set", "train.val_every=4", "--set", "optim.ema_decay=0", "--set", f"train.out_dir={tmp_path / 'v'}"])
    assert set(seen_t) == {0, 1, 2} and len(seen_t) == 4 * 4
    assert fetched[True] <= set(range(12)) and fetched[False] == set(range(12, 16))
    record = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["val_items"] == 4
    student, codebook = load_model(out), vae.quantize.embedding.weight.detach()
    labels, noise, tokens = DDDataset(tmp_path / "data").fetch(list(range(12, 16)), "cpu")
    for t in (0, 1, 2):
        _, metrics = real_loss(student, student, codebook, labels, noise, tokens, torch.full((4,), t), 1.0)
        assert record[f"val_t{t}_ce"] == pytest.approx(float(metrics["ce"]), rel=1e-5)
        assert record[f"val_t{t}_acc_s3"] == pytest.approx(float(metrics["acc_s3"]), abs=1e-6)
    assert "val_t2_acc_s1" not in record  # a data slot at t = 2 is not scored


def test_dd_job_continues_a_student_of_the_same_teacher_from_train_init_from(tmp_path, pair, monkeypatch):
    """train.init_from: the first training step sees the given student's weights, not the teacher's; a student of
    other teacher weights, with another t2, or a file of another kind is refused with a one-line error."""
    import train
    import samplers.dd.job as job_module
    from training.checkpoint import load_model, read_metadata, save_model

    var, vae = pair
    cfg_path = write_dd_config(tmp_path, var, vae)
    generate(small_cfg(tmp_path, data_dir=str(tmp_path / "data"), num_samples=16, shard_size=8, seed=0, cfg=1.5,
                       top_k=8, flow_steps=8), var, vae, show_progress=False)
    first = train.main(["dd", "--config", str(cfg_path), "--set", f"train.out_dir={tmp_path / 'a'}"])
    seen = []
    real_loss = job_module.dd_loss

    def recording_loss(forward, student, *args):
        if student.training and not seen:
            seen.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        return real_loss(forward, student, *args)

    monkeypatch.setattr(job_module, "dd_loss", recording_loss)
    train.main(["dd", "--config", str(cfg_path), "--set", f"train.init_from={first}",
                "--set", f"train.out_dir={tmp_path / 'b'}"])
    given = load_model(first).state_dict()
    assert seen[0].keys() == given.keys() and all(torch.equal(seen[0][k], given[k]) for k in given)
    assert not torch.equal(given["cont_head.weight"], DDStudent.from_teacher(var, t2=2).state_dict()["cont_head.weight"])

    other_teacher, _ = make_tiny_pair(4)
    save_model(tmp_path / "other.safetensors", DDStudent.from_teacher(other_teacher, t2=2, loss_split=2),
               extra={"teacher_fingerprint": "0" * 64})
    save_model(tmp_path / "t1.safetensors", DDStudent.from_teacher(var, t2=1, loss_split=2),
               extra={"teacher_fingerprint": read_metadata(first)["extra"]["teacher_fingerprint"]})
    for path, why in ((tmp_path / "other.safetensors", "other teacher weights"), (tmp_path / "t1.safetensors", "t2 = 1"),
                      (tmp_path / "teacher.safetensors", "holds a var checkpoint")):
        with pytest.raises(ValueError, match=why):
            train.main(["dd", "--config", str(cfg_path), "--set", f"train.init_from={path}",
                        "--set", f"train.out_dir={tmp_path / 'bad'}"])


def test_student_step_lists_generalise_the_1step_and_2step_schedules(pair):
    var, vae = pair
    student = DDStudent.from_teacher(var, t2=2).eval()
    labels, K = torch.tensor([0, 3]), var.num_scales
    kw = dict(seed=[5, 6], decode=False)
    one = DDSampler(var, vae, student=student, schedule="1step").sample(labels, **kw)
    two = DDSampler(var, vae, student=student, schedule="2step").sample(labels, **kw)
    for steps, ref in (("0", one), ("0,2", two)):
        out = DDSampler(var, vae, student=student, schedule=steps).sample(labels, **kw)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref.tokens)) and torch.equal(out.f_hat, ref.f_hat)
    many = DDSampler(var, vae, student=student, schedule=",".join(map(str, range(K)))).sample(labels, **kw)
    assert many.stats.forwards == {"student": K} and many.stats.extra["steps"] == list(range(K))
    with pytest.raises(ValueError, match="strictly increasing from 0"):
        DDSampler(var, vae, student=student, schedule="1,3")
    split = DDSampler(var, vae, student=student, loss_split=0).sample(labels, **kw)
    assert split.stats.extra["continuous_scales"] == list(range(K))
