"""Fine-tuning a released VAR on new classes: training.checkpoint.load_init_from and
configs/finetune_var_d16_imagefolder.toml. The source is a random checkpoint with the official key layout
(checked against var_d16 built on the meta device) at a small depth and width, stored the way the release
stores its files (a bare torch.save'd state dict, read back with weights_only); the truth every test compares
with is that source's own tensors and the fresh model's own initial rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tests.conftest import perturb_
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import CheckpointMismatchError, load_init_from, load_model, save_model
from training.errors import run_cli
from var import VAR, VARConfig, var_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "finetune_var_d16_imagefolder.toml")
PATCH_NUMS, VOCAB, ZC = (1, 2, 3, 4), 64, 8
SMALL = dict(depth=2, embed_dim=64, num_heads=4, patch_nums=PATCH_NUMS, vocab_size=VOCAB, z_channels=ZC)


def small_var(num_classes: int, seed: int) -> VAR:
    torch.manual_seed(seed)
    return VAR(VARConfig(num_classes=num_classes, **SMALL))


def official_shape_source(path: Path, num_classes: int = 1000, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random 'release' checkpoint: var_d16's key layout (blocks cut to the small depth), saved as a bare state dict."""
    with torch.device("meta"):
        official = VAR(var_config("var_d16"), init=False).state_dict()
    model = perturb_(small_var(num_classes, seed), seed + 1, std=0.05)  # trained-looking, not the init
    state = model.state_dict()
    depth = SMALL["depth"]
    expected = [k for k in official if not k.startswith("blocks.") or int(k.split(".")[1]) < depth]
    assert list(state) == expected
    assert official["class_emb.weight"].shape == (1000 + 1, 1024) and state["class_emb.weight"].shape[0] == num_classes + 1
    torch.save(state, path)
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 4 random 64 px images, and a tiny random tokenizer for 64 px (4 x 4 final scale)."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=VOCAB, z_channels=ZC, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                            patch_nums=PATCH_NUMS))
    save_model(root / "tokenizer.safetensors", vae)
    return root


