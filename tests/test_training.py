"""train.py: DDP equivalence, exact resume, schedules, losses, data readers and bad input."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import train
from tokenizers import VQVAE, VQVAEConfig
from tokenizers.losses import VGGPerceptual, adaptive_gan_weight, hinge_d_loss
from training.checkpoint import CheckpointMismatchError, load_model, read_metadata, save_model
from training.data import FashionMNIST, ImageFolder, to_model_range
from training.optim import lr_at, param_groups, wd_at
from training.config import OptimConfig
from training.run_state import load_tree
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

VAR_TOML = """
[var]
depth = 2
embed_dim = 64
num_heads = 2
cond_drop_rate = {cond_drop}
drop_path_rate = 0.0
[data]
kind = "procedural"
image_size = 8
num_samples = 48
num_classes = 4
[optim]
base_lr = 1e-3
batch_size = 8
grad_accum = {accum}
warmup_steps = 2
ema_decay = {ema}
[train]
steps = {steps}
tokenizer = "{tokenizer}"
log_every = 1
sample_every = 1000
ckpt_every = {ckpt_every}
samples_per_class = 2
num_threads = 1
"""

TOKENIZER_TOML = """
[tokenizer]
vocab_size = 32
z_channels = 8
ch = 32
ch_mult = [1, 2]
num_res_blocks = 1
patch_nums = [1, 2, 3, 4]
[data]
kind = "procedural"
image_size = 8
num_samples = 32
[optim]
batch_size = 8
warmup_steps = 1
[loss]
gan_weight = 0.5
gan_start_step = 2
dead_code_every = 2
[train]
steps = {steps}
log_every = 1
sample_every = 1000
ckpt_every = {ckpt_every}
num_threads = 1
"""

TINY_VAE = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_model(path, VQVAE(VQVAEConfig(**TINY_VAE)))
    return path


def write_var_config(tmp_path: Path, tokenizer: Path, steps=2, ckpt_every=1000, cond_drop=0.0, ema=0.0, accum=1) -> Path:
    path = tmp_path / "var.toml"
    path.write_text(VAR_TOML.format(tokenizer=tokenizer, steps=steps, ckpt_every=ckpt_every, cond_drop=cond_drop,
                                    ema=ema, accum=accum))
    return path


def params(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def capture_initial_weights(monkeypatch) -> dict:
    """Records the trained model's weights as the Trainer starts (after init / init_from, before step 1)."""
    captured, original = {}, Trainer.train

    def train_and_capture(self, resume=False):
        captured.update({k: v.detach().clone() for k, v in self.acc.unwrap_model(self.job.model).state_dict().items()})
        return original(self, resume)

    monkeypatch.setattr(Trainer, "train", train_and_capture)
    return captured


