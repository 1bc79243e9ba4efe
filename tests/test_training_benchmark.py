"""benchmarks/training_pipeline.py: FLOP counting against an analytic count, throughput from metrics.jsonl,
the result schema, its Markdown tables and plot (no timing is asserted)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import training_pipeline as tp
from benchmarks import training_report, training_scaling
from benchmarks.measure import count_flops, median_iqr
from training.errors import run_cli
from var.config import VARConfig


def analytic_step_flops(B: int, D: int, C: int, L: int, V: int, z: int, first_l: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one VAR training step, written out from the architecture: per sample
    the word embedding of the L - first_l input tokens, per block the AdaLN projection of the class vector
    (C -> 6C), qkv (C -> 3C), attention (q.k and p.v over the dense L x L mask: 2 * 2 L^2 C), the output
    projection and the 4x FFN, then the head's AdaLN (C -> 2C) and the head (C -> V). The backward is twice
    the forward, less the word embedding's input gradient (its input is data)."""
    embed = 2 * (L - first_l) * z * C
    block = 2 * C * 6 * C + 2 * L * C * 3 * C + 4 * L * L * C + 2 * L * C * C + 2 * (2 * L * C * 4 * C)
    fwd = embed + D * block + 2 * C * 2 * C + 2 * L * C * V
    bwd = 2 * fwd - embed
    return B * (fwd + bwd)


def test_step_flops_equal_the_analytic_count():
    cfg = VARConfig(num_classes=3, depth=2, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3), vocab_size=16,
                    z_channels=4, drop_path_rate=0.0)
    _, step = tp.make_train_step(cfg, batch=2, seed=0)
    assert count_flops(step) == analytic_step_flops(B=2, D=2, C=32, L=cfg.seq_len, V=16, z=4)


def test_throughput_from_metrics_log():
    records = [{"step": 1, "loss": 2.0, "wall_s": 3.0}, {"step": 2, "loss": 1.9, "wall_s": 4.0},
               {"step": 2, "val_loss": 1.8},  # a validation line: no wall_s, ignored
               {"step": 3, "loss": 1.7, "wall_s": 5.5}, {"step": 4, "loss": 1.6, "wall_s": 6.5},
               {"step": 5, "loss": 1.5, "wall_s": 8.0, "images_per_s": 5.0}]
    one = training_scaling.log_throughput(records, global_batch=8, warmup_steps=1)
    assert one["timed_steps"] == 4 and one["seconds"] == pytest.approx(5.0)
    assert one["images_per_s"] == pytest.approx(4 * 8 / 5.0) and one["step_s_median"] == pytest.approx(1.25)
    assert one["trainer_images_per_s_median"] == 5.0  # the trainer's own meter is carried along, not used
    two = training_scaling.log_throughput(records, global_batch=8, warmup_steps=2)
    assert two["images_per_s"] == pytest.approx(3 * 8 / 4.0)
    with pytest.raises(ValueError, match="too few"):
        training_scaling.log_throughput(records, global_batch=8, warmup_steps=5)


def test_median_iqr_is_median_and_inclusive_iqr():
    s = median_iqr([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s["median"] == 3.0 and s["iqr"] == pytest.approx(4.0 - 2.0)


def test_quick_data_run_writes_json_plot_and_tables(tmp_path):
    out = tmp_path / "pipeline.json"
    assert tp.main(["--quick", "--sections", "data", "--images", "8", "--batch", "4", "--repeats", "1",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["provisional"] is True and result["meta"]["usable_cpus"] >= 1
    d = result["data"]
    assert [r["num_workers"] for r in d["rows"]] == [0, 2]
    assert d["same_batches"] is True  # workers change the speed, never the batches
    for r in d["rows"]:
        assert r["steady_images_per_s"]["median"] > 0 and len(r["images_per_s"]["values"]) == 1
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.width > 100
    table = training_report.markdown_table(result)
    assert "| 0 |" in table and "| 2 |" in table and "provisional" in table


def test_tables_and_plot_of_every_section(tmp_path):
    cfg = VARConfig(**{**tp.TINY_SHAPE, "depth": 1})
    row = tp.bench_mfu_shape("tiny, depth 1", cfg, batch=2, repeats=1, seed=0)
    peak = 1e10
    row["mfu"] = row["achieved_flops_per_s"] / peak
    s = lambda v: median_iqr([v])  # noqa: E731
    scaling_rows = [{"setup": name, "processes": p, "threads_per_process": 1, "images_per_s": s(ips), "step_s": s(8 / ips),
                     "vs_1_process": s(ips / 10.0)} for name, p, ips in (("1 process", 1, 10.0), ("2 processes", 2, 17.0))]
    result = {"meta": {"date": "2026-01-01T00:00:00+00:00", "machine": "x86_64", "usable_cpus": 2, "torch": "2",
                       "load_average_start": [0.1], "torch_threads": 1, "provisional": False},
              "mfu": {"matmul_peak_flops": peak, "matmul_peak_size": 256, "target_mfu_d16": 0.35, "rows": [row]},
              "scaling": {"model": {"depth": 6, "embed_dim": 128}, "image_size": 32, "global_batch": 8, "steps": 6,
                          "warmup_steps": 1, "usable_cpus": 2, "target_scaling": 1.6, "rows": scaling_rows}}
    table = training_report.markdown_table(result)
    assert f"{100 * row['mfu']:.1f} %" in table and "| 2 processes | 1 |" in table and "1.70x" in table
    assert "provisional" not in table
    assert len(training_report.panels(result)) == 3
    with Image.open(training_report.save_plot(result, tmp_path / "p.png")) as png:
        assert png.format == "PNG"


@pytest.mark.parametrize("argv, words", [(["--sections", "data,gpu"], "--sections"),
                                         (["--out", "x.png"], "must end in .json"),
                                         (["--steps", "3", "--warmup-steps", "2"], "--warmup-steps")])
def test_bad_arguments_are_one_line_errors(argv, words, capsys):
    assert run_cli(tp.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
