"""CoDe sampler: exactness against the default sampler, one-shot prefill, counters; CoDe training losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax, rel_entr

from samplers import DefaultSampler, build_sampler
from samplers.code.sampler import CoDeSampler
from samplers.scalekv.policies import peak_cache_len, scale_lengths
from samplers.engine import ScaleState as GenerationState, conditions as conditions_for, embed_scales
from tokenizers import VQVAE, VQVAEConfig
from var import VAR
from samplers.code.training import distillation_loss, drafter_loss, kd_lambda, scale_weights
from var.config import VARConfig

PN = (1, 2, 3, 4, 5, 6)
K = len(PN)


def tiny_var(seed: int, depth: int = 2, dim: int = 64, heads: int = 4, patch_nums=PN, vocab: int = 32) -> VAR:
    torch.manual_seed(seed)
    model = VAR(VARConfig(num_classes=10, depth=depth, embed_dim=dim, num_heads=heads, patch_nums=patch_nums,
                          vocab_size=vocab, z_channels=8, cond_drop_rate=0.0, drop_path_rate=0.0))
    with torch.no_grad():  # move away from the tiny init (gammas 1e-5) so attention matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PN)).eval()
    return vae, tiny_var(1), tiny_var(2, depth=3, dim=48)


LABELS = torch.tensor([1, 4, 7])
SAMPLING = [dict(cfg=1.5, top_k=10, top_p=0.9, temperature=[1.1] * 3 + [1.0] * 3),
            dict(cfg=2.0, top_k=0, top_p=0.0, temperature=1.0, more_smooth=True)]


def same_tokens(a, b) -> bool:
    return len(a.tokens) == len(b.tokens) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


@pytest.mark.parametrize("args", SAMPLING)
def test_full_draft_with_drafter_as_refiner_is_the_default_sampler(models, args):
    vae, drafter, _ = models
    ref = DefaultSampler(drafter, vae).sample(LABELS, seed=5, **args)
    out = CoDeSampler(drafter, vae, refiner=drafter, draft_scales=K).sample(LABELS, seed=5, **args)
    assert same_tokens(ref, out)
    assert torch.equal(ref.f_hat, out.f_hat) and torch.equal(ref.images, out.images)
    assert out.stats.forwards == {"drafter": K}


@pytest.mark.parametrize("args", SAMPLING)
def test_zero_draft_scales_is_the_refiner_alone(models, args):
    vae, drafter, refiner = models
    ref = DefaultSampler(refiner, vae).sample(LABELS, seed=9, **args)
    out = CoDeSampler(drafter, vae, refiner=refiner, draft_scales=0).sample(LABELS, seed=9, **args)
    assert same_tokens(ref, out) and torch.equal(ref.f_hat, out.f_hat)
    assert out.stats.forwards == {"refiner": K}
    assert out.stats.kv_bytes_per_scale == ref.stats.kv_bytes_per_scale


@pytest.mark.parametrize("N", [1, 3, 5])
def test_one_shot_prefill_equals_scale_by_scale_teacher_forcing(models, N):
    vae, drafter, refiner = models
    drafted = DefaultSampler(drafter, vae).sample(LABELS, seed=1, cfg=1.5, top_k=10)
    x_tf = vae.quantize.teacher_forcing_input(drafted.tokens)  # inputs of scales 1..K-1, (B, L-1, Cvae)
    ends = scale_lengths(PN)
    state = GenerationState(f_hat=drafted.f_hat, inputs=[None] + [x_tf[:, e - 1: ends[si + 1] - 1] for si, e in enumerate(ends[:-1])])
    cond = conditions_for(refiner, LABELS)
    with torch.no_grad():
        one_cache = refiner.new_cache()
        hidden = refiner.run_blocks(embed_scales(refiner, cond, state, 0, N + 1), cond, one_cache, 0)
        one_shot = refiner.logits(hidden[:, -PN[N] ** 2:], cond)
        step_cache = refiner.new_cache()
        for si in range(N + 1):
            step = refiner.logits(refiner.run_blocks(embed_scales(refiner, cond, state, si, si + 1), cond, step_cache, si), cond)
        full = refiner(torch.cat((LABELS, torch.full_like(LABELS, 10))), x_tf.repeat(2, 1, 1))  # no cache at all
    torch.testing.assert_close(one_shot, step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_shot, full[:, ends[N] - PN[N] ** 2: ends[N]], atol=1e-5, rtol=1e-5)
    for layer in range(refiner.depth):
        torch.testing.assert_close(one_cache.keys[layer], step_cache.keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_cache.values[layer], step_cache.values[layer], atol=1e-5, rtol=1e-5)


def test_drafter_as_refiner_greedy_matches_default_for_every_split(models):
    """With one model and greedy picks, any N gives the default tokens: the refiner phase uses the global
    scale index for the CFG ramp and temperature (a per-model index would change the guided logits)."""
    vae, drafter, _ = models
    args = dict(cfg=3.0, top_k=1, temperature=[1.3, 1.2, 1.1, 1.0, 0.9, 0.8])
    ref = DefaultSampler(drafter, vae).sample(LABELS, seed=0, **args)
    for N in range(1, K):
        assert same_tokens(ref, CoDeSampler(drafter, vae, refiner=drafter, draft_scales=N).sample(LABELS, seed=0, **args))


def test_counters_and_freed_drafter_cache(models):
    vae, drafter, refiner = models
    N, B = 3, len(LABELS)
    out = CoDeSampler(drafter, vae, refiner=refiner, draft_scales=N).sample(LABELS, seed=2, cfg=1.5, top_k=10)
    ends = scale_lengths(PN)
    s = out.stats
    assert s.forwards == {"drafter": N, "refiner": K - N}
    assert s.tokens_processed == {"drafter": 2 * B * ends[N - 1], "refiner": 2 * B * ends[-1]}

    def kv_bytes(model, length):  # keys + values, fp32, 2B rows
        return 2 * model.depth * 2 * B * model.embed_dim * length * 4

    expected = [kv_bytes(drafter, ends[si]) for si in range(N)] + [kv_bytes(refiner, ends[si]) for si in range(N, K)]
    assert s.kv_bytes_per_scale == expected  # after the hand-over only the refiner's cache is held
    assert s.kv_bytes_peak == max(expected)
    assert s.extra["kv_bytes_peak_drafter"] == kv_bytes(drafter, ends[N - 1])
    assert s.wall_time_s > 0 and s.cuda_max_memory_allocated is None
    assert [t.shape for t in out.tokens] == [(B, p * p) for p in PN]


def test_composes_with_kv_compression(models):
    vae, drafter, refiner = models
    plain = CoDeSampler(drafter, vae, refiner=refiner, draft_scales=2).sample(LABELS, seed=4, cfg=1.5, top_k=10)
    loose = CoDeSampler(drafter, vae, refiner=refiner, draft_scales=2, kv_policy="snapkv", kv_budget_frac=1.0)
    assert same_tokens(plain, loose.sample(LABELS, seed=4, cfg=1.5, top_k=10))
    tight = CoDeSampler(drafter, vae, refiner=refiner, draft_scales=2, kv_policy="window", kv_budget_frac=0.4)
    out = tight.sample(LABELS, seed=4, cfg=1.5, top_k=10)
    budget = round(0.4 * peak_cache_len(PN))
    after = {r["scale"]: r["after"] for r in out.stats.extra["kv_len_per_layer"]}
    assert after[3] == [budget] * refiner.depth and after[4] == [budget] * refiner.depth
    assert out.stats.kv_bytes_peak < plain.stats.kv_bytes_peak


def test_registry_and_bad_arguments(models):
    vae, drafter, refiner = models
    assert isinstance(build_sampler("code", var=drafter, vae=vae, refiner=refiner, draft_scales=2), CoDeSampler)
    with pytest.raises(ValueError, match="draft_scales"):
        CoDeSampler(drafter, vae, refiner=refiner, draft_scales=K + 1)
    with pytest.raises(ValueError, match="refiner"):
        CoDeSampler(drafter, vae, refiner=tiny_var(3, vocab=16), draft_scales=2)
    with pytest.raises(ValueError, match="calibration"):
        CoDeSampler(drafter, vae, refiner=refiner, kv_policy="scalekv")


# ---- training losses on a 3-scale toy ----------------------------------------------------------------
TOY = (1, 2, 3)  # 1 + 4 + 9 = 14 positions


def toy_batch(seed=0, B=2, V=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 14, V, generator=g), torch.randint(0, V, (B, 14), generator=g)


def test_drafter_loss_ignores_scales_from_n_on():
    logits, targets = toy_batch()
    N = 2  # scales 0, 1 -> positions 0..4
    loss = drafter_loss(logits, targets, TOY, N)
    manual = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 7), targets[:, :5].reshape(-1))
    torch.testing.assert_close(loss, manual)
    logits2, targets2 = logits.clone(), targets.clone()
    logits2[:, 5:] = torch.randn_like(logits2[:, 5:]) * 50
    targets2[:, 5:] = (targets2[:, 5:] + 1) % 7
    assert torch.equal(drafter_loss(logits2, targets2, TOY, N), loss)
    leaf = logits.clone().requires_grad_(True)
    drafter_loss(leaf, targets, TOY, N).backward()
    assert leaf.grad[:, 5:].abs().sum() == 0 and leaf.grad[:, :5].abs().sum() > 0
    with pytest.raises(ValueError, match="draft_scales"):
        drafter_loss(logits, targets, TOY, 0)


def test_lambda_schedule_and_scale_weights():
    assert kd_lambda(0, 10) == 1.0 and kd_lambda(10, 10) == 0.0 and kd_lambda(15, 10) == 0.0
    assert kd_lambda(2.5, 10) == pytest.approx(0.75)
    lams = [kd_lambda(e, 4) for e in range(5)]
    assert lams == sorted(lams, reverse=True) and np.allclose(np.diff(lams), -0.25)
    w = scale_weights(TOY, draft_scales=2, lam=0.3)
    assert w.tolist() == pytest.approx([0.3] * 5 + [1.0] * 9)
    assert scale_weights(TOY, 0, 0.3).tolist() == [1.0] * 14
    with pytest.raises(ValueError):
        kd_lambda(1, 0)


def test_distillation_is_forward_kl_with_time_varying_weights():
    student, _ = toy_batch(1)
    teacher, _ = toy_batch(2)
    lam, N = 0.4, 1
    loss = distillation_loss(student, teacher, TOY, N, lam)
    # independent truth: scipy rel_entr(p_teacher, p_student) summed over the vocabulary = KL(teacher || student)
    p_t = np.exp(np_log_softmax(teacher.double().numpy(), axis=-1))
    p_s = np.exp(np_log_softmax(student.double().numpy(), axis=-1))
    kl_BL = rel_entr(p_t, p_s).sum(-1)
    w = np.array([lam] * 1 + [1.0] * 13)
    assert float(loss) == pytest.approx((kl_BL * w).sum() / kl_BL.size, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, TOY, N, lam)) == pytest.approx(0.0, abs=1e-6)
    # lambda = 0: the drafting scales no longer matter at all
    moved = student.clone()
    moved[:, :1] += torch.randn_like(moved[:, :1]) * 10
    assert torch.equal(distillation_loss(moved, teacher, TOY, N, 0.0), distillation_loss(student, teacher, TOY, N, 0.0))


# ---- the jobs with the standard trainer ----------------------------------------------------------------
JOB_TOML = """
[var]
depth = 2
embed_dim = 32
num_heads = 2
num_classes = 4
drop_path_rate = 0.0
[data]
kind = "procedural"
image_size = 8
num_samples = 16
num_classes = 4
[optim]
base_lr = 1e-2
batch_size = 8
warmup_steps = 1
[train]
steps = 2
tokenizer = "{tok}"
init_from = "{init}"
out_dir = "{out}"
log_every = 1
sample_every = 1000
ckpt_every = 1000
num_threads = 1
"""


def test_code_jobs_run_with_the_standard_trainer(tmp_path):
    import json

    from training.checkpoint import load_model, save_model
    import train

    toy_pn = (1, 2, 3, 4)
    torch.manual_seed(0)
    tok = save_model(tmp_path / "tok.safetensors", VQVAE(VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2),
                                                                      num_res_blocks=1, patch_nums=toy_pn)))

    def saved_var(name, seed, depth):
        torch.manual_seed(seed)
        cfg = VARConfig(num_classes=4, depth=depth, embed_dim=32, num_heads=2, patch_nums=toy_pn, vocab_size=32,
                        z_channels=8, drop_path_rate=0.0)
        return save_model(tmp_path / name, VAR(cfg))

    init, teacher = saved_var("init.safetensors", 1, 2), saved_var("teacher.safetensors", 2, 3)
    cfg = tmp_path / "job.toml"
    cfg.write_text(JOB_TOML.format(tok=tok, init=init, out=tmp_path / "d"))
    train.main(["code_drafter", "--config", str(cfg), "--set", "code.draft_scales=2"])
    before, after = load_model(init).state_dict(), load_model(tmp_path / "d" / "var_drafter.safetensors").state_dict()
    # scales >= N get no gradient at all: their level rows and positional rows (positions 5..29) stay bitwise
    assert torch.equal(after["lvl_embed.weight"][2:], before["lvl_embed.weight"][2:])
    assert torch.equal(after["pos_1LC"][:, 5:], before["pos_1LC"][:, 5:])
    assert not torch.equal(after["lvl_embed.weight"][:2], before["lvl_embed.weight"][:2])
    assert not torch.equal(after["pos_1LC"][:, :5], before["pos_1LC"][:, :5])

    cfg.write_text(JOB_TOML.format(tok=tok, init=init, out=tmp_path / "r"))
    train.main(["code_refiner", "--config", str(cfg), "--set", "code.draft_scales=2", "--set", f"code.teacher={teacher}"])
    log = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kd_lambda"] for r in log] == [1.0, 0.5] and all(r["loss"] > 0 for r in log)
    assert (tmp_path / "r" / "var_refiner.safetensors").exists()
    with pytest.raises(ValueError, match="teacher"):
        train.main(["code_refiner", "--config", str(cfg), "--set", "code.draft_scales=2",
                    "--set", f"train.out_dir={tmp_path / 'x'}"])
    with pytest.raises(KeyError, match="unknown key"):
        train.main(["code_drafter", "--config", str(cfg), "--set", "code.draft_scale=2"])
    for bad, message in (("code.kd_temperature=0.0", "kd_temperature must be a finite number > 0"),
                         ("code.kd_temperature=-1.0", "kd_temperature must be a finite number > 0"),
                         ("code.lambda_steps=-5", "lambda_steps must be an integer >= 0"),
                         ("code.draft_scales=-1", "draft_scales must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            train.main(["code_refiner", "--config", str(cfg), "--set", bad, "--set", f"code.teacher={teacher}",
                        "--set", f"train.out_dir={tmp_path / 'y'}"])
    with pytest.raises(FileNotFoundError, match="code.teacher = .*missing.safetensors does not exist"):
        train.main(["code_refiner", "--config", str(cfg), "--set", "code.draft_scales=2", "--set",
                    f"code.teacher={tmp_path / 'missing.safetensors'}", "--set", f"train.out_dir={tmp_path / 'y'}"])
    # a bad N is refused before the job tokenises anything: no token cache, no run folder
    with pytest.raises(ValueError, match="draft_scales"):
        train.main(["code_drafter", "--config", str(cfg), "--set", "code.draft_scales=99",
                    "--set", f"train.out_dir={tmp_path / 'z'}"])
    assert not (tmp_path / "z").exists()
