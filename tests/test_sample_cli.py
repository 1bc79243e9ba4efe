"""sample.py: images independent of batch size and process count, resumable, ADM npz, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sample
from conftest import make_tiny_pair
from training.checkpoint import save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    var, vae = make_tiny_pair(seed=7)
    save_model(root / "var.safetensors", var, extra={"classes": [f"c{i}" for i in range(var.num_classes)]})
    save_model(root / "vae.safetensors", vae)
    return root


def _args(ckpts: Path, out: Path, *extra: str) -> list[str]:
    return ["--vae", str(ckpts / "vae.safetensors"), "--var", str(ckpts / "var.safetensors"), "--classes", "0,2,4",
            "--per-class", "3", "--top-k", "10", "--cfg", "1.5", "--seed", "3", "--out", str(out), *extra]


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_batch_size_does_not_change_images_and_outputs_are_complete(ckpts, tmp_path):
    sample.main(_args(ckpts, tmp_path / "b1", "--batch-size", "1"))
    sample.main(_args(ckpts, tmp_path / "b7", "--batch-size", "7"))
    a, b = _pngs(tmp_path / "b1"), _pngs(tmp_path / "b7")
    assert list(a) == [f"{i:06d}.png" for i in range(9)] and a == b
    npz = np.load(tmp_path / "b7" / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (9, 8, 8, 3)
    assert npz["arr_1"].tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]  # ADM convention: arr_1 = labels
    record = json.loads((tmp_path / "b7" / "sample_config.json").read_text())
    assert record["settings"]["cfg"] == 1.5 and record["num_images"] == 9 and record["software"]["torch"]
    assert (tmp_path / "b7" / "grid.png").is_file()
    stats = [json.loads(line) for line in (tmp_path / "b7" / "stats.jsonl").read_text().splitlines()]
    assert [s["batch"] for s in stats] == [7, 2] and all(s["forwards"]["var"] == 4 for s in stats)
    assert len({v for v in npz["arr_0"].reshape(9, -1).sum(1)}) > 1, "different seeds give different images"


def test_interrupted_run_resumes_without_duplicates_or_gaps(ckpts, tmp_path):
    full = tmp_path / "full"
    sample.main(_args(ckpts, full, "--batch-size", "4"))
    part = tmp_path / "part"
    sample.main(_args(ckpts, part, "--batch-size", "4"))
    for name in ("000002.png", "000005.png", "000008.png"):
        (part / "images" / name).unlink()  # as if the run had stopped before writing them
    (part / "samples.npz").unlink()
    before = {p: os.stat(p).st_mtime_ns for p in (part / "images").glob("*.png")}
    sample.main(_args(ckpts, part, "--batch-size", "4"))
    assert _pngs(part) == _pngs(full)
    assert all(os.stat(p).st_mtime_ns == t for p, t in before.items()), "existing images must not be redone"
    assert np.array_equal(np.load(part / "samples.npz")["arr_0"], np.load(full / "samples.npz")["arr_0"])


def test_two_processes_through_accelerate_give_the_same_images(ckpts, tmp_path):
    sample.main(_args(ckpts, tmp_path / "one", "--batch-size", "2"))
    # `accelerate launch --cpu` runs ONE process; --multi_gpu with the GPUs hidden starts two workers whose
    # Accelerator(cpu=True) forms a gloo group (MULTI_CPU).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(REPO / "sample.py"), *_args(ckpts, tmp_path / "two", "--batch-size", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").glob("stats.rank*.jsonl")) == ["stats.rank0.jsonl", "stats.rank1.jsonl"]


def test_bad_arguments(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="VAR checkpoint .* does not exist"):
        sample.main(["--var", str(tmp_path / "missing.safetensors"), "--vae", str(ckpts / "vae.safetensors")])
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        sample.main(_args(ckpts, tmp_path / "x", "--classes", "0,9"))  # the last --classes wins
    with pytest.raises(KeyError, match="unknown sampler"):
        sample.main(_args(ckpts, tmp_path / "x", "--sampler", "nope"))
    with pytest.raises(ValueError, match="has no option 'window'"):
        sample.main(_args(ckpts, tmp_path / "x", "--sampler-arg", "window=3"))
    with pytest.raises(ValueError, match="1 or 4"):
        sample.main(_args(ckpts, tmp_path / "x", "--temperature", "1,1"))
    with pytest.raises(ValueError, match="cfg must be"):
        sample.main(_args(ckpts, tmp_path / "x", "--cfg", "-1"))


def test_list_samplers(capsys):
    sample.main(["--list-samplers"])
    assert "default" in capsys.readouterr().out


def test_sample_and_evaluate_in_one_command(ckpts, tmp_path):
    from pathlib import Path
    data = Path("/usr/share/datasets/fashion-mnist")
    if not (data / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the proxy's real test set needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)")
    out = tmp_path / "card"
    sample.main(_args(ckpts, out, "--eval-card", "--proxy-classifier",
                      str(REPO / "eval" / "weights" / "fmnist_classifier.safetensors")))
    card = json.loads((out / "eval_card.json").read_text())
    metrics = card["evaluation"]["proxy"]["metrics"]
    assert card["num_samples"] == 9 and card["sampling"]["settings"]["cfg"] == 1.5
    assert 0.0 <= metrics["proxy_accuracy"] <= 1.0 and metrics["proxy_fd"] > 0
    assert "proxy FD" in (out / "eval_card.md").read_text()
    with pytest.raises(ValueError, match="--eval-card needs"):
        sample.main(_args(ckpts, tmp_path / "nocard", "--eval-card"))


def test_extra_models_are_checked(ckpts, tmp_path):
    extra = ["--model", f"refiner={ckpts / 'var.safetensors'}"]
    with pytest.raises(ValueError, match="sampler 'default' does not use --model refiner"):
        sample.main(_args(ckpts, tmp_path / "x", *extra))
    with pytest.raises(ValueError, match="sampler 'code' needs --model refiner=PATH"):
        sample.main(_args(ckpts, tmp_path / "x", "--sampler", "code"))
