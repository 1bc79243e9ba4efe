"""VAR token modes: streamed tokens equal cached ones batch for batch without augmentation, streamed tokens
with augmentation are those of the transformed images, the mode resolution and its refusal, validation
metrics against an independent cross-entropy, CoDe jobs on both modes, unreadable images in the cache build."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
try:
    from tests.test_training import TINY_VAE, write_var_config
except ImportError:  # tests/ without __init__.py
    from test_training import TINY_VAE, write_var_config
from samplers.code.training import CoDeDrafterJob, CoDeTrainConfig, drafter_loss
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_any, load_model, save_model
from training.config import DataConfig
from training.data import build_datasets
from training.loader import StepBatchSampler
from training.transforms import sample_generator
from training.var_job import AUTO_CACHE_MAX_ITEMS, VARJob, resolve_token_mode

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_model(path, VQVAE(VQVAEConfig(**TINY_VAE)))
    return path


@pytest.fixture
def cfg_path(tmp_path, tokenizer):
    return write_var_config(tmp_path, tokenizer, cond_drop=0.2)


def build(cfg_path, tmp_path, *overrides, job_cls=VARJob, **kw):
    cfg, table = train.load_train_config("var", str(cfg_path), [f"train.out_dir={tmp_path / 'run'}", *overrides])
    dataset, val = build_datasets(cfg.data, seed=cfg.train.seed)
    vae = load_any(cfg.train.tokenizer, "vqvae")
    var_cfg = train.build_var_config(table, vae, len(dataset.classes), "[var]")
    torch.manual_seed(0)
    return job_cls(cfg, var_cfg, dataset, CPU, True, val_dataset=val, **kw)


def batches(job, steps: int, start: int = 0):
    """What the trainer's DataLoader feeds the steps [start, steps): prepared micro-batches, in order."""
    c = job.cfg
    sampler = StepBatchSampler(job.num_items(), c.optim.batch_size, c.optim.grad_accum, 1, 0, c.train.seed, start, steps)
    loader = torch.utils.data.DataLoader(job.loader_dataset(), batch_sampler=sampler, collate_fn=job.collate)
    return [(keys, job.prepare_batch(b, CPU)) for keys, b in zip(list(sampler), loader)]


def direct_tokens(job, images_B3HW):
    with torch.no_grad():
        return torch.cat(job.vae.img_to_tokens(images_B3HW), dim=1)


# ---- which mode ---------------------------------------------------------------------------------------
def test_token_mode_resolution_and_the_refusal_to_cache_random_crops():
    plain, crop = DataConfig(kind="procedural"), DataConfig(kind="procedural", mid_reso=1.125, random_crop=True)
    flip, centre = DataConfig(kind="procedural", hflip=True), DataConfig(kind="procedural", mid_reso=1.125)
    assert resolve_token_mode(plain, "auto", 48) == "cache" and resolve_token_mode(centre, "auto", 48) == "cache"
    assert resolve_token_mode(plain, "auto", AUTO_CACHE_MAX_ITEMS) == "cache"
    assert resolve_token_mode(plain, "auto", AUTO_CACHE_MAX_ITEMS + 1) == "stream"
    assert resolve_token_mode(crop, "auto", 48) == resolve_token_mode(flip, "auto", 48) == "stream"
    assert resolve_token_mode(plain, "stream", 48) == "stream" and resolve_token_mode(plain, "cache", 10**7) == "cache"
    # a random crop at mid_reso = 1 still moves along the longer side of a non-square image
    square_crop = DataConfig(kind="procedural", random_crop=True)
    assert resolve_token_mode(square_crop, "auto", 48) == "stream"
    for augmented in (crop, flip, square_crop):
        with pytest.raises(ValueError, match=r"^train.tokens = 'cache' with an augmented data config .*tokens of random "
                                             r"crops cannot be cached; set train.tokens = 'stream' or 'auto'$"):
            resolve_token_mode(augmented, "cache", 48)


def test_cache_mode_with_augmentation_fails_before_any_encoding(cfg_path, tmp_path):
    with pytest.raises(ValueError, match=r"tokens of random crops cannot be cached"):
        build(cfg_path, tmp_path, "train.tokens=cache", "data.hflip=true")
    assert not (tmp_path / "run").exists()


