"""The offline proxy classifier: shipped weights, accuracy on real data, file format, input convention."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eval.data import ArraySource, fashion_mnist_uint8
from eval.features import extract_features, extract_from_tensors
from eval.real_reference import blurred, class_balanced, from_padded_layout, reconstructed
from tests.conftest import make_tiny_pair
from training.checkpoint import save_model
from eval.proxy import ClassifierConfig, ProxyClassifier, load_classifier, save_classifier

SHIPPED = Path(__file__).resolve().parents[1] / "eval" / "weights" / "fmnist_classifier.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_shipped_classifier_record_and_config():
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["test_accuracy"] >= 0.90
    net = load_classifier(SHIPPED)
    assert net.config.num_classes == 10 and len(net.config.class_names) == 10 and len(net.weights_sha256) == 64


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_shipped_classifier_accuracy_on_real_test_images():
    from eval.data import fashion_mnist_uint8
    from eval.features import uint8_to_input

    torch.set_num_threads(1)
    images, labels, _ = fashion_mnist_uint8(FMNIST, "test", 32)
    idx = np.random.default_rng(0).choice(len(labels), 2000, replace=False)
    net = load_classifier(SHIPPED)
    with torch.inference_mode():
        logits = torch.cat([net(uint8_to_input(images[idx[i:i + 500]], torch.device("cpu")))["logits"]
                            for i in range(0, 2000, 500)])
    assert (logits.argmax(1).numpy() == labels[idx]).mean() >= 0.88  # 2000-image subsample of a >= 90 % model


def test_save_load_round_trip_and_input_convention(tmp_path):
    torch.manual_seed(0)
    net = ProxyClassifier(ClassifierConfig(widths=(4, 8), feature_dim=6)).eval()
    save_classifier(tmp_path / "c.safetensors", net, {"test_accuracy": 0.5})
    loaded = load_classifier(tmp_path / "c.safetensors")
    gray = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a = net(gray.expand(-1, 3, -1, -1))
        torch.testing.assert_close(loaded(gray.expand(-1, 3, -1, -1))["logits"], a["logits"])
        # grayscale replicated to RGB and the single-channel image are the same input
        torch.testing.assert_close(net(gray)["pool"], a["pool"])
        assert net(torch.rand(2, 3, 64, 64))["pool"].shape == (2, 6)  # other sizes are resized
    assert json.loads((tmp_path / "c.json").read_text())["config"]["feature_dim"] == 6


def test_foreign_safetensors_file_is_rejected(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a proxy classifier"):
        load_classifier(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="eval.train_classifier"):
        load_classifier(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("pad_small", [True, False])
def test_real_image_layout_is_the_tokenizer_training_layout(pad_small):
    """The FD reference / classifier / model-card images are the pixels the tokenizer's training loader
    produces (training.loader.ImageSamples with data.pad_small), for both layouts."""
    from eval.data import fashion_mnist_uint8
    from training.data import FashionMNIST
    from training.loader import ImageSamples
    from training.transforms import VARTransform

    size = 32 if pad_small else 64
    images, labels, _ = fashion_mnist_uint8(FMNIST, "test", size, pad_small)
    loader_items = ImageSamples(FashionMNIST(FMNIST, "test", size), VARTransform(size, pad_small=pad_small), seed=0)
    for i in (0, 17, 9999):
        img, label, _ = loader_items[i]
        ours = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 127.5 - 1
        assert label == labels[i] and torch.equal(ours, img)


def test_classifier_layout_fields_round_trip(tmp_path):
    net = ProxyClassifier(ClassifierConfig(widths=(4, 8), feature_dim=6, pad_small=False, data_size=64)).eval()
    path = save_classifier(tmp_path / "c.safetensors", net)
    loaded = load_classifier(path)
    assert (loaded.config.pad_small, loaded.config.real_image_size, loaded.config.image_size) == (False, 64, 32)
    assert ClassifierConfig().real_image_size == 32 and ClassifierConfig().pad_small
    with pytest.raises(ValueError, match="data_size"):
        ClassifierConfig(data_size=16)


def test_real_reference_helpers():
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2])
    assert class_balanced(labels, 6).tolist() == [1, 3, 2, 5, 0, 4]  # the first 2 of each class, class order
    with pytest.raises(ValueError, match="multiple of the 3 classes"):
        class_balanced(labels, 4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(blurred(images, 1), images)
    flat = np.full((1, 8, 8, 3), 77, np.uint8)
    assert np.array_equal(blurred(flat, 2), flat)  # a constant image has no detail to lose
    checker = ((np.indices((8, 8)).sum(0) % 2) * 200).astype(np.uint8)[None, :, :, None].repeat(3, -1)
    assert np.array_equal(blurred(checker, 2), np.full_like(checker, 100))  # period-2 detail averages out
    # the image mean survives: box averages, then interpolation between them
    assert abs(float(blurred(images, 4).mean()) - float(images.mean())) < 2.0


def test_padded_samples_move_to_the_upsampled_layout_bitwise(fashion_mnist_root):
    """A real image in the 32 px layout, moved, is the same image in the 64 px layout: 32 px samples are scored
    by the 64 px classifier exactly as the 64 px models' samples are."""
    padded, labels, _ = fashion_mnist_uint8(fashion_mnist_root, "test", 32, pad_small=True)
    upsampled, labels64, _ = fashion_mnist_uint8(fashion_mnist_root, "test", 64, pad_small=False)
    assert np.array_equal(from_padded_layout(padded[:16], content=28, size=64), upsampled[:16])
    assert np.array_equal(labels[:16], labels64[:16])
    with pytest.raises(ValueError, match="cannot hold"):
        from_padded_layout(padded[:1, :20, :20], content=28, size=64)


