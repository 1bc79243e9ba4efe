"""Loaders under bad or unusual input: files that are not checkpoints, VAR configs the weights do not record
(config overrides), 16-bit / transparent / palette images, empty class folders, and the test data's hashes."""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_tiny_pair, perturb_
from eval.data import FolderSource, read_image
from training.checkpoint import (CheckpointMismatchError, NotACheckpointError, load_any, load_model,
                                 load_official_var, save_model)
from training.data import ImageFolder
from training.images import to_rgb_uint8
from var import VAR, VARConfig

DATA = Path(__file__).resolve().parent / "data"


# ---- files that are not checkpoints ------------------------------------------------------------------------
def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    var, _ = make_tiny_pair()
    torch.save(var.state_dict(), tmp_path / "good.pth")
    save_model(tmp_path / "good.safetensors", var)
    pth, st = (tmp_path / "good.pth").read_bytes(), (tmp_path / "good.safetensors").read_bytes()
    cases = {  # name -> (bytes, what the message must say)
        "text.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "is a text file"),
        "page.pth": (b"<!DOCTYPE html><html>404</html>", "is a text file"),
        "empty.pth": (b"", "empty"),
        "truncated.pth": (pth[: len(pth) // 2], "truncated or corrupt"),
        "renamed_safetensors.pth": (st, r"safetensors file: rename it to \.safetensors"),
        "garbage.pth": (bytes(range(1, 200)), "unknown content"),
        "text.safetensors": (b"hello, not tensors", "is a text file"),
        "empty.safetensors": (b"", "empty"),
        "truncated.safetensors": (st[: len(st) // 2], "truncated or corrupt"),
        "renamed_pth.safetensors": (pth, r"PyTorch \.pth file: rename it to \.pth"),
    }
    out = {}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, message)
    return out


def test_files_that_are_not_checkpoints_say_so_naming_the_file(tmp_path):
    for name, (path, message) in _bad_files(tmp_path).items():
        for kind in ("var", "vqvae"):
            with pytest.raises(NotACheckpointError) as info:
                load_any(path, kind)
            text = str(info.value)
            assert str(path) in text and re.search(message, text), (name, text)
            assert "\n" not in text and "weights_only=False" not in text, (name, text)
            which = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
            assert f"not a {which} checkpoint" in text or f"not a readable {which} checkpoint" in text, text
    assert issubclass(NotACheckpointError, CheckpointMismatchError)  # callers catching the old error still do


def test_pickled_objects_are_refused_without_suggesting_unsafe_loading(tmp_path):
    import argparse
    torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "train_state.pth")
    with pytest.raises(CheckpointMismatchError, match=r"Python objects besides tensors \(argparse\.Namespace\)") as info:
        load_any(tmp_path / "train_state.pth", "var")
    assert "weights_only=False" not in str(info.value)


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_object_of_a_blocked_module_is_named_not_called_corrupt(tmp_path):
    """torch words a blocked module ('posix.system') differently from an unlisted class: both are named."""
    marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(2), "x": _RunsAShellCommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointMismatchError, match=r"Python objects besides tensors \((posix|os|nt)\.system\)"):
        load_any(tmp_path / "evil.pth", "var")
    assert not marker.exists()


# ---- VAR config overrides ----------------------------------------------------------------------------------
def _non_l2_var() -> VAR:
    """Width 128 with 4 heads (head width 32): the old width // 64 rule would have loaded it with 2 heads."""
    cfg = VARConfig(num_classes=5, depth=2, embed_dim=128, num_heads=4, patch_nums=(1, 2, 3), vocab_size=32,
                    z_channels=8, attn_l2_norm=False, cond_drop_rate=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    return perturb_(VAR(cfg), seed=1).eval()


def _logits(var: VAR) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x_BlCv = torch.randn(2, var.seq_len - 1, var.config.z_channels, generator=gen)
    with torch.no_grad():
        return var(torch.tensor([1, 3]), x_BlCv)


def test_head_count_without_l2_attention_needs_an_override(tmp_path):
    var = _non_l2_var()
    path = tmp_path / "var_non_l2.pth"
    torch.save(var.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"num_heads cannot be inferred.*num_heads=N") as info:
        load_any(path, "var")
    assert str(path) in str(info.value)
    loaded = load_any(path, "var", overrides={"num_heads": 4})
    assert loaded.config.num_heads == 4 and not loaded.config.attn_l2_norm
    assert torch.equal(_logits(loaded), _logits(var))
    # a command-line string parses to the same model; the wrong count loads (no tensor can tell) but differs
    assert torch.equal(_logits(load_official_var(path, overrides={"num_heads": "4"})), _logits(var))
    wrong = load_any(path, "var", overrides={"num_heads": 2})
    assert (_logits(wrong) - _logits(var)).abs().max() > 1e-3


def test_width_below_64_without_l2_attention_is_a_clear_error_not_a_division_by_zero(tmp_path):
    cfg = VARConfig(num_classes=3, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), vocab_size=16,
                    z_channels=4, attn_l2_norm=False)
    torch.save(VAR(cfg).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointMismatchError, match="num_heads cannot be inferred"):
        load_any(tmp_path / "narrow.pth", "var")
    assert load_any(tmp_path / "narrow.pth", "var", overrides={"num_heads": 2}).config.num_heads == 2


def test_overrides_are_validated(tmp_path):
    var, _ = make_tiny_pair()  # L2 attention: every shape field is inferred
    torch.save(var.state_dict(), tmp_path / "var.pth")
    save_model(tmp_path / "var.safetensors", var)
    for path in (tmp_path / "var.pth", tmp_path / "var.safetensors"):
        with pytest.raises(ValueError, match=r"unknown VARConfig field\(s\) num_head in the overrides; valid fields "
                                             r"are .*num_heads"):
            load_any(path, "var", overrides={"num_head": 4})
        with pytest.raises(ValueError, match="not a valid value"):
            load_any(path, "var", overrides={"num_heads": "four heads"})
        with pytest.raises(CheckpointMismatchError, match="num_heads 3"):  # 64 is not divisible by 3
            load_any(path, "var", overrides={"num_heads": 3})
        with pytest.raises(CheckpointMismatchError, match="scale_mul_1H11"):  # contradicts the recorded head count
            load_any(path, "var", overrides={"num_heads": 2})
        # a field the weights ignore is taken as given
        assert load_any(path, "var", overrides={"cond_drop_rate": "0.25"}).config.cond_drop_rate == 0.25
    with pytest.raises(ValueError, match="VAR checkpoints only"):
        load_any(tmp_path / "var.pth", "vqvae", overrides={"num_heads": 4})
    assert load_model(tmp_path / "var.safetensors", overrides=None).config == var.config


# ---- image decoding ----------------------------------------------------------------------------------------
V16 = np.array([[0, 255, 256, 257, 32768, 33023], [65535, 65280, 65279, 1000, 40000, 12345]], dtype=np.uint16)


def _expected_from_16(v_HW: np.ndarray) -> np.ndarray:
    """The high byte of each 16-bit value, computed without PIL, replicated to RGB."""
    hi = np.array([[int(x) // 256 for x in row] for row in v_HW.tolist()], dtype=np.uint8)
    return np.repeat(hi[..., None], 3, axis=-1)


def _image_files(tmp_path: Path) -> dict[str, np.ndarray]:
    """name -> expected uint8 (H, W, 3) for files written in modes `convert("RGB")` gets wrong or that need care."""
    out = {}
    Image.fromarray(V16).save(tmp_path / "gray16.png")  # uint16 -> mode I;16, written as a 16-bit PNG
    out["gray16.png"] = _expected_from_16(V16)
    Image.frombytes("I;16B", V16.shape[::-1], V16.astype(">u2").tobytes()).save(tmp_path / "gray16_be.tiff")
    out["gray16_be.tiff"] = _expected_from_16(V16)
    alpha = np.array([[0, 255, 128], [64, 255, 0]], dtype=np.uint8)
    rgb = np.array([[[10, 20, 30], [40, 50, 60], [200, 100, 0]], [[0, 0, 0], [255, 0, 9], [7, 7, 7]]], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")  # alpha over white, by hand:
    out["rgba.png"] = np.array([[[round((c * a + 255 * (255 - a)) / 255) for c in px] for px, a in zip(row, arow)]
                                for row, arow in zip(rgb.tolist(), alpha.tolist())], dtype=np.uint8)
    gray = np.array([[100, 100, 100], [0, 255, 30]], dtype=np.uint8)
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    out["la.png"] = np.repeat(np.array([[round((g * a + 255 * (255 - a)) / 255) for g, a in zip(r, ar)]
                                        for r, ar in zip(gray.tolist(), alpha.tolist())], dtype=np.uint8)[..., None], 3, -1)
    palette = Image.frombytes("P", (3, 2), np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8).tobytes())
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    out["palette.png"] = colours[np.array([[0, 1, 2], [2, 1, 0]])]
    palette.save(tmp_path / "palette_transparent.png", transparency=1)  # palette index 1 transparent -> white
    out["palette_transparent.png"] = np.where(np.array([[0, 1, 0], [0, 1, 0]], bool)[..., None], 255,
                                              colours[np.array([[0, 1, 2], [2, 1, 0]])]).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    out["gray8.png"] = np.repeat(gray[..., None], 3, axis=-1)
    cmyk = np.zeros((2, 3, 4), dtype=np.uint8)
    cmyk[0, 0] = (0, 0, 0, 0)  # white
    cmyk[0, 1] = (0, 0, 0, 255)  # black
    cmyk[0, 2] = (255, 0, 0, 0)  # cyan
    cmyk[1, :] = (0, 255, 255, 0)  # red
    Image.frombytes("CMYK", (3, 2), cmyk.tobytes()).save(tmp_path / "cmyk.tiff")  # naive CMYK: RGB = 255 - (C|M|Y + K)
    out["cmyk.tiff"] = np.array([[[255, 255, 255], [0, 0, 0], [0, 255, 255]], [[255, 0, 0]] * 3], dtype=np.uint8)
    return out


def test_every_mode_decodes_to_the_right_8bit_rgb(tmp_path):
    for name, expected in _image_files(tmp_path).items():
        with Image.open(tmp_path / name) as im:
            got = to_rgb_uint8(im)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    with Image.open(tmp_path / "gray16.png") as im:  # the bug being fixed: PIL's own conversion saturates
        assert im.mode == "I;16" and (np.asarray(im.convert("RGB"))[1] == 255).all()


def test_float_images_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"^\S*float\.tiff is a 32-bit float image.*8- or 16-bit PNG"):
        read_image(tmp_path / "float.tiff")
    (tmp_path / "cls").mkdir()
    (tmp_path / "float.tiff").rename(tmp_path / "cls" / "float.tiff")
    with pytest.raises(ValueError, match=r"cannot read image \S*float\.tiff: .*32-bit float"):
        ImageFolder(tmp_path, 8)[0]


def test_training_and_eval_readers_decode_16bit_pngs_identically(tmp_path):
    (tmp_path / "cls").mkdir()
    v = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(v).save(tmp_path / "cls" / "a.png")
    expected = _expected_from_16(v)
    np.testing.assert_array_equal(read_image(tmp_path / "cls" / "a.png"), expected)
    np.testing.assert_array_equal(next(FolderSource(tmp_path).batches(4))[0], expected)
    ds = ImageFolder(tmp_path, 8)
    np.testing.assert_array_equal(ds.load(ds.items[0][0]), expected)
    img, _ = ds[0]  # model range: exact affine map of the uint8 values, no resize at 8x8
    np.testing.assert_allclose(img[0].numpy(), expected[..., 0] / 127.5 - 1, atol=1e-6)


# ---- empty class folders -----------------------------------------------------------------------------------
def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for cls, count in (("cat", 2), ("dog", 0), ("emu", 1), ("fox", 0)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4, 3), 10 * i, dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "fox" / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()  # hidden: never a class
    return root


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(ValueError, match=r"class folder\(s\) without images: .*dog, .*fox; .*skip_empty_classes") as info:
        ImageFolder(root, 8)
    assert str(root / "dog") in str(info.value) and ".ipynb" not in str(info.value)


def test_empty_class_folders_are_skipped_with_a_counted_warning_by_flag(tmp_path):
    root = _folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipping 2 class folder\(s\) without images \(dog, fox\)"):
        ds = ImageFolder(root, 8, skip_empty_classes=True)
    assert ds.classes == ["cat", "emu"] and ds.skipped_classes == ["dog", "fox"]
    assert [(p.parent.name, label) for p, label in ds.items] == [("cat", 0), ("cat", 0), ("emu", 1)]
    for empty in ("dog", "fox"):
        (root / empty).rename(tmp_path / empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: no warning, same labels
        assert ImageFolder(root, 8, skip_empty_classes=True).classes == ["cat", "emu"]


# ---- test data provenance ----------------------------------------------------------------------------------
def test_reference_data_matches_recorded_sha256():
    readme = (DATA / "README.md").read_text()
    for name in ("golden_tiny.pt", "var_schema.json"):
        recorded = re.search(rf"`{re.escape(name)}`.*`([0-9a-f]{{64}})`", readme)
        assert recorded, f"tests/data/README.md records no sha256 for {name}"
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == recorded.group(1), name


# ---- CI: missing real data fails instead of skipping -------------------------------------------------------
def test_ci_turns_missing_fashion_mnist_skips_into_failures(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('repo_conftest', {str(repo / 'tests' / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "pytest_runtest_makereport = mod.pytest_runtest_makereport\n")
    (tmp_path / "test_data.py").write_text(
        "import pytest\n"
        "def test_call_skip():\n    pytest.skip('needs `apt-get install dataset-fashion-mnist`')\n"
        "@pytest.mark.skipif(True, reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')\n"
        "def test_marked():\n    pass\n"
        "def test_unrelated_skip():\n    pytest.skip('needs a GPU')\n")

    def run(ci: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(repo)}
        env |= {"CI": ci} if ci else {}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                               str(tmp_path), str(tmp_path / "test_data.py")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return proc.stdout.strip().splitlines()[-1]

    # a skipif mark skips in setup, so its failure reports as an error: either way pytest exits non-zero
    with_ci, without = run("true"), run(None)
    assert re.match(r"1 failed, 1 skipped, 1 error", with_ci), with_ci
    assert re.match(r"3 skipped", without), without
