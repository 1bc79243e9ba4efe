"""The shipped recipes load with `train.py var` as written: the official-architecture configs (their [tokenizer]
table is a checked description of the frozen tokenizer) and the ImageNet d16 recipe, whose numbers are checked
against the public recipe (spec var-core section 6.2) recomputed here from epochs, batch and tblr."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import train
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_model, save_model
from training.errors import run_cli
from var import VAR, var_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(__file__).resolve().parent / "data" / "var_schema.json").read_text())
IMAGENET_TRAIN = 1_281_167

# spec var-core 6.2: model -> (batch, epochs, tblr, peak lr, wpe, twde, drop_path, resolution)
RECIPES = {"var_d16_256": ("var_d16", 768, 200, 1e-4, 3.0e-4, 0.1, 0.05, 0.0667, 256),
           "var_d20_256": ("var_d20", 768, 250, 1e-4, 3.0e-4, 0.1, 0.05, 0.0833, 256),
           "var_d24_256": ("var_d24", 768, 350, 8e-5, 2.4e-4, 0.01, 0.05, 0.1, 256),
           "var_d30_256": ("var_d30", 1024, 350, 8e-5, 3.2e-4, 0.01, 0.08, 0.125, 256),
           "var_d36_512": ("var_d36", 768, 350, 8e-5, 2.4e-4, 0.01, 0.08, 0.15, 512)}


def meta_tokenizer(description: dict) -> VQVAE:
    with torch.device("meta"):  # the official tokenizer's shapes, no memory
        return VQVAE(train.from_dict(VQVAEConfig, description, "[tokenizer]"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_official_configs_load_with_the_var_job_and_build_the_release_shapes(name):
    size, batch, epochs, tblr, peak, wpe, twde, dpr, reso = RECIPES[name]
    cfg, table, description = train.load_job_config("var", str(REPO / "configs" / f"{name}.toml"), [])
    vae = meta_tokenizer(description)
    train.check_tokenizer_description(description, vae, "official vae", "[tokenizer]")
    var_cfg = train.build_var_config(table, vae, 1000, "[var]")
    assert dataclasses.asdict(var_cfg) == dataclasses.asdict(var_config(size))
    with torch.device("meta"):
        model = VAR(var_cfg, init=False)
    assert sum(p.numel() for p in model.parameters()) == SCHEMA["parameter_counts"][size]
    assert vae.config.image_size == cfg.data.image_size == reso
    # the recipe row, with epochs turned into steps by this test's own arithmetic
    per_epoch = math.ceil(IMAGENET_TRAIN / batch)
    assert cfg.optim.batch_size == batch and cfg.optim.base_lr == tblr
    assert cfg.optim.peak_lr() == pytest.approx(peak, rel=1e-9)
    assert cfg.train.steps == epochs * per_epoch
    assert cfg.optim.warmup_steps == epochs // 50 * per_epoch and epochs % 50 == 0
    assert (cfg.optim.final_lr_ratio, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (wpe, 0.05, twde)
    assert var_cfg.drop_path_rate == pytest.approx(dpr, abs=5e-5) and var_cfg.cond_drop_rate == 0.1
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip == 2.0 and cfg.optim.warmup_start_ratio == 0.005
    assert (cfg.data.mid_reso, cfg.data.random_crop, cfg.data.hflip) == (1.125, True, False)
    assert cfg.train.tokens == "stream" and cfg.train.label_smoothing == 0.0


def test_imagenet_d16_recipe_runs_as_documented():
    path = str(REPO / "configs" / "imagenet_var_d16.toml")
    cfg, table, description = train.load_job_config(
        "var", path, ["data.root=/data/imagenet/train", "data.val_root=/data/imagenet/val",
                      "train.tokenizer=/ckpt/vae_ch160v4096z32.pth"])
    assert (cfg.data.root, cfg.data.val_root, cfg.train.tokenizer) == (
        "/data/imagenet/train", "/data/imagenet/val", "/ckpt/vae_ch160v4096z32.pth")
    vae = meta_tokenizer(description)
    var_cfg = train.build_var_config(table, vae, 1000, "[var]")
    assert dataclasses.asdict(var_cfg) == dataclasses.asdict(var_config("var_d16"))
    assert cfg.optim.peak_lr() == pytest.approx(1e-4 * 768 / 256) and cfg.optim.batch_size == 768
    assert cfg.train.steps == 200 * 1669 and cfg.optim.warmup_steps == 4 * 1669
    assert cfg.train.val_every == 10 * 1669 and cfg.data.has_val and cfg.data.augmented
    assert (cfg.data.kind, cfg.data.image_size, cfg.data.num_workers) == ("image_folder", 256, 8)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.keep_checkpoints >= 2
    # the same recipe as the d16 official config (one source of truth for the numbers)
    official, _, official_description = train.load_job_config("var", str(REPO / "configs" / "var_d16_256.toml"), [])
    assert dataclasses.asdict(cfg.optim) == dataclasses.asdict(official.optim)
    assert cfg.train.steps == official.train.steps and description == official_description


def test_tokenizer_description_mismatch_names_the_keys():
    description = train.load_job_config("var", str(REPO / "configs" / "var_d16_256.toml"), [])[2]
    other = meta_tokenizer({**description, "ch": 128, "patch_nums": [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]})
    with pytest.raises(ValueError) as err:
        train.check_tokenizer_description(description, other, "my_vae.pth", "cfg[tokenizer]")
    message = str(err.value)
    assert "\n" not in message and "train.tokenizer my_vae.pth" in message
    assert "ch 128 (the table says 160)" in message and "patch_nums" in message and "vocab_size" not in message


def test_unknown_tokenizer_key_fails_before_loading(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text((REPO / "configs" / "var_d16_256.toml").read_text().replace("beta = 0.25", "betta = 0.25"))
    with pytest.raises(KeyError, match="betta"):
        train.load_job_config("var", str(cfg), [])
    with pytest.raises(KeyError, match=r"unknown table\(s\) \['tokenizer', 'var'\] for the dd job"):
        train.load_job_config("dd", str(cfg), [])


def test_cli_rejects_a_tokenizer_that_is_not_the_described_one(tmp_path, capsys):
    torch.manual_seed(0)
    small = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                              patch_nums=(1, 2, 3, 4)))
    save_model(tmp_path / "tok.safetensors", small)
    status = run_cli(train.main, ["var", "--config", str(REPO / "configs" / "var_d16_256.toml"),
                                  "--set", "data.kind=procedural", "--set", "data.image_size=64",
                                  "--set", "optim.batch_size=4", "--set", "train.mixed_precision=no",
                                  "--set", f"train.tokenizer={tmp_path / 'tok.safetensors'}",
                                  "--set", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "does not match" in err and "vocab_size 64 (the table says 4096)" in err and "ch 32 (the table says 160)" in err
    assert not (tmp_path / "run").exists()


def test_imagenet_d16_recipe_runs_one_step_on_a_tiny_folder_with_validation(tmp_path, monkeypatch):
    """The recipe file itself, shrunk only in size (model, images, tokenizer): train and val folders, streamed
    augmented tokens, the validation pass, and the [tokenizer] description checked on the positive side."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    torch.manual_seed(0)
    small = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                              patch_nums=(1, 2, 3, 4)))
    save_model(tmp_path / "tok.safetensors", small)
    shrink = ["tokenizer.vocab_size=64", "tokenizer.z_channels=8", "tokenizer.ch=32", "tokenizer.num_res_blocks=1",
              "tokenizer.patch_nums=[1, 2, 3, 4]", "var.depth=2", "var.embed_dim=64", "var.num_heads=4",
              "data.image_size=64", "data.num_workers=0", "optim.batch_size=4", "train.steps=1", "train.val_every=1",
              "train.mixed_precision=no", "train.num_threads=1", "train.samples_per_class=1"]
    paths = [f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}",
             f"train.tokenizer={tmp_path / 'tok.safetensors'}", f"train.out_dir={tmp_path / 'run'}"]
    argv = ["var", "--config", str(REPO / "configs" / "imagenet_var_d16.toml")]
    for text in shrink + paths:
        argv += ["--set", text]
    jobs = []
    build = train.build_var_based_job
    monkeypatch.setattr(train, "build_var_based_job", lambda *a: jobs.append(build(*a)) or jobs[-1])
    path = train.main(argv)
    assert load_model(path, "var").num_classes == 2
    (job,) = jobs
    val = job.val_dataset()  # the val folder, eval transform: 6 images of the two classes
    assert len(val) == 6 and sorted(int(val[(i, 0)][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]
    assert tuple(val[(0, 0)][0].shape) == (3, 64, 64)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 1] and math.isfinite(lines[0]["loss"])
    assert math.isfinite(lines[1]["val_loss"]) and lines[1]["val_items"] == 6  # the validation pass of val_every
