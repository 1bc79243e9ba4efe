"""The data pipeline (training/loader.py, training/data.py splits): the step -> sample order against a
plain re-implementation of the trainer's stateful formula, resume and rank sharding, workers = 2 against
workers = 0 (bitwise, with augmentation), corrupt files in workers, the held-out split."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DataConfig
from training.data import ImageFolder, ProceduralShapes, build_datasets
from training.loader import ImageSamples, SkipCounter, StepBatchSampler, ValSampler, collate_images, make_loader
from training.transforms import VARTransform


def reference_order(num_items, global_batch, grad_accum, world, rank, seed, steps):
    """The trainer's data order as it was written before the loader (stateful epoch / pos, randperm per
    epoch, micro-batch slices): [(step, micro-batch keys, (epoch, pos) after the step)]."""
    epoch, pos, out = 0, 0, []
    m = global_batch // (world * grad_accum)
    for step in range(steps):
        if pos + global_batch > num_items:
            epoch, pos = epoch + 1, 0
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        batch = perm[pos: pos + global_batch].tolist()
        pos += global_batch
        for i in range(grad_accum):
            out.append((step, [(j, epoch) for j in batch[(i * world + rank) * m: (i * world + rank + 1) * m]],
                        (epoch, pos)))
    return out


CASES = [  # (N, B, accum, world, seed, steps): epoch boundaries with and without a dropped tail
    (10, 4, 1, 1, 0, 9), (10, 4, 2, 2, 3, 7), (12, 6, 3, 2, 1, 8), (7, 7, 1, 1, 5, 4), (33, 8, 2, 4, 2, 11),
]


@pytest.mark.parametrize("case", CASES)
def test_step_batches_equal_the_trainers_formula_and_resume_is_the_tail(case):
    n, b, accum, world, seed, steps = case
    for rank in range(world):
        ref = reference_order(n, b, accum, world, rank, seed, steps)
        full = StepBatchSampler(n, b, accum, world, rank, seed, 0, steps)
        assert list(full) == [keys for _, keys, _ in ref] and len(full) == steps * accum
        for step, _, state in ref[accum - 1:: accum]:
            assert full.epoch_pos(step + 1) == state  # the saved data position after step + 1 steps
        for start in range(steps + 1):
            resumed = StepBatchSampler(n, b, accum, world, rank, seed, start, steps)
            assert list(resumed) == [keys for s, keys, _ in ref if s >= start] and len(resumed) == (steps - start) * accum


def test_two_ranks_together_read_the_one_rank_global_batches():
    n, b, accum, steps = 30, 8, 2, 9
    one = StepBatchSampler(n, b, 1, 1, 0, 4, 0, steps)
    ranks = [StepBatchSampler(n, b, accum, 2, r, 4, 0, steps) for r in range(2)]
    for step in range(steps):
        (global_batch,) = one.micro_batches(step)
        parts = [ranks[r].micro_batches(step) for r in range(2)]
        # micro-batch i of rank r is global slot i * world + r
        stitched = [key for i in range(accum) for r in range(2) for key in parts[r][i]]
        assert stitched == global_batch and len(set(global_batch)) == b


def test_bad_sampler_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="divisible by processes x grad_accum = 2 x 3"):
        StepBatchSampler(100, 8, 3, 2, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(5, 8, 1, 1, 0, 0, 0, 1)


def _folder(root, n_per_class=(5, 4), sizes=((20, 26), (23, 19), (18, 30))):
    rng = np.random.default_rng(0)
    k = 0
    for c, count in zip(("ant", "bee"), n_per_class):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = sizes[k % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(root / c / f"{i}.png")
            k += 1
    return root


def _batches(samples, sampler, workers):
    loader = make_loader(samples, sampler, collate_images, num_workers=workers, persistent_workers=False,
                         prefetch_factor=2, seed=0)
    return list(loader)


def test_two_workers_give_bitwise_the_batches_of_none_with_augmentation(tmp_path):
    ds = ImageFolder(_folder(tmp_path / "data"), 16)
    t = VARTransform(16, mid_reso=1.125, random_crop=True, hflip=True)
    samples = ImageSamples(ds, t, seed=3)
    sampler = StepBatchSampler(len(ds), 4, 2, 1, 0, 3, 0, 4)
    inline, workers = _batches(samples, sampler, 0), _batches(samples, sampler, 2)
    assert len(inline) == len(workers) == 8
    for a, b, keys in zip(inline, workers, sampler):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
        assert a["labels"].tolist() == [ds.items[i][1] for i, _ in keys] and a["skipped"] == 0
    # augmentation is on: the same item differs between epochs, and from its eval image
    ev = ImageSamples(ds, t, seed=3, train=False)
    assert any(not torch.equal(samples[(0, e)][0], ev[(0, 0)][0]) for e in range(3))


def test_make_loader_leaves_the_global_rng_alone(tmp_path):
    ds = ProceduralShapes(16, 8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _batches(ImageSamples(ds, VARTransform(8), seed=0), StepBatchSampler(16, 4, 1, 1, 0, 0, 0, 3), 0)
    assert torch.equal(before, torch.get_rng_state())


def test_unaugmented_samples_are_the_datasets_own_images(tmp_path):
    for ds in (ProceduralShapes(12, 8, seed=2), ImageFolder(_folder(tmp_path / "d"), 16)):
        samples = ImageSamples(ds, VARTransform(ds[0][0].shape[-1]), seed=0)
        batch = collate_images([samples[(i, 5)] for i in range(len(ds))])
        assert torch.equal(batch["images"], torch.stack([ds[i][0] for i in range(len(ds))]))
        assert batch["labels"].tolist() == [ds[i][1] for i in range(len(ds))]


def _with_corrupt(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "ant" / "1.png").write_bytes(b"not a png")
    good = (root / "bee" / "2.png").read_bytes()
    (root / "bee" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    return root


def test_corrupt_file_in_a_worker_is_one_line_naming_the_file(tmp_path):
    ds = ImageFolder(_with_corrupt(tmp_path), 16)
    sampler = StepBatchSampler(len(ds), 9, 1, 1, 0, 0, 0, 1)  # one batch holding every item
    for workers in (0, 2):
        with pytest.raises(ValueError) as info:
            _batches(ImageSamples(ds, VARTransform(16), seed=0), sampler, workers)
        msg = str(info.value)
        assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg
        assert ("1.png" in msg or "2.png" in msg) and "data.skip_corrupt" in msg


def test_skip_corrupt_substitutes_the_next_readable_item_and_counts(tmp_path):
    ds = ImageFolder(_with_corrupt(tmp_path), 16)
    bad = {i for i, (p, _) in enumerate(ds.items) if p.name in ("1.png",) and p.parent.name == "ant"
           or p.name == "2.png" and p.parent.name == "bee"}
    samples = ImageSamples(ds, VARTransform(16), seed=0, skip_corrupt=True)
    sampler = StepBatchSampler(len(ds), 3, 1, 1, 0, 1, 0, 9)  # 3 epochs: every bad file is met 3 times
    counter = SkipCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for keys, batch in zip(sampler, _batches(samples, sampler, 2)):
            assert counter.update(batch) == batch["skipped"] == sum(i in bad for i, _ in keys)
            for row, (i, _) in enumerate(keys):
                j = next(k % len(ds) for k in range(i, i + len(ds)) if k % len(ds) not in bad)
                assert torch.equal(batch["images"][row], ds[j][0]) and batch["labels"][row] == ds.items[j][1]
    assert counter.total == 3 * len(bad)  # counted per substitution, warned once per file
    warned = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(warned) == len(bad) == 2
    assert any("ant/1.png" in m for m in warned) and any("bee/2.png" in m for m in warned)


def test_val_fraction_split_is_disjoint_deterministic_and_keeps_the_interface():
    cfg = DataConfig(kind="procedural", num_samples=40, image_size=8, val_fraction=0.15)
    train, val = build_datasets(cfg, seed=7)
    assert len(val) == math.ceil(0.15 * 40) and len(train) + len(val) == 40
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(40))
    again_train, again_val = build_datasets(cfg, seed=7)
    assert again_val.indices == val.indices and again_train.indices == train.indices
    assert build_datasets(cfg, seed=8)[1].indices != val.indices
    assert train.classes == val.classes == [f"shape_{c}" for c in range(10)]
    raw, label = val.load_raw(0)
    assert np.array_equal(raw, ProceduralShapes(40, 8, seed=7).load_raw(val.indices[0])[0]) and label == val.indices[0] % 10
    assert train.fingerprint() != val.fingerprint() and val.fingerprint() == again_val.fingerprint()
    assert build_datasets(DataConfig(kind="procedural", num_samples=40), seed=7)[1] is None
    with pytest.raises(ValueError, match="leaves at least one item"):
        build_datasets(DataConfig(kind="procedural", num_samples=2, val_fraction=0.9), seed=0)


def test_val_root_must_have_the_training_classes(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "val_ok", n_per_class=(1, 1))
    cfg = DataConfig(kind="image_folder", root=str(tmp_path / "train"), image_size=16, val_root=str(tmp_path / "val_ok"))
    train, val = build_datasets(cfg)
    assert val.classes == train.classes and len(val) == 2
    (tmp_path / "val_ok" / "bee").rename(tmp_path / "val_ok" / "cow")
    with pytest.raises(ValueError, match=r"^data.val_root .* \(only in training: \['bee'\], only in validation: "
                                         r"\[.cow.\]\); give both folders the same class subfolders$"):
        build_datasets(cfg)


def test_val_sampler_is_every_item_in_order_optionally_limited():
    assert list(ValSampler(7, 3)) == [[(0, 0), (1, 0), (2, 0)], [(3, 0), (4, 0), (5, 0)], [(6, 0)]]
    assert list(ValSampler(7, 3, max_batches=2)) == [[(0, 0), (1, 0), (2, 0)], [(3, 0), (4, 0), (5, 0)]]
    halves = [list(ValSampler(7, 2, world_size=2, rank=r)) for r in range(2)]
    assert sorted(k for h in halves for b in h for k in b) == [(i, 0) for i in range(7)]


def test_image_folder_fingerprint_follows_the_files(tmp_path):
    root = _folder(tmp_path / "data")
    first = ImageFolder(root, 16).fingerprint()
    assert ImageFolder(root, 16).fingerprint() == first and ImageFolder(root, 32).fingerprint() != first
    path = root / "ant" / "0.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ImageFolder(root, 16).fingerprint() != first


def test_tokenizer_job_pipeline_equals_its_in_process_batches_and_validates():
    from tokenizers.config import VQVAEConfig
    from training.config import OptimConfig, TrainConfig
    from training.tokenizer_job import TokenizerJob

    torch.manual_seed(0)
    cfg = TrainConfig(job="tokenizer", data=DataConfig(kind="procedural", image_size=8, num_samples=16, val_fraction=0.25),
                      optim=OptimConfig(batch_size=4))
    train, val = build_datasets(cfg.data, seed=cfg.train.seed)
    vae_cfg = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
    job = TokenizerJob(cfg, vae_cfg, train, torch.device("cpu"), val_dataset=val)
    sampler = StepBatchSampler(len(train), 4, 1, 1, 0, 0, 0, 3)
    for keys, batch in zip(sampler, _batches(job.loader_dataset(), sampler, 0)):
        assert torch.equal(job.prepare_batch(batch, torch.device("cpu")), job.fetch([i for i, _ in keys], torch.device("cpu")))
    img = job.prepare_batch(collate_images([job.val_dataset()[(i, 0)] for i in range(len(val))]), torch.device("cpu"))
    assert torch.equal(img, torch.stack([val[i][0] for i in range(len(val))]))
    job.model.eval()
    hits = job.model.quantize.ema_vocab_hit_SV.clone()
    metrics = job.val_metrics(img)
    assert torch.equal(hits, job.model.quantize.ema_vocab_hit_SV)  # eval: codebook statistics untouched
    with torch.no_grad():
        recon = job.model(img).recon
    err = (recon - img).double()
    assert metrics["loss"] == pytest.approx(float(err.abs().mean() + err.square().mean()), rel=1e-5)
    per_image_mse = err.square().flatten(1).mean(1)
    assert metrics["psnr"] == pytest.approx(float((10 * torch.log10(4 / per_image_mse)).mean()), rel=1e-5)
    assert TokenizerJob(cfg, vae_cfg, train, torch.device("cpu")).val_dataset() is None