# ---- stream == cache ----------------------------------------------------------------------------------
def test_streamed_tokens_equal_cached_tokens_batch_for_batch(cfg_path, tmp_path):
    cached = build(cfg_path, tmp_path, "train.tokens=cache")
    streamed = build(cfg_path, tmp_path, "train.tokens=stream")
    assert cached.token_mode == "cache" and streamed.token_mode == "stream" and streamed.tokens is None
    steps = 8  # 48 items / 8 per step: the run crosses into a second epoch
    a, b = batches(cached, steps), batches(streamed, steps)
    assert len(a) == len(b) == steps
    for (keys, (flat_c, lab_c)), (keys_s, (flat_s, lab_s)) in zip(a, b):
        assert keys == keys_s and flat_c.dtype == flat_s.dtype == torch.long
        assert torch.equal(flat_c, flat_s) and torch.equal(lab_c, lab_s)
        indices = [i for i, _ in keys]
        # independent truth: the tokenizer on the data set's own images, and the pre-loader fetch path
        images = torch.stack([cached.dataset[i][0] for i in indices])
        assert torch.equal(flat_c, direct_tokens(cached, images))
        assert lab_c.tolist() == [cached.dataset[i][1] for i in indices]
        fetched = cached.fetch(indices, CPU)
        assert torch.equal(fetched[0], flat_c) and torch.equal(fetched[1], lab_c)
    # and the loss the trainer computes from them is the same number
    torch.manual_seed(1)
    loss_c = cached.loss(a[0][1], 0)[0]
    torch.manual_seed(1)
    loss_s = streamed.loss(b[0][1], 0)[0]
    assert torch.equal(loss_c, loss_s)


