"""Evaluation inputs (folders, npz, statistics files), bad-input errors, and the CLIs end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.data import (ArraySource, FolderSource, fashion_mnist_uint8, load_ref_stats, open_images,
                       save_ref_stats, stats_hash)
from eval.frechet import RankDeficientWarning
from eval.harness import load_reference
from eval.proxy import ClassifierConfig, ProxyClassifier, load_classifier, save_classifier



def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_folder_and_npz_give_identical_pixels(tmp_path):
    imgs = _images(5)
    _write_pngs(tmp_path / "png", imgs)
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=np.arange(5))
    folder, npz = open_images(tmp_path / "png"), open_images(tmp_path / "s.npz")
    np.testing.assert_array_equal(np.concatenate(list(folder.batches(2))), imgs)
    np.testing.assert_array_equal(np.concatenate(list(npz.batches(3))), imgs)
    assert npz.labels.tolist() == [0, 1, 2, 3, 4] and folder.labels is None


def test_corrupt_png_error_names_the_file(tmp_path):
    _write_pngs(tmp_path / "a", _images(2))
    (tmp_path / "a" / "000002.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="000002.png"):
        FolderSource(tmp_path / "a")
    # a truncated PNG has a valid header: it must fail when decoded, still naming the file
    _write_pngs(tmp_path / "b", _images(2))
    data = (tmp_path / "b" / "000001.png").read_bytes()
    (tmp_path / "b" / "000001.png").write_bytes(data[: len(data) // 2])
    src = FolderSource(tmp_path / "b")
    with pytest.raises(ValueError, match="000001.png"):
        list(src.batches(2))


def test_mixed_sizes_are_rejected(tmp_path):
    _write_pngs(tmp_path, _images(2, 32))
    Image.fromarray(_images(1, 16)[0]).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="mixed sizes.*odd.png"):
        FolderSource(tmp_path)


def test_npz_without_arr_0_names_the_key(tmp_path):
    np.savez(tmp_path / "x.npz", images=_images(2))
    with pytest.raises(KeyError, match="arr_0"):
        open_images(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(_images(2).astype(np.float32))


def test_ref_stats_round_trip_hash_and_tamper_detection(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"mu": rng.normal(size=4), "sigma": np.eye(4), "pool": rng.normal(size=(10, 4)).astype(np.float32)}
    h = save_ref_stats(tmp_path / "ref.npz", arrays, {"network": {"name": "x"}})
    assert list(tmp_path.iterdir()) == [tmp_path / "ref.npz"]  # atomic: no temp file left behind
    ref = load_ref_stats(tmp_path / "ref.npz")
    assert ref.content_hash == h == stats_hash(arrays) and ref.meta["network"]["name"] == "x"
    np.testing.assert_array_equal(ref.arrays["pool"], arrays["pool"])
    with np.load(tmp_path / "ref.npz") as d:
        tampered = {k: d[k] for k in d.files}
    tampered["mu"] = tampered["mu"] + 1
    np.savez(tmp_path / "bad.npz", **tampered)
    with pytest.raises(ValueError, match="hash mismatch"):
        load_ref_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    with pytest.raises(KeyError, match="mu"):
        load_ref_stats(tmp_path / "nomu.npz")


def test_adm_style_stats_and_shape_check(tmp_path):
    np.savez(tmp_path / "adm.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    assert load_ref_stats(tmp_path / "adm.npz").meta["format"] == "adm-reference-batch"
    np.savez(tmp_path / "broken.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="do not fit"):
        load_ref_stats(tmp_path / "broken.npz")


def test_statistics_of_wrong_dimension_are_rejected(tmp_path):
    net = ProxyClassifier(ClassifierConfig(widths=(4, 8), feature_dim=16)).eval()
    np.savez(tmp_path / "inception_like.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="dimension 2048.*16-d"):
        load_reference(tmp_path / "inception_like.npz", net)


def test_fashion_mnist_layout_matches_training_data(fashion_mnist_root):
    from training.data import FashionMNIST

    imgs, labels, _ = fashion_mnist_uint8(fashion_mnist_root, "test", 32)
    ds = FashionMNIST(fashion_mnist_root, "test", 32)
    for i in (0, 17, 9999):
        x, y = ds[i]
        np.testing.assert_allclose(imgs[i].transpose(2, 0, 1) / 255.0, ((x + 1) / 2).numpy(), atol=1e-6)
        assert labels[i] == y


def test_proxy_cli_end_to_end(tmp_path):
    from eval import card, fid, ref_stats

    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_classifier(clf, ProxyClassifier(ClassifierConfig(widths=(4, 8), feature_dim=6)))
    assert load_classifier(clf).feature_dims["pool"] == 6
    real, fake = _images(40, seed=1), _images(30, seed=2)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake, arr_1=np.arange(30) % 10)
    assert ref_stats.main(["--images", str(tmp_path / "real.npz"), "--proxy-classifier", str(clf),
                           "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]) == 0
    assert fid.main(["--samples", str(tmp_path / "fake.npz"), "--proxy-classifier", str(clf), "--proxy-ref",
                     str(tmp_path / "ref.npz"), "--out", str(tmp_path / "m.json"), "--device", "cpu",
                     "--kid-subsets", "5"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["proxy"]["metrics"]
    assert set(m) >= {"proxy_fd", "proxy_kid", "proxy_accuracy", "proxy_precision", "proxy_recall"}
    assert not any(k in m for k in ("fid", "is", "kid"))  # the proxy is never reported under FID/IS names
    # same images as reference: the proxy FD is ~0 and the statistics hash is quoted in the report
    fid.main(["--samples", str(tmp_path / "real.npz"), "--proxy-classifier", str(clf), "--proxy-ref",
              str(tmp_path / "ref.npz"), "--out", str(tmp_path / "same.json"), "--device", "cpu", "--kid-subsets", "5"])
    same = json.loads((tmp_path / "same.json").read_text())["proxy"]
    assert abs(same["metrics"]["proxy_fd"]) < 1e-6
    assert same["reference"]["content_sha256"] == load_ref_stats(tmp_path / "ref.npz").content_hash
    # the eval card reuses the metrics JSON and quotes the sampling record
    (tmp_path / "record.json").write_text(json.dumps({"sampler": "default", "cfg": 1.5}))
    card.main(["--samples", str(tmp_path / "fake.npz"), "--metrics", str(tmp_path / "m.json"),
               "--sample-record", str(tmp_path / "record.json"), "--card", str(tmp_path / "card")])
    md = (tmp_path / "card.md").read_text()
    assert "| cfg | 1.5 |" in md and "proxy FD" in md and "not FID" in md and "| FID |" not in md
    # evaluating afresh, --out also writes the metrics JSON (the same numbers eval.fid wrote)
    card.main(["--samples", str(tmp_path / "fake.npz"), "--proxy-classifier", str(clf), "--proxy-ref",
               str(tmp_path / "ref.npz"), "--device", "cpu", "--kid-subsets", "5", "--card", str(tmp_path / "card2"),
               "--out", str(tmp_path / "m2.json")])
    again = json.loads((tmp_path / "m2.json").read_text())["proxy"]["metrics"]
    assert again["proxy_fd"] == pytest.approx(m["proxy_fd"]) and (tmp_path / "card2.json").is_file()


@pytest.mark.slow  # two 2048x2048 matrix square roots and a 100 MB weights file: ~1 min on 2 busy cores
def test_inception_cli_end_to_end_with_random_weights(tmp_path):
    from eval import card, fid
    from eval.inception import random_fid_inception

    torch.set_num_threads(1)
    weights = tmp_path / "pt_inception.pth"
    torch.save(random_fid_inception(0).state_dict(), weights)
    np.savez(tmp_path / "ref.npz", arr_0=_images(6, 24, seed=3))
    np.savez(tmp_path / "fake.npz", arr_0=_images(6, 24, seed=4))
    (tmp_path / "record.json").write_text(json.dumps({"sampler": "default", "cfg": 1.5, "seed": 0}))
    with pytest.warns(RankDeficientWarning):
        card.main(["--samples", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception",
                   str(weights), "--device", "cpu", "--is-splits", "2", "--kid-subsets", "3",
                   "--sample-record", str(tmp_path / "record.json"), "--card", str(tmp_path / "card")])
    c = json.loads((tmp_path / "card.json").read_text())
    m = c["evaluation"]["inception"]["metrics"]
    assert set(m) >= {"fid", "sfid", "is", "kid", "precision", "recall"} and m["fid"] > 0
    assert c["sampling"]["cfg"] == 1.5
    md = (tmp_path / "card.md").read_text()
    assert "| FID |" in md and "| cfg | 1.5 |" in md and c["evaluation"]["inception"]["reference"]["content_sha256"] in md
