"""sample.py through its command line: seeds, batch-size and process-count invariance (bitwise PNGs),
resuming only with the same settings, --overwrite, and options checked before anything is written."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sample import main as sample_main
from samplers.seeding import image_seed
from training.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "fmnist"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def sample(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "sample.py", "--out", str(out), "--num-threads", "1", "--grid-max", "0", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---- seeds --------------------------------------------------------------------------------------------
def test_image_seeds_fit_every_generator_and_never_share_a_cpu_stream_within_a_run():
    n = 200_000
    for base in (0, 1, 2**32, -1):
        seeds = [image_seed(base, i) for i in range(n)]
        assert all(0 <= s < 2**63 for s in seeds)
        assert len({s & 0xFFFFFFFF for s in seeds}) == n  # what the CPU generator keeps: a bijection of i
    # base seeds that differ by multiples of 2**32 (all identical under the old seed * 2**32 + i) now differ
    low = [{image_seed(base, i) & 0xFFFFFFFF for i in range(5000)} for base in (0, 1, 2, 2**32)]
    assert all(len(a & b) <= 1 for j, a in enumerate(low) for b in low[j + 1:])
    draws = [torch.randn(4, generator=torch.Generator().manual_seed(image_seed(b, 0))) for b in (0, 1, 0)]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


@pytest.mark.slow  # 4 runs of sample.py
def test_base_seed_changes_every_image_and_repeats_bitwise(tmp_path):
    args = ("--classes", "0,7", "--per-class", "2", "--batch-size", "4")
    sample(tmp_path / "s0", *args, "--seed", "0")
    sample(tmp_path / "s0b", *args, "--seed", "0")
    sample(tmp_path / "s1", *args, "--seed", "1")
    a, again, b = pngs(tmp_path / "s0"), pngs(tmp_path / "s0b"), pngs(tmp_path / "s1")
    assert len(a) == 4 and a == again
    assert all(a[name] != b[name] for name in a), "a new --seed must change every image"


def test_precision_is_handed_to_the_sampler_and_fp32_matches_the_cpu_default(tmp_path):
    args = ("--classes", "4", "--per-class", "2")
    sample(tmp_path / "default", *args)
    sample(tmp_path / "fp32", *args, "--precision", "fp32")
    assert pngs(tmp_path / "fp32") == pngs(tmp_path / "default") and len(pngs(tmp_path / "fp32")) == 2
    record = json.loads((tmp_path / "fp32" / "sample_config.json").read_text())
    assert record["settings"]["precision"] == "fp32" and record["fingerprint"]["precision"] == "fp32"


# ---- batch-size / process-count invariance --------------------------------------------------------------
# Decoding is bitwise batch-invariant (fixed padded chunks). The transformer is not: its batched matmuls give
# logits ~1e-5 apart across batch sizes, which now and then moves a draw across a boundary (measured: 3 of
# 210 images, batch 1 vs 7, top-k 50). Such an image then differs in whole tokens, i.e. by far more than the
# +-1 of decoding noise, which is what these tests rule out; a batch-dependent random stream would change
# nearly every image and trip the bound on the count.
def _pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _invariance(tmp_path: Path, per_class: int, batch_sizes: tuple[int, ...]) -> list[str]:
    runs = {}
    for bs in batch_sizes:
        sample(tmp_path / f"b{bs}", "--per-class", str(per_class), "--top-k", "50", "--seed", "5",
               "--batch-size", str(bs), "--no-npz")
        runs[bs] = pngs(tmp_path / f"b{bs}")
    first = runs[batch_sizes[0]]
    assert len(first) == 10 * per_class
    report = []
    for bs, images in runs.items():
        assert list(images) == list(first)
        differing = [n for n in first if images[n] != first[n]]
        worst = {n: int(np.abs(_pixels(images[n]) - _pixels(first[n])).max()) for n in differing}
        assert all(w > 1 for w in worst.values()), f"--batch-size {bs}: decoding noise in {worst}"
        assert len(differing) <= 0.05 * len(first), f"--batch-size {bs}: {len(differing)} of {len(first)} PNGs differ"
        report += [f"b{bs}:{n}" for n in differing]
    return report


@pytest.mark.slow  # 3 runs of sample.py
def test_batch_size_changes_no_png_by_decoding_noise(tmp_path):
    _invariance(tmp_path, per_class=3, batch_sizes=(1, 7, 16))


@pytest.mark.slow  # 3 x 210 images: ~1 min on a busy core
def test_batch_size_changes_no_png_by_decoding_noise_over_210_images(tmp_path):
    print("PNGs that differ by a token flip:", _invariance(tmp_path, per_class=21, batch_sizes=(1, 7, 16)))


@pytest.mark.slow  # 2 runs, one through accelerate launch
def test_two_processes_through_accelerate_give_the_same_images(tmp_path):
    args = ["--classes", "1,2,3", "--per-class", "2", "--batch-size", "2", "--num-threads", "1", "--grid-max", "0"]
    sample(tmp_path / "one", *args)
    # `accelerate launch --cpu` runs ONE process; --multi_gpu with the GPUs hidden starts two workers whose
    # Accelerator(cpu=True) forms a gloo group (MULTI_CPU).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "sample.py", "--out", str(tmp_path / "two"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").glob("stats.rank*.jsonl")) == ["stats.rank0.jsonl", "stats.rank1.jsonl"]
    fingerprint = json.loads((tmp_path / "two" / "fingerprint.json").read_text())
    assert fingerprint == json.loads((tmp_path / "one" / "fingerprint.json").read_text())


# ---- outputs, resuming, fingerprint -------------------------------------------------------------------------
ARGS = ("--classes", "0,2,4", "--per-class", "3", "--top-k", "10", "--cfg", "1.5", "--seed", "3")


def test_outputs_are_complete_and_an_interrupted_run_resumes_without_duplicates(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    sample(full, *ARGS, "--batch-size", "7")
    npz = np.load(full / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (9, 32, 32, 3)
    assert npz["arr_1"].tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]  # ADM convention: arr_1 = labels
    record = json.loads((full / "sample_config.json").read_text())
    assert record["settings"]["cfg"] == 1.5 and record["num_images"] == 9 and record["software"]["torch"]
    stats = [json.loads(line) for line in (full / "stats.jsonl").read_text().splitlines()]
    assert [s["batch"] for s in stats] == [7, 2]
    sample(part, *ARGS, "--batch-size", "4")
    for name in ("000002.png", "000005.png", "000008.png"):
        (part / "images" / name).unlink()  # as if the run had stopped before writing them
    (part / "samples.npz").unlink()
    with (part / "stats.jsonl").open("a") as fh:
        fh.write('{"indices": [8, 8], "bat')  # killed while appending a record
    before = {p: os.stat(p).st_mtime_ns for p in (part / "images").glob("*.png")}
    resumed = sample(part, *ARGS, "--batch-size", "2")  # the batch size is not part of the fingerprint
    assert "dropped a partial last line" in resumed.stderr
    assert [json.loads(line)["batch"] for line in (part / "stats.jsonl").read_text().splitlines()] == [4, 4, 1, 2, 1]
    assert pngs(part) == pngs(full)
    assert all(os.stat(p).st_mtime_ns == t for p, t in before.items()), "existing images must not be redone"
    assert np.array_equal(np.load(part / "samples.npz")["arr_0"], npz["arr_0"])


def test_other_settings_are_refused_until_overwrite(tmp_path):
    out = tmp_path / "run"
    sample(out, *ARGS, "--batch-size", "9")
    (out / "notes.txt").write_text("the user's own file")
    before = {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()}
    line = error_line(sample(out, *ARGS, "--cfg", "2", "--seed", "4", check=False))
    assert "--cfg (1.5 then, 2.0 now)" in line and "--seed (3 then, 4 now)" in line and "--overwrite" in line
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()} == before, "a refusal writes nothing"
    sample(out, *ARGS, "--cfg", "2", "--seed", "4", "--overwrite", "--per-class", "1")
    fresh = tmp_path / "fresh"
    sample(fresh, *ARGS, "--cfg", "2", "--seed", "4", "--per-class", "1")
    assert pngs(out) == pngs(fresh) and len(pngs(out)) == 3, "--overwrite leaves no image of the earlier run"
    assert (out / "notes.txt").read_text() == "the user's own file"
    # a folder of PNGs without a fingerprint (older sample.py) is never resumed
    legacy = tmp_path / "legacy"
    (legacy / "images").mkdir(parents=True)
    (legacy / "images" / "000000.png").write_bytes(b"")
    assert "fingerprint" in error_line(sample(legacy, *ARGS, check=False))


def test_model_file_content_is_part_of_the_fingerprint(tmp_path):
    var = tmp_path / "var.safetensors"
    var.write_bytes((SHIPPED / "var_drafter.safetensors").read_bytes())
    out = tmp_path / "run"
    sample(out, "--classes", "1", "--per-class", "1", "--var", str(var))
    var.write_bytes((SHIPPED / "var_refiner.safetensors").read_bytes())  # same path, other weights
    assert "--var (" in error_line(sample(out, "--classes", "1", "--per-class", "1", "--var", str(var), check=False))


# ---- arguments checked before anything is written --------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (("--classes", "a"), "argument --classes: expected comma-separated class ids"),
    (("--per-clas", "2"), "unrecognized arguments: --per-clas"),
    (("--sampler-arg", "window=3"), "has no option"),
    (("--sampler-arg", "draft_scales"), "--sampler-arg expects NAME=VALUE"),
    (("--sampler", "nope"), "unknown sampler 'nope'"),
    (("--sampler", "code"), "needs --model refiner=PATH"),
    (("--model", "refiner=/no/such.safetensors"), "/no/such.safetensors does not exist"),
    (("--classes", "0,10"), "--classes [10] outside [0, 9]"),
    (("--temperature", "1,1"), "--temperature needs 1 or 6"),
    (("--cfg", "-1"), "argument --cfg: expected a number in [0, 10000"),
    (("--cfg", "inf"), "argument --cfg: expected a number in [0, 10000"),
    (("--temperature", "inf"), "temperatures must be finite numbers > 0"),
    (("--out", str(REPO / "README.md")), "README.md is a file; give a folder"),
    (("--top-p", "2"), "argument --top-p: expected a number in [0, 1]"),
    (("--precision", "bf16"), "--precision bf16 needs a CUDA GPU"),
    (("--compile", "fast"), "argument --compile: invalid choice"),
    (("--var-override", "heads=16"), "--var-override heads: not a VAR config field"),
    (("--eval-card",), "--eval-card needs"),
])
def test_bad_arguments_fail_with_one_line_before_writing(tmp_path, capsys, monkeypatch, extra, expected):
    # in this process (an interpreter start per case would cost 3 s); that the process prints exactly this line
    # with status 2 is tests/test_cli_errors.py's check
    monkeypatch.chdir(REPO)
    out = tmp_path / "never"
    try:
        status = run_cli(sample_main, ["--out", str(out), "--grid-max", "0", *extra])
    except SystemExit as err:  # argparse's own errors
        status = err.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert not out.exists(), "a refused command must not create its output folder"


def test_list_samplers():
    proc = subprocess.run([sys.executable, "sample.py", "--list-samplers"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "default" in proc.stdout and "code" in proc.stdout


@pytest.mark.slow  # a run of sample.py on an official-format file
def test_var_override_reaches_the_official_loader(tmp_path):
    """A bare state dict without attn_l2_norm records no head count (the loader refuses to guess): with
    --var-override num_heads=4 it samples exactly the images of the same weights in our format."""
    from training.checkpoint import load_any

    if "overrides" not in inspect.signature(load_any).parameters:
        pytest.skip("training.checkpoint.load_any has no overrides= keyword yet")
    from tests.conftest import make_tiny_pair, perturb_
    from training.checkpoint import save_model
    from var import VAR

    tiny, vae = make_tiny_pair(seed=3)
    var = perturb_(VAR(dataclasses.replace(tiny.config, attn_l2_norm=False)), seed=4).eval()
    save_model(tmp_path / "var.safetensors", var)
    save_model(tmp_path / "vae.safetensors", vae)
    torch.save(var.state_dict(), tmp_path / "var.pth")
    base = ("--vae", str(tmp_path / "vae.safetensors"), "--classes", "0,1", "--per-class", "2")
    sample(tmp_path / "ours", *base, "--var", str(tmp_path / "var.safetensors"))
    assert "--var-override num_heads" in error_line(sample(tmp_path / "guess", *base, "--var", str(tmp_path / "var.pth"),
                                                           check=False))
    sample(tmp_path / "pth", *base, "--var", str(tmp_path / "var.pth"), "--var-override", "num_heads=4")
    assert pngs(tmp_path / "pth") == pngs(tmp_path / "ours")


def test_sample_and_evaluate_in_one_command(tmp_path):
    data = Path("/usr/share/datasets/fashion-mnist")
    if not (data / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the proxy's real test set needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)")
    out = tmp_path / "card"
    sample(out, *ARGS, "--eval-card", "--proxy-classifier", str(REPO / "eval" / "weights" / "fmnist_classifier.safetensors"))
    card = json.loads((out / "eval_card.json").read_text())
    metrics = card["evaluation"]["proxy"]["metrics"]
    assert card["num_samples"] == 9 and card["sampling"]["settings"]["cfg"] == 1.5
    assert 0.0 <= metrics["proxy_accuracy"] <= 1.0 and metrics["proxy_fd"] > 0
    assert "proxy FD" in (out / "eval_card.md").read_text()