# ---- distribution and resume --------------------------------------------------------------------------
def test_two_process_ddp_equals_single_process(tmp_path, tiny_tokenizer, monkeypatch):
    """Global batch 8: two gloo processes x 2 accumulation micro-batches of 2 == one process, one batch of 8."""
    cfg = write_var_config(tmp_path, tiny_tokenizer, steps=2)
    # `--cpu` would make accelerate run ONE plain process; torchrun-style workers on a machine whose GPUs are
    # hidden make Accelerator(cpu=True) form a gloo process group (distributed type MULTI_CPU).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), "var", "--config", str(cfg),
           "--set", f"train.out_dir={tmp_path / 'two'}", "--set", "optim.grad_accum=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    initial = capture_initial_weights(monkeypatch)
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'one'}"])

    dist = json.loads((tmp_path / "two" / "config.json").read_text())["distributed"]
    assert dist["num_processes"] == 2 and dist["backend"] == "gloo"
    one, two = params(tmp_path / "one" / "var.safetensors"), params(tmp_path / "two" / "var.safetensors")
    assert one.keys() == two.keys() == initial.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=2e-6, msg=k)
    assert not torch.allclose(one["head.weight"], initial["head.weight"])  # the steps did update the model
    log1, log2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for key in ("loss", "grad_norm", "acc_s3"):  # same global loss and gradient before each update
        assert [r[key] for r in log1] == pytest.approx([r[key] for r in log2], rel=1e-5, abs=1e-6), key


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("job", ["var", "tokenizer"])
def test_resume_after_interruption_is_exact(tmp_path, tiny_tokenizer, monkeypatch, job):
    """6 steps in one go == 4 steps, killed, resumed from the step-3 checkpoint (cond dropout, EMA,
    accumulation for the VAR; GAN after step 2 and dead-code re-seeding for the tokenizer)."""
    if job == "var":
        cfg = write_var_config(tmp_path, tiny_tokenizer, steps=6, ckpt_every=3, cond_drop=0.3, ema=0.9, accum=2)
    else:
        cfg = tmp_path / "tok.toml"
        cfg.write_text(TOKENIZER_TOML.format(steps=6, ckpt_every=3))
    export = f"{job}.safetensors"
    train.main([job, "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'full'}"])

    original = Trainer._train_step

    def dying_step(self, *args):
        if self.step == 4:  # after the step-3 checkpoint, in the middle of the run
            raise Interrupt()
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(Interrupt):
        train.main([job, "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(Trainer, "_train_step", original)
    ckpt = tmp_path / "cut" / "checkpoints"
    assert (ckpt / "latest.txt").read_text() == "step_0000003"
    state = load_tree(ckpt / "step_0000003", "state")  # pickle-free: JSON + safetensors
    assert state["step"] == 3 and state["pos"] == 24 and len(state["optimizers"]) == (1 if job == "var" else 2)
    assert (state["ema"] is not None) == (job == "var") and (ckpt / "step_0000003" / "rng_rank0.safetensors").exists()
    assert not list(ckpt.rglob("*.pt"))
    train.main([job, "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'cut'}", "--resume"])

    full, resumed = params(tmp_path / "full" / export), params(tmp_path / "cut" / export)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    log = read_log(tmp_path / "cut")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing log lines
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(tmp_path / "full")]
    if job == "tokenizer":
        assert "loss_d" in log[-1] and "gan_weight" in log[-1] and "ppl_s3" in log[-1] and "usage_s0" in log[-1]
        assert "dead_codes_reseeded" in log[1]
    else:
        assert {f"acc_s{si}" for si in range(4)} <= set(log[-1])
        assert read_metadata(tmp_path / "cut" / export)["extra"]["classes"] == [f"shape_{c}" for c in range(4)]
    assert len(list((tmp_path / "cut" / "samples").glob("step_*.png"))) == 1  # the final grid


def test_fine_tuning_starts_from_the_given_tokenizer(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = tmp_path / "tok.toml"
    cfg.write_text(TOKENIZER_TOML.format(steps=1, ckpt_every=1000).replace("gan_weight = 0.5", "gan_weight = 0.0"))
    initial = capture_initial_weights(monkeypatch)
    train.main(["tokenizer", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'ft'}",
                "--set", f"train.init_from={tiny_tokenizer}"])
    source = params(tiny_tokenizer)
    for k in source:
        assert torch.equal(initial[k], source[k]), k


# ---- optimiser recipe and losses ------------------------------------------------------------------------
def test_lr_and_weight_decay_schedules():
    cfg = OptimConfig(base_lr=1e-4, batch_size=512, warmup_steps=10, warmup_start_ratio=0.005, final_lr_ratio=0.1,
                      weight_decay=0.05, weight_decay_end=0.01)
    peak = 1e-4 * 512 / 256
    assert lr_at(0, 110, cfg) == pytest.approx(0.005 * peak)
    assert lr_at(5, 110, cfg) == pytest.approx(peak * (0.005 + 0.995 * 0.5))
    assert lr_at(10, 110, cfg) == pytest.approx(peak)
    assert lr_at(14, 110, cfg) == pytest.approx(peak)  # flat for the first 5% after warm-up
    assert lr_at(109, 110, cfg) == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert wd_at(0, 110, cfg) == pytest.approx(0.05) and wd_at(109, 110, cfg) == pytest.approx(0.01)
    assert wd_at(54.5, 110, cfg) == pytest.approx(0.03)  # cosine midpoint


def test_weight_decay_groups_follow_the_var_recipe():
    from var import VAR, VARConfig

    model = VAR(VARConfig(num_classes=3, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), vocab_size=8, z_channels=4))
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"class_emb.weight", "word_embed.weight", "head.weight", "blocks.0.ada_lin.1.weight"} <= decayed
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= skipped
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_gan_losses_match_their_definitions():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(3)
    rec, g = 3.0 * (w @ x).sum(), -0.5 * (w @ x).sum()  # gradients parallel, norms in ratio 3 / 0.5
    assert float(adaptive_gan_weight(rec, g, w)) == pytest.approx(6.0, rel=1e-3)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    expected = 0.5 * (np.mean([0.0, 0.5, 2.0]) + np.mean([0.0, 1.0, 2.0]))
    assert float(hinge_d_loss(real, fake)) == pytest.approx(expected)