def test_stream_with_augmentation_encodes_the_transformed_images(cfg_path, tmp_path):
    job = build(cfg_path, tmp_path, "data.mid_reso=1.5", "data.random_crop=true", "data.hflip=true")
    assert job.token_mode == "stream" and job.tokens is None
    S, mid = job.cfg.data.image_size, round(1.5 * job.cfg.data.image_size)
    samples = job.loader_dataset()
    differs = 0
    for i in (0, 5, 11):
        raw, label = job.dataset.load_raw(i)
        resized = np.asarray(Image.fromarray(np.repeat(raw, 3, axis=-1)).resize((mid, mid), Image.Resampling.LANCZOS))
        per_epoch = []
        for epoch in (0, 1, 2):
            top, left, flip = job.transform.params(mid, mid, sample_generator(job.cfg.train.seed, epoch, i))
            crop = torch.from_numpy(resized[top: top + S, left: left + S].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
            crop = crop.flip(-1) if flip else crop
            flat, labels = job.prepare_batch(job.collate([samples[(i, epoch)]]), CPU)
            assert torch.equal(flat, direct_tokens(job, crop[None])) and labels.tolist() == [label]
            per_epoch.append(flat)
        differs += not all(torch.equal(per_epoch[0], t) for t in per_epoch[1:])
    assert differs > 0  # the augmentation really changes the tokens between epochs


def test_encoding_ignores_an_enclosing_autocast(cfg_path, tmp_path):
    job = build(cfg_path, tmp_path, "train.tokens=stream")
    batch = job.collate([job.loader_dataset()[(i, 0)] for i in range(8)])
    plain = job.prepare_batch(batch, CPU)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(job.prepare_batch(batch, CPU)[0], plain)


# ---- validation ---------------------------------------------------------------------------------------
def test_val_metrics_equal_an_independent_cross_entropy(cfg_path, tmp_path):
    job = build(cfg_path, tmp_path, "data.val_fraction=0.25", "train.label_smoothing=0.1")
    val = job.val_dataset()
    assert len(val) == 12 and len(job.dataset) == 36 and job.num_items() == 36
    flat, labels = job.prepare_batch(job.collate([val[(i, 0)] for i in range(len(val))]), CPU)
    images = torch.stack([job.val_split[i][0] for i in range(len(val))])  # eval transform: the plain images
    assert torch.equal(flat, direct_tokens(job, images))
    job.model.eval()
    metrics = job.val_metrics((flat, labels))
    assert job.val_metrics((flat, labels)) == metrics  # eval mode: no condition dropout, deterministic
    with torch.no_grad():
        sizes = [p * p for p in job.patch_nums]
        x_tf = job.vae.teacher_forcing_input(list(flat.split(sizes, dim=1)))
        logits = job.model(labels, x_tf).double()
    # CE by hand: -log softmax at the target, mean over all B x L tokens (no label smoothing)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    ce = -logp.gather(-1, flat[..., None]).mean()
    assert metrics["loss"] == pytest.approx(float(ce), rel=1e-5)
    start = 0
    for si, n in enumerate(sizes):
        hits = sum(int(logits[b, start + t].argmax() == flat[b, start + t]) for b in range(len(flat)) for t in range(n))
        assert metrics[f"acc_s{si}"] == pytest.approx(hits / (len(flat) * n))
        start += n
    assert set(metrics) == {"loss"} | {f"acc_s{si}" for si in range(len(sizes))}


def test_no_validation_split_means_no_val_dataset(cfg_path, tmp_path):
    assert build(cfg_path, tmp_path).val_dataset() is None


# ---- CoDe jobs on both modes ------------------------------------------------------------------------
def test_code_drafter_job_runs_on_cached_and_streamed_tokens(cfg_path, tmp_path):
    code = CoDeTrainConfig(draft_scales=2)
    jobs = [build(cfg_path, tmp_path, f"train.tokens={mode}", job_cls=CoDeDrafterJob, code=code)
            for mode in ("cache", "stream")]
    (keys, batch_c), = batches(jobs[0], 1)
    (_, batch_s), = batches(jobs[1], 1)
    assert torch.equal(batch_c[0], batch_s[0])
    losses = []
    for job, b in zip(jobs, (batch_c, batch_s)):
        torch.manual_seed(1)  # the same condition dropout draw
        losses.append(job.loss(b, 0)[0])
    assert torch.equal(losses[0], losses[1])
    with torch.no_grad():
        x_tf = jobs[0].vae.teacher_forcing_input(list(batch_c[0].split([p * p for p in jobs[0].patch_nums], dim=1)))
        jobs[0].model.eval()
        expect = drafter_loss(jobs[0].model(batch_c[1], x_tf), batch_c[0], jobs[0].patch_nums, 2)
        assert torch.allclose(jobs[0].loss(batch_c, 0)[0], expect)


# ---- unreadable images --------------------------------------------------------------------------------
def image_folder(root, n_per_class=8, size=8):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    (root / "b" / "3.png").write_bytes(b"not a png")
    return root / "b" / "3.png"


def test_an_unreadable_image_in_the_cache_build_names_the_file_or_is_skipped(cfg_path, tmp_path):
    bad = image_folder(tmp_path / "imgs")
    folder = ("data.kind=image_folder", f"data.root={tmp_path / 'imgs'}", "train.tokens=cache")
    with pytest.raises(ValueError, match=rf"^cannot read image {bad}: .*set data.skip_corrupt = true"):
        build(cfg_path, tmp_path, *folder, f"train.token_cache={tmp_path / 'c1'}")
    job = build(cfg_path, tmp_path, *folder, "data.skip_corrupt=true", f"train.token_cache={tmp_path / 'c2'}")
    index = job.dataset.items.index((bad, 1))
    stand_in = torch.stack([job.dataset[index + 1][0]])  # the next readable file stands in
    assert torch.equal(job.tokens[0][index].long(), direct_tokens(job, stand_in)[0])


# ---- through the trainer --------------------------------------------------------------------------------
def test_a_streamed_run_equals_a_cached_run_and_logs_validation(tmp_path, tokenizer):
    """8 steps (two epochs' worth of batches) through train.py: the same log and bitwise the same weights."""
    cfg = write_var_config(tmp_path, tokenizer, steps=8, cond_drop=0.2)
    logs, weights = {}, {}
    for mode in ("cache", "stream"):
        out = tmp_path / mode
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={out}", "--set", f"train.tokens={mode}",
                    "--set", "data.val_fraction=0.25", "--set", "train.val_every=4"])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[mode] = [{k: v for k, v in r.items() if k == "step" or "loss" in k or "acc" in k or k == "grad_norm"}
                      for r in records]
        weights[mode] = load_model(out / "var.safetensors").state_dict()
    assert logs["cache"] == logs["stream"]
    val = [r for r in logs["cache"] if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8] and all(math.isfinite(r["val_loss"]) for r in val)
    assert all(torch.equal(weights["cache"][k], weights["stream"][k]) for k in weights["cache"])
    assert (tmp_path / "cache" / "token_cache.safetensors.json").exists()
    assert not (tmp_path / "stream" / "token_cache.safetensors.json").exists()


def test_val_batches_count_global_batches(tmp_path, tokenizer):
    """train.val_batches = 1 scores one global batch (8 items) with or without gradient accumulation, and the
    same validation loss (the model is the same after one step: accumulation does not change a step)."""
    cfg = write_var_config(tmp_path, tokenizer, steps=1)
    logs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={out}", "--set", f"optim.grad_accum={accum}",
                    "--set", "data.val_fraction=0.5", "--set", "train.val_every=1", "--set", "train.val_batches=1"])
        logs[accum] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_" in line]
    assert [r["val_items"] for r in logs[1]] == [r["val_items"] for r in logs[2]] == [8]
    assert logs[1][0]["val_loss"] == pytest.approx(logs[2][0]["val_loss"], rel=1e-5)
