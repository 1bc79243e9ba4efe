"""benchmarks/benchmark.py: one protocol, ratios against the default sampler from the same run."""
from __future__ import annotations

import json

from tests.conftest import make_tiny_pair
from benchmarks import benchmark
from training.checkpoint import save_model


def test_benchmark_protocol_on_tiny_models(tmp_path):
    var, vae = make_tiny_pair(seed=11)
    save_model(tmp_path / "var.safetensors", var)
    save_model(tmp_path / "vae.safetensors", vae)
    out = tmp_path / "bench"
    benchmark.main(["--var", str(tmp_path / "var.safetensors"), "--vae", str(tmp_path / "vae.safetensors"),
                    "--samplers", "default;edit:mask_threshold=0.5", "--batch-sizes", "1,3", "--repeats", "2",
                    "--warmup", "0", "--top-k", "8", "--peak-matmul-size", "256", "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["sampler"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {("default", 1), ("edit:mask_threshold=0.5", 1), ("default", 3), ("edit:mask_threshold=0.5", 3)}
    for batch in (1, 3):
        base, other = rows[("default", batch)], rows[("edit:mask_threshold=0.5", batch)]
        assert base["speedup_vs_default"] == 1.0 and base["repeats"] == 2
        assert base["forwards"] == {"var": var.num_scales}
        assert base["tokens_processed"] == {"var": 2 * batch * var.seq_len}
        # without an image the editing sampler is plain sampling: same seeds, same tokens and images
        assert other["token_agreement_vs_default"] == 1.0 and other["psnr_vs_default_db"] == float("inf")
        assert 0 < base["fraction_of_matmul_peak"] and base["flops"] > 0
        assert base["kv_bytes_peak"] == 2 * var.depth * 2 * batch * var.seq_len * var.embed_dim * 4
    assert rows[("default", 3)]["flops"] > rows[("default", 1)]["flops"]
    assert out.with_suffix(".png").stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "| `default` | 3 |" in table and "matmul peak" in table


def test_benchmark_proxy_quality_column(tmp_path):
    from pathlib import Path

    import pytest
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)")
    var, vae = make_tiny_pair(seed=12, num_classes=10)
    save_model(tmp_path / "var.safetensors", var)
    save_model(tmp_path / "vae.safetensors", vae)
    out = tmp_path / "bench"
    repo = Path(__file__).resolve().parents[1]
    benchmark.main(["--var", str(tmp_path / "var.safetensors"), "--vae", str(tmp_path / "vae.safetensors"),
                    "--samplers", "default,edit", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
                    "--peak-matmul-size", "128", "--proxy-classifier",
                    str(repo / "eval" / "weights" / "fmnist_classifier.safetensors"), "--quality-images", "20",
                    "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["proxy_images"] for r in rows] == [20, 20]
    assert rows[0]["proxy_fd"] == rows[1]["proxy_fd"] > 0  # same seeds, same images
    assert 0.0 <= rows[0]["proxy_accuracy"] <= 1.0
    assert "proxy FD" in out.with_suffix(".md").read_text()
