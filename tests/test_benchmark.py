"""benchmarks/benchmark.py (with contenders.py and rows.py): one protocol, interleaved rounds, ratios against the
baseline of the same rounds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_pair
from benchmarks import benchmark, contenders
from benchmarks.readme_tables import markdown_table
from benchmarks.reference_loop import ReferenceContender
from samplers import Sampler
from training.checkpoint import save_model


def _files(tmp_path, seed=11, **kw):
    var, vae = make_tiny_pair(seed=seed, **kw)
    save_model(tmp_path / "var.safetensors", var)
    save_model(tmp_path / "vae.safetensors", vae)
    return var, ["--var", str(tmp_path / "var.safetensors"), "--vae", str(tmp_path / "vae.safetensors")]


def test_benchmark_protocol_on_tiny_models(tmp_path):
    var, models = _files(tmp_path)
    out = tmp_path / "bench"
    specs = ["default", "edit:mask_threshold=0.5", "default:rng=reference", "default:top_k=3,batches=3"]
    with pytest.raises(ValueError, match="no option 'top_k'"):  # sampling settings are global, not per spec
        contenders.parse_spec(specs[-1])
    window = "scalekv:policy=window,budget_frac=0.5"
    benchmark.main(models + [a for s in specs[:3] + [window] for a in ("--sampler", s)] + [
        "--batch-sizes", "1,3", "--repeats", "2", "--warmup", "0", "--top-k", "8", "--peak-matmul-size", "128",
        "--num-threads", "1", "--noise-threshold", "0", "--profile", "1", "--count-flops", "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["sampler"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {(s, b) for s in specs[:3] + [window] for b in (1, 3)}
    # the window keeps round(0.5 x 14) = 7 entries of the 14 the uncompressed cache carries into the last scale
    peak_len = var.begin_ends[-2][1]
    assert rows[(window, 3)]["kv_kept_ratio_vs_baseline"] == round(0.5 * peak_len) / peak_len
    assert "kv_kept_ratio_vs_baseline" not in rows[("default", 3)]
    # model FLOPs per image at the smallest batch: the baseline's own ratio is 1; attending to half the cache in
    # the last scales costs fewer FLOPs; the same sampler with another RNG costs the same
    flops = {s: rows[(s, 1)]["model_flops_per_image"] for s in specs[:3] + [window]}
    assert rows[("default", 1)]["model_flop_ratio_vs_baseline"] == 1.0 and "model_flops_per_image" not in rows[("default", 3)]
    assert flops["default:rng=reference"] == flops["default"] > flops[window] > 0
    assert results["meta"]["protocol"] == 2 and results["meta"]["load_average_start"] is not None
    for batch in (1, 3):
        base, edit, ref_rng = (rows[(s, batch)] for s in specs[:3])
        # threshold 0 makes every row noisy: each is re-measured once, with twice the rounds, with the baseline
        assert base["remeasured"] and base["repeats"] == 4 and len(base["first_round"]["times_s"]) == 2
        assert base["speedup_vs_baseline"] == 1.0
        assert edit["speedup_vs_baseline"] == pytest.approx(base["median_s"] / edit["median_s"])
        assert base["forwards"] == {"var": var.num_scales}
        assert base["tokens_processed"] == {"var": 2 * batch * var.seq_len}
        assert base["kv_bytes_peak"] == 2 * var.depth * 2 * batch * var.seq_len * var.embed_dim * 4
        # without an image the editing sampler is plain sampling: same seed, same tokens and images
        assert edit["token_agreement_vs_baseline"] == 1.0 and edit["psnr_vs_baseline_db"] == float("inf")
        assert ref_rng["engine"] == {"compile": None, "rng": "reference", "precision": "fp32"}
        t = base["transformer"]
        assert t["flops"] > 0 and 0 < t["share_of_wall"] <= 1 and t["fraction_of_matmul_peak"] > 0
    assert rows[("default", 3)]["transformer"]["flops"] == 3 * rows[("default", 1)]["transformer"]["flops"]
    prof = results["checks"]["1"]["profiles"]["default"]
    shares = [o["share"] for o in prof["top_ops"]]
    assert prof["calls"] == 1 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert out.with_suffix(".png").stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(results)
    assert "| `default` | 3 |" in table and "matmul peak" in table and "`default:rng=reference`" in table


def test_transformer_flops_are_linear_in_the_batch():
    """The protocol counts FLOPs once, at the smallest batch, and scales them: true only because every row of
    the forward is independent. Checked here by counting at two batch sizes."""
    var, vae = make_tiny_pair(seed=3)
    sampler = Sampler(var, vae)
    counted = []
    for batch in (1, 4):
        meter = contenders.TransformerMeter(var)
        meter.counting = True
        with meter:
            sampler.sample(torch.arange(batch) % var.num_classes, seed=0, decode=False, top_k=5)
        counted.append(meter.flops)
        assert len(meter.calls_s) == 2 * var.num_scales  # blocks and head, once per scale
    assert counted[0] > 0 and counted[1] == 4 * counted[0]
    hooked = [m for m in var.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked  # the meter's hooks are removed on exit


def test_rounds_alternate_order_and_warmup_is_not_timed():
    calls = []

    def contender(name):
        def call():
            calls.append(name)
            return float(len(calls))
        return call

    times, first = contenders.measure({k: contender(k) for k in "ABC"}, repeats=3, warmup=1)
    assert "".join(calls) == "ABC" + "ABC" + "CBA" + "ABC"
    assert first == {"A": 1.0, "B": 2.0, "C": 3.0}
    assert times == {"A": [4.0, 9.0, 10.0], "B": [5.0, 8.0, 11.0], "C": [6.0, 7.0, 12.0]}


@pytest.mark.parametrize("times", [[1.0, 1.0, 1.2, 1.4, 1.4], [1.0, 1.01, 1.02, 1.03, 1.04], [2.0, 1.0, 3.0, 1.5]])
def test_spread_and_noisy_flag_match_numpy_percentiles(times):
    s = contenders.summarise(times, batch=2, threshold=0.1)
    q1, q3 = np.percentile(times, [25, 75])
    assert s["median_s"] == pytest.approx(np.median(times)) and s["iqr_s"] == pytest.approx(q3 - q1)
    assert s["noisy"] == bool(q3 - q1 > 0.1 * np.median(times))
    assert s["per_image_s"] == pytest.approx(np.median(times) / 2)


def test_spec_parsing_separates_engine_settings_and_batches():
    s = contenders.parse_spec("code+scalekv:draft_scales=3,compile=default,rng=reference,budget_frac=0.35,batches=1/16")
    assert (s.name, s.engine, s.batches) == ("code+scalekv", {"compile": "default", "rng": "reference"}, [1, 16])
    assert s.options == {"draft_scales": 3, "budget_frac": 0.35}
    r = contenders.parse_spec("reference:full,batches=1")
    assert (r.name, r.options, r.batches) == ("reference", {"full": True}, [1])
    with pytest.raises(ValueError, match="reference takes only"):
        contenders.parse_spec("reference:rng=fast")


class _FakeReferenceVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoded = 0

    def fhat_to_img(self, f_hat):
        self.decoded += 1
        return torch.zeros(f_hat.shape[0], 3, 8, 8)


class _FakeReferenceVAR:
    """The two attributes of the public VAR the contender touches, and its last line (decode, de-normalise)."""
    patch_nums, Cvae = (1, 2), 4

    def __init__(self):
        self.vae_proxy = (_FakeReferenceVAE(),)

    def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p, more_smooth):
        f_hat = torch.full((B, self.Cvae, 2, 2), float(g_seed))
        return self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)


def test_reference_contender_shadows_or_pairs_the_decoder():
    sampling = dict(cfg=1.5, top_k=0, top_p=0.0)
    ref = _FakeReferenceVAR()
    gen_only = ReferenceContender(ref, 2, torch.zeros(2, dtype=torch.long), 7, sampling, full=False)
    gen_only()
    assert ref.vae_proxy[0].decoded == 0 and torch.equal(gen_only.images, torch.full((2, 4, 2, 2), 4.0))
    assert "fhat_to_img" not in ref.vae_proxy[0].__dict__  # the shadow is removed after the call
    full = ReferenceContender(ref, 2, torch.zeros(2, dtype=torch.long), 7, sampling, full=True)
    full()
    full()
    assert ref.vae_proxy[0].decoded == 4 and len(full.decoder_times) == 2  # its call + its decoder alone


@pytest.mark.slow  # 16 s of sampling and proxy scoring
def test_benchmark_proxy_quality_column(tmp_path):
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)")
    _, models = _files(tmp_path, seed=12, num_classes=10)
    out = tmp_path / "bench"
    repo = Path(__file__).resolve().parents[1]
    benchmark.main(models + ["--sampler", "default", "--sampler", "edit", "--batch-sizes", "4", "--repeats", "1",
                             "--warmup", "0", "--peak-matmul-size", "128", "--proxy-classifier",
                             str(repo / "eval" / "weights" / "fmnist_classifier.safetensors"), "--quality-images", "20",
                             "--paired-fd", "default..edit", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [r["proxy_images"] for r in rows] == [20, 20]
    assert rows[0]["proxy_fd"] == rows[1]["proxy_fd"] > 0  # same seeds, same images
    [pair] = result["paired_fd"]
    assert (pair["a"], pair["b"], pair["fd_difference"], pair["ci"], pair["significant"]) == ("default", "edit", 0.0,
                                                                                             [0.0, 0.0], False)
    assert 0.0 <= rows[0]["proxy_accuracy"] <= 1.0
    assert "proxy FD" in out.with_suffix(".md").read_text()


def test_paired_fd_is_the_difference_of_the_two_fds_and_names_unknown_specs():
    from types import SimpleNamespace

    from benchmarks.quality import paired_fd
    from eval.frechet import frechet_distance
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 5))
    ref = SimpleNamespace(feats={"pool": real}, stats={"mu": real.mean(0), "sigma": np.cov(real, rowvar=False)})
    quality = SimpleNamespace(reference=ref, seed=0)
    a = rng.normal(size=(200, 5)) + 0.5
    feats = {"x": a, "y": a + 0.1 * rng.normal(size=a.shape)}
    [pair] = paired_fd(quality, feats, [("x", "y")])
    fd = {k: frechet_distance(v.mean(0), np.cov(v, rowvar=False), ref.stats["mu"], ref.stats["sigma"]) for k, v in feats.items()}
    assert pair["fd_difference"] == pytest.approx(fd["x"] - fd["y"], rel=1e-6)
    assert pair["ci"][0] <= pair["fd_difference"] <= pair["ci"][1] and "paired" in pair["method"]
    with pytest.raises(ValueError, match="no proxy scores for 'z'"):
        paired_fd(quality, feats, [("x", "z")])
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["--paired-fd", "default"])