# ---- data -----------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_pads_and_scales(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 3]))
    ds = FashionMNIST(tmp_path, "test", image_size=32)
    img, label = ds[2]
    assert len(ds) == 3 and label == 3 and img.shape == (3, 32, 32)
    assert torch.equal(img[:, 2:30, 2:30][0], torch.from_numpy(images[2]).float() / 127.5 - 1)
    assert (img[:, :2] == -1).all() and torch.equal(img[0], img[1])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0]))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        FashionMNIST(tmp_path, "test")


def test_image_folder_labels_and_aspect_preserving_crop(tmp_path):
    for c in ("b_dog", "a_cat"):
        (tmp_path / c).mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a_cat" / "wide.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "b_dog" / "small.png")
    ds = ImageFolder(tmp_path, 16)
    assert ds.classes == ["a_cat", "b_dog"] and len(ds) == 2
    wide, label = ds[0]
    assert label == 0 and wide.shape == (3, 16, 16) and torch.allclose(wide[0], torch.ones(16, 16))
    small, label = ds[1]
    assert label == 1 and (small[:, 4:12, 4:12] == 1).all() and (small[:, :4] == -1).all()
    stripes = np.zeros((64, 32), np.uint8)
    stripes[:, 16:] = 255  # left half black, right half white: a centre crop keeps both halves
    out = to_model_range(stripes, 16)
    assert out[0, 8, :7].max() < -0.9 and out[0, 8, 9:].min() > 0.9


