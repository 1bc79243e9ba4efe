"""Second backend: torch-fidelity, given the same local Inception weights file (random weights, nothing downloaded).

Measured with the end-to-end test below (20 + 20 images, random weights): FID 1720.66499764 (ours) vs
1720.66499475, IS 1.00213949 vs 1.00213949 (6e-9 relative), KID 1000.48146 vs 1000.48063 (8e-7 relative:
torch-fidelity evaluates the cubic kernel in float32). Known, bounded differences:
  * torch-fidelity shuffles the logits (seeded) before the IS splits; ours splits in order, like ADM. Equal
    with samples_shuffle=False, or with one split.
  * KID subsets come from different generators; equal when the subset is the whole set, otherwise the two
    differ by subset sampling noise, bounded below by their reported standard deviations.
  * tr((S1 S2)^1/2) comes from eigenvalues there and from sqrtm here: equal to ~1e-9 relative.
"""
import numpy as np
import pytest
import torch

tf_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   reason="torch-fidelity not installed (pip install -r requirements-test.txt)")
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402

from eval.frechet import feature_stats, frechet_distance  # noqa: E402
from eval.inception import InceptionFeatures, load_fid_inception, random_fid_inception  # noqa: E402
from eval.metrics import inception_score, kernel_inception_distance  # noqa: E402

REAL_TORCH_LOAD = torch.load


def _weights_only_load(*args, **kwargs):
    """torch-fidelity loads the weights file with weights_only=False (pickle); this project loads nothing
    with pickle, so its torch.load is forced to the tensor-only loader (the file is a plain state dict)."""
    return REAL_TORCH_LOAD(*args, **{**kwargs, "weights_only": True})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.set_num_threads(1)
    net = random_fid_inception(seed=0)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)  # the same file goes into both backends
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception.torch, "load", _weights_only_load)
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("must never download"))
        yield path


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def test_adm_mode_features_equal_torch_fidelity(weights):
    theirs = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                      feature_extractor_weights_path=str(weights))
    ours = InceptionFeatures.from_file(weights, mode="adm")
    exact = InceptionFeatures(*load_fid_inception(weights), channels_last=False, mode="adm")  # their conv kernels
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (48, 40)):
        img_B3HW = torch.from_numpy(rng.integers(0, 256, size=(2, 3, h, w), dtype=np.uint8))
        with torch.no_grad():
            pool, logits = theirs(img_B3HW)
            out, fast = exact(img_B3HW.float() / 255), ours(img_B3HW.float() / 255)
        assert pool.std() > 0.1
        torch.testing.assert_close(out["pool"], pool, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast["pool"], pool, rtol=1e-4, atol=1e-4)  # channels_last: reassociation only
        # guard: pytorch-fid's input path (our "recompute") gives clearly different features
        with torch.no_grad():
            assert (exact.with_mode("recompute")(img_B3HW.float() / 255)["pool"] - pool).abs().max() > 1e-3


def test_metrics_agree_on_shared_features():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 32)).astype(np.float32)
    fake = (rng.normal(size=(400, 32)) * 1.2 + 0.3).astype(np.float32)
    logits = (rng.normal(size=(400, 50)) * 3).astype(np.float32)
    a, b = feature_stats(fake), feature_stats(real)
    ours_fid = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    theirs_fid = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(fake)),
                                          fid_features_to_statistics(torch.from_numpy(real)), False)
    assert _rel(ours_fid, theirs_fid["frechet_inception_distance"]) < 1e-6
    theirs_is = isc_features_to_metric(torch.from_numpy(logits), splits=4, shuffle=False)
    ours_is = inception_score(logits, splits=4)
    assert _rel(ours_is[0], theirs_is["inception_score_mean"]) < 1e-9
    assert _rel(ours_is[1], theirs_is["inception_score_std"]) < 1e-6
    shuffled = isc_features_to_metric(torch.from_numpy(logits), splits=1, shuffle=True)  # one split: order-free
    assert _rel(inception_score(logits, splits=1)[0], shuffled["inception_score_mean"]) < 1e-9
    whole = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=2, kid_subset_size=400,
                                   verbose=False)
    ours_kid, _ = kernel_inception_distance(real, fake, num_subsets=2, subset_size=400)
    assert _rel(ours_kid, whole["kernel_inception_distance_mean"]) < 1e-4


def test_kid_with_random_subsets_differs_only_by_subset_noise():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(600, 16)).astype(np.float32), (rng.normal(size=(600, 16)) + 0.2).astype(np.float32)
    subsets = 30
    theirs = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=subsets,
                                    kid_subset_size=100, verbose=False)
    mean, std = kernel_inception_distance(real, fake, num_subsets=subsets, subset_size=100)
    noise = np.sqrt((std**2 + theirs["kernel_inception_distance_std"] ** 2) / subsets)
    assert abs(mean - theirs["kernel_inception_distance_mean"]) < 4 * noise
    assert abs(mean - theirs["kernel_inception_distance_mean"]) > 1e-6 * abs(mean)  # they really are other subsets


@pytest.mark.slow  # 80 Inception forwards at 299x299: ~1.5 min on 2 busy cores
def test_end_to_end_fid_is_kid_agree_with_torch_fidelity(weights):
    import warnings

    import torch_fidelity

    from eval.data import ArraySource
    from eval.features import extract_features
    from eval.harness import Reference, evaluate, stats_from_features

    n = 20
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    fake = (real.astype(np.int64) // 2 + rng.integers(0, 128, size=real.shape)).astype(np.uint8)

    class Images(torch.utils.data.Dataset):
        def __init__(self, arr_NHWC):
            self.arr = torch.from_numpy(arr_NHWC).permute(0, 3, 1, 2).contiguous()

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), cuda=False, isc=True, fid=True, kid=True,
        feature_extractor_weights_path=str(weights), kid_subset_size=n, kid_subsets=3, isc_splits=2,
        samples_shuffle=False, cache=False, verbose=False, batch_size=n)
    net = InceptionFeatures.from_file(weights, mode="adm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 20 samples for 2048 dimensions: rank-deficient by design
        ref_feats = extract_features(net, ArraySource(real), n, "cpu", keys=("pool",))
        reference = Reference(stats_from_features(ref_feats, "real"), ref_feats, {})
        ours = evaluate(net, ArraySource(fake), reference, batch_size=n, device="cpu", is_splits=2, kid_subsets=3,
                        kid_subset_size=n)["metrics"]
    assert _rel(ours["fid"], theirs["frechet_inception_distance"]) < 1e-4
    assert _rel(ours["is"], theirs["inception_score_mean"]) < 1e-4
    assert _rel(ours["kid"], theirs["kernel_inception_distance_mean"]) < 1e-4