def test_reconstructions_are_the_decoded_tokens(tmp_path):
    _, vae = make_tiny_pair()
    path = save_model(tmp_path / "vae.safetensors", vae)
    size = vae.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    out = reconstructed(images, str(path), batch_size=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = vae.tokens_to_img(vae.img_to_tokens(x)).add(1).div(2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(float) / 255 - want.permute(0, 2, 3, 1).clamp(0, 1).numpy()).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="takes"):
        reconstructed(images[:, :size // 2, :size // 2], str(path))


@pytest.mark.slow  # 18 s: features of the 10,000 test images, twice
def test_ref_stats_file_uses_the_classifiers_real_image_layout(fashion_mnist_root, tmp_path):
    """eval.ref_stats --fashion-mnist renders the real images as the proxy's reference does everywhere else
    (the 64 px classifier: upsampled to 64 px, not padded to its 32 px input)."""
    from eval.data import load_ref_stats
    from eval.harness import fashion_mnist_reference
    from eval.ref_stats import main as ref_stats

    weights = SHIPPED.with_name("fmnist64_classifier.safetensors")
    ref_stats(["--fashion-mnist", str(fashion_mnist_root), "--proxy-classifier", str(weights), "--no-features",
               "--out", str(tmp_path / "ref.npz"), "--batch-size", "1000"])
    written = load_ref_stats(tmp_path / "ref.npz")
    expected = fashion_mnist_reference(fashion_mnist_root, load_classifier(weights), batch_size=1000).stats
    assert written.meta["source"]["image_size"] == 64 and written.meta["source"]["pad_small"] is False
    np.testing.assert_allclose(written.arrays["mu"], expected["mu"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(written.arrays["sigma"], expected["sigma"], rtol=0, atol=1e-6)


def test_features_are_plain_fp32_even_inside_autocast_and_with_tf32_on():
    """Feature extraction turns autocast and TF32 off for its forwards and restores the caller's settings."""
    seen = []

    class Recording(ProxyClassifier):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.allow_tf32))
            return super().forward(x)

    net = Recording(ClassifierConfig(widths=(4, 8), feature_dim=3)).eval()
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = extract_features(net, ArraySource(images), keys=("pool",))
            extract_from_tensors(net, torch.zeros(2, 3, 32, 32), keys=("pool",))
        assert seen == [(False, False, False)] * 2 and feats["pool"].dtype == np.float32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