# ---- bad input ------------------------------------------------------------------------------------------
def test_missing_dataset_paths_are_named(tmp_path, tiny_tokenizer):
    cfg = write_var_config(tmp_path, tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match=r"missing.*dataset-fashion-mnist"):
        train.main(["var", "--config", str(cfg), "--set", "data.kind=fashion_mnist", "--set",
                    f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match=r"nowhere.*subfolder"):
        train.main(["var", "--config", str(cfg), "--set", "data.kind=image_folder", "--set",
                    f"data.root={tmp_path / 'nowhere'}"])
    (tmp_path / "empty_fmnist").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte"):
        FashionMNIST(tmp_path / "empty_fmnist", "train")


def test_corrupt_images_fail_naming_the_file_or_are_skipped_by_flag(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "ok.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "cat" / "truncated.jpg", quality=95)
    data = (tmp_path / "imgs" / "cat" / "truncated.jpg").read_bytes()
    (tmp_path / "imgs" / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.png.*skip_corrupt"):
        ImageFolder(tmp_path / "imgs", 8)[0]
    with pytest.raises(ValueError, match="truncated.jpg"):
        ImageFolder(tmp_path / "imgs", 8)[2]
    skipping = ImageFolder(tmp_path / "imgs", 8, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        img, label = skipping[0]
    assert skipping.skipped == 1 and img.shape == (3, 8, 8) and label == 0
    with pytest.warns(UserWarning, match="truncated.jpg"):
        skipping[2]
    assert skipping.skipped == 2

    cfg = tmp_path / "tok.toml"  # end to end: the tokenizer job reads its preview images at start-up
    cfg.write_text(TOKENIZER_TOML.format(steps=1, ckpt_every=1000).replace('kind = "procedural"', 'kind = "image_folder"'))
    with pytest.raises(ValueError, match="broken.png"):
        train.main(["tokenizer", "--config", str(cfg), "--set", f"data.root={tmp_path / 'imgs'}",
                    "--set", "optim.batch_size=1", "--set", f"train.out_dir={tmp_path / 'run'}"])


def test_bad_configs_are_clear_errors(tmp_path, tiny_tokenizer):
    cfg = write_var_config(tmp_path, tiny_tokenizer)
    text = cfg.read_text()
    cfg.write_text(text.replace("[optim]", "[optim]\nlearning_rate = 1.0"))
    with pytest.raises(KeyError, match="learning_rate.*valid keys"):
        train.main(["var", "--config", str(cfg)])
    cfg.write_text(text.replace("batch_size = 8", 'batch_size = "eight"'))
    with pytest.raises(TypeError, match="batch_size: expected int"):
        train.main(["var", "--config", str(cfg)])
    cfg.write_text(text.replace("[var]", "[var]\ndepht = 3"))
    with pytest.raises(KeyError, match="depht"):
        train.main(["var", "--config", str(cfg)])
    cfg.write_text(text + "\n[optimizer]\nlr = 1\n")
    with pytest.raises(KeyError, match="optimizer"):
        train.main(["var", "--config", str(cfg)])
    cfg.write_text(text)
    with pytest.raises(TypeError, match="steps: expected int"):
        train.main(["var", "--config", str(cfg), "--set", "train.steps=2.5"])
    with pytest.raises(ValueError, match="table.key=value"):
        train.main(["var", "--config", str(cfg), "--set", "steps=2"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            train.main(["var", "--config", str(cfg), "--set", "train.mixed_precision=fp16"])


def test_cpu_bf16_autocast_trains_in_bf16_with_fp32_weights(tmp_path, tiny_tokenizer, monkeypatch):
    """train.mixed_precision = bf16 on CPU: the blocks compute in bf16 under autocast, the weights (and so the
    optimizer's master copy) stay fp32, and the first loss is the fp32 run's within bf16 rounding."""
    if torch.cuda.is_available():
        pytest.skip("the CPU autocast path")
    from var.layers import AdaLNBlock
    seen, forward = [], AdaLNBlock.forward

    def recording(self, x_BLC, *args, **kwargs):
        if self.training:  # the training forward (not the end-of-run sample grid)
            seen.append(x_BLC.dtype)
        return forward(self, x_BLC, *args, **kwargs)

    monkeypatch.setattr(AdaLNBlock, "forward", recording)
    cfg = write_var_config(tmp_path, tiny_tokenizer, steps=1)
    losses = {}
    for mp in ("no", "bf16"):
        seen.clear()
        run = tmp_path / mp
        AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision once
        try:
            train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={run}", "--set", f"train.mixed_precision={mp}"])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        assert set(seen) == {torch.bfloat16 if mp == "bf16" else torch.float32}
        assert all(t.dtype == torch.float32 for t in params(run / "var.safetensors").values() if t.is_floating_point())
        losses[mp] = read_log(run)[0]["loss"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=2e-2) and losses["bf16"] != losses["no"]


def test_tokenizer_var_mismatch_and_run_directory_misuse(tmp_path, tiny_tokenizer):
    cfg = write_var_config(tmp_path, tiny_tokenizer)
    text = cfg.read_text()
    cfg.write_text(text.replace("[var]", "[var]\nvocab_size = 64"))
    with pytest.raises(ValueError, match="vocabulary size 64 vs tokenizer 32"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'v'}"])
    cfg.write_text(text.replace("[var]", "[var]\nnum_classes = 3"))
    with pytest.raises(ValueError, match="4 classes but var.num_classes = 3"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'c'}"])
    cfg.write_text(text)
    a_var = train.main(["var", "--config", str(cfg), "--set", "train.steps=1", "--set", f"train.out_dir={tmp_path / 'ok'}"])
    with pytest.raises(CheckpointMismatchError, match="holds a var checkpoint, but a vqvae was expected"):
        train.main(["var", "--config", str(cfg), "--set", f"train.tokenizer={a_var}"])
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(["var", "--config", str(cfg), "--set", "train.steps=1", "--set", f"train.out_dir={tmp_path / 'ok'}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'r'}", "--resume"])
    with pytest.raises(ValueError, match=r"differs .*\['optim'\]"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'ok'}", "--resume",
                    "--set", "optim.base_lr=0.5"])
    with pytest.raises(FileNotFoundError, match="vgg16"):
        VGGPerceptual(tmp_path / "no_vgg.pth")


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    from training.var_job import VARJob

    cfg = write_var_config(tmp_path, tiny_tokenizer, steps=4, ckpt_every=1)
    original = VARJob.loss

    def poisoned(self, batch, step):
        loss, metrics = original(self, batch, step)
        return (loss * float("nan") if step == 2 else loss), metrics

    monkeypatch.setattr(VARJob, "loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 3 \(after 2 completed steps\).*step_0000002"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'nan'}"])
    assert [r["step"] for r in read_log(tmp_path / "nan")] == [1, 2]


TRAINING_CONFIGS = ["fmnist_tokenizer.toml", "fmnist_var_drafter.toml", "fmnist_var_refiner.toml",
                    "finetune_official_vqvae.toml", "fmnist_code_refiner.toml", "fmnist_code_drafter.toml"]


@pytest.mark.parametrize("path", [REPO / "configs" / name for name in TRAINING_CONFIGS], ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    raw = train.load_toml(path)
    code_job = "code_drafter" if "drafter" in path.name else "code_refiner"
    job = "tokenizer" if "tokenizer" in raw and "var" not in raw else code_job if "code" in raw else "var"
    cfg, model_table = train.load_train_config(job, str(path), [])
    assert cfg.job == job and model_table
    if job.startswith("code_"):
        from samplers.code.training import CoDeTrainConfig
        # the authors' 8 of 10 scales, as a fraction of the shipped tokenizer's six
        assert train.from_dict(CoDeTrainConfig, cfg.code).draft_scales == round(0.8 * 6)


def test_ema_warmup_law():
    """With optim.ema_warmup the weight the EMA keeps on its initial value after n updates is
    prod_t (1 + t) / (10 + t) = 10! (n + 1)! / (n + 10)! (until the cap), against decay^n without warm-up."""
    from math import factorial

    from training.optim import EMA, ema_decay_at

    cfg = OptimConfig(ema_decay=0.998, ema_warmup=True)
    assert ema_decay_at(cfg, 1) == pytest.approx(2 / 11) and ema_decay_at(cfg, 10_000) == 0.998
    assert ema_decay_at(OptimConfig(ema_decay=0.998), 1) == 0.998
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    ema = EMA(model, cfg.ema_decay)
    torch.nn.init.constant_(model.weight, 0.0)  # trained weights 0: the EMA value is the weight left on the init
    n = 200
    for step in range(1, n + 1):
        ema.update(model, ema_decay_at(cfg, step))
    expected = factorial(10) * factorial(n + 1) / factorial(n + 10)  # the cap 0.998 is not reached by step 200
    assert float(ema.model.weight) == pytest.approx(expected, rel=1e-4)


def test_export_weights_and_settings_added_after_a_checkpoint(tmp_path, tiny_tokenizer):
    """train.export_weights = "model" re-exports a finished run's trained (not EMA) weights on --resume, and a
    checkpoint written before optim.ema_warmup existed still resumes (its default reproduces the old law)."""
    from training.resume_settings import saved_settings

    cfg = write_var_config(tmp_path, tiny_tokenizer, steps=2, ckpt_every=2, ema=0.9)
    out = tmp_path / "run"
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={out}"])
    state = load_tree(out / "checkpoints" / "step_0000002", "state")
    ema_export = params(out / "var.safetensors")
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={out}", "--set", "train.export_weights=model",
                "--resume"])
    model_export = params(out / "var.safetensors")
    trained, averaged = state["models"][0], state["ema"]
    assert torch.equal(model_export["head.weight"], trained["head.weight"])
    assert torch.equal(ema_export["head.weight"], averaged["head.weight"])
    assert not torch.equal(trained["head.weight"], averaged["head.weight"])
    old = {"optim": {k: v for k, v in state["config"]["optim"].items() if k != "ema_warmup"}, "seed": 0}
    assert saved_settings(old)["optim"]["ema_warmup"] is False
    with pytest.raises(ValueError, match="train.export_weights"):
        train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'x'}", "--set",
                    "train.export_weights=best"])


def test_fp16_tokenizer_with_a_gan_is_refused():
    """accelerate's one GradScaler would be updated by both optimizers' steps: refused at config time."""
    path = str(REPO / "configs" / "fmnist_tokenizer.toml")
    with pytest.raises(ValueError, match="'fp16' with a GAN"):
        train.load_train_config("tokenizer", path, ["train.mixed_precision=fp16", "loss.gan_weight=0.1"])
    train.load_train_config("tokenizer", path, ["train.mixed_precision=fp16", "loss.gan_weight=0.0"])
    train.load_train_config("tokenizer", path, ["train.mixed_precision=bf16", "loss.gan_weight=0.1"])