def finetune(folder: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["var", "--config", CONFIG, "--set", f"data.root={folder / 'images'}", "--set", f"train.init_from={source}",
            "--set", f"train.tokenizer={folder / 'tokenizer.safetensors'}", "--set", f"train.out_dir={out}",
            "--set", "var.depth=2", "--set", "var.embed_dim=64", "--set", "var.num_heads=4",
            "--set", "data.image_size=64", "--set", "data.num_workers=0", "--set", "train.val_every=1",
            "--set", "optim.batch_size=4", "--set", "train.steps=2", "--set", "train.num_threads=1",
            "--set", "train.samples_per_class=1", "--set", "train.mixed_precision=no", *extra]


def test_resize_through_train_py_keeps_the_source_rows_and_null_row(folder, tmp_path):
    src = official_shape_source(tmp_path / "var_d16_small.pth")
    # an lr so small that every update rounds away: the exported (EMA) weights are the initial ones, bitwise
    path = train.main(finetune(folder, tmp_path / "var_d16_small.pth", tmp_path / "run", "--set", "optim.base_lr=1e-30"))
    got = load_model(path, "var").state_dict()
    rows = got["class_emb.weight"]
    assert rows.shape == (3 + 1, 64)
    assert torch.equal(rows[:3], src["class_emb.weight"][:3])
    assert torch.equal(rows[3], src["class_emb.weight"][1000])  # the null row moved to the new last row
    assert [k for k in got if not torch.equal(got[k], src[k])] == ["class_emb.weight"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("val_items") for line in lines if "val_loss" in line] == [1, 1]  # ceil(5% of 12) held out


def test_resize_to_more_classes_keeps_fresh_rows_for_the_new_ones(tmp_path):
    src = official_shape_source(tmp_path / "k2.pth", num_classes=2)
    model = small_var(5, seed=7)
    fresh = model.class_emb.weight.detach().clone()
    done = load_init_from(model, tmp_path / "k2.pth", "var", class_mode="resize")
    rows = model.class_emb.weight.detach()
    assert done == {"init_from": str(tmp_path / "k2.pth"), "class_mode": "resize", "classes_from": 2, "classes": 5,
                    "copied_rows": 2}
    assert torch.equal(rows[:2], src["class_emb.weight"][:2]) and torch.equal(rows[5], src["class_emb.weight"][2])
    assert torch.equal(rows[2:5], fresh[2:5])  # the model's own initialisation
    assert not any(torch.equal(rows[i], src["class_emb.weight"][j]) for i in range(2, 5) for j in range(3))
    state = model.state_dict()
    assert all(torch.equal(state[k], src[k]) for k in src if k != "class_emb.weight")


def test_reinit_takes_the_whole_fresh_table_and_everything_else_from_the_source(tmp_path):
    src = official_shape_source(tmp_path / "k1000.pth")
    model = small_var(3, seed=3)
    fresh = model.class_emb.weight.detach().clone()
    load_init_from(model, tmp_path / "k1000.pth", "var", class_mode="reinit")
    assert torch.equal(model.class_emb.weight, fresh)
    assert not torch.equal(fresh[3], src["class_emb.weight"][1000])
    state = model.state_dict()
    assert all(torch.equal(state[k], src[k]) for k in src if k != "class_emb.weight")


def test_same_class_count_is_a_plain_strict_load_of_our_format(tmp_path):
    source = perturb_(small_var(3, seed=5), 6)
    save_model(tmp_path / "ours.safetensors", source)
    model = small_var(3, seed=9)
    for mode in ("error", "resize"):
        assert load_init_from(model, tmp_path / "ours.safetensors", "var", mode)["class_mode"] == "same"
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_our_file_with_another_head_count_or_norm_eps_is_refused(tmp_path):
    """No tensor records num_heads without L2-normalised attention, nor norm_eps: our files do, and must agree."""
    fields = {**SMALL, "attn_l2_norm": False}
    torch.manual_seed(0)
    save_model(tmp_path / "h4.safetensors", VAR(VARConfig(num_classes=3, **fields, norm_eps=1e-3)))
    for other, message in ((dict(num_heads=2, norm_eps=1e-3), r"num_heads 4 \(file\) vs 2 \(model\)"),
                           (dict(num_heads=4, norm_eps=1e-6), r"norm_eps 0.001 \(file\) vs 1e-06 \(model\)")):
        torch.manual_seed(1)
        model = VAR(VARConfig(num_classes=3, **{**fields, **other}))
        with pytest.raises(CheckpointMismatchError, match=message + ".*set them in \\[var\\]"):
            load_init_from(model, tmp_path / "h4.safetensors", "var")
    torch.manual_seed(1)
    same = VAR(VARConfig(num_classes=3, **fields, norm_eps=1e-3))
    assert load_init_from(same, tmp_path / "h4.safetensors", "var")["class_mode"] == "same"


def test_error_mode_is_one_line_naming_the_setting(folder, tmp_path, capsys):
    official_shape_source(tmp_path / "k1000.pth")
    with pytest.raises(CheckpointMismatchError, match=r"has 1000 classes but the model 3 .*train\.init_class_embedding"):
        load_init_from(small_var(3, seed=0), tmp_path / "k1000.pth", "var")
    status = run_cli(train.main, finetune(folder, tmp_path / "k1000.pth", tmp_path / "run",
                                          "--set", "train.init_class_embedding=error"))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "train.init_class_embedding" in err, err
    with pytest.raises(ValueError, match="init_class_embedding must be error, reinit or resize"):
        load_init_from(small_var(3, seed=0), tmp_path / "k1000.pth", "var", class_mode="grow")


def test_another_width_is_reported_not_resized(tmp_path):
    official_shape_source(tmp_path / "k1000.pth")
    torch.manual_seed(0)
    wider = VAR(VARConfig(num_classes=3, **{**SMALL, "embed_dim": 128}))
    with pytest.raises(CheckpointMismatchError, match=r"num_classes differs .*the width \(embed_dim\) differs"):
        load_init_from(wider, tmp_path / "k1000.pth", "var", class_mode="resize")


def test_a_tokenizer_loads_strictly_with_its_scale_list(tmp_path):
    torch.manual_seed(0)
    config = VQVAEConfig(vocab_size=VOCAB, z_channels=ZC, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS)
    source = perturb_(VQVAE(config), 1, std=0.02)
    save_model(tmp_path / "tok.safetensors", source)
    torch.manual_seed(1)
    model = VQVAE(config)
    assert load_init_from(model, tmp_path / "tok.safetensors", "vqvae", "resize")["class_mode"] == "same"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
