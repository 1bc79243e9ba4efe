"""`python -m samplers.dd.heldout`: it scores exactly a dataset's last N pairs (checked against dd_loss run by hand
on those pairs as one batch) and refuses students, tokenizers and counts that do not belong to the dataset."""
from __future__ import annotations

import json

import pytest
import torch

from samplers.dd.data import DDConfig, DDDataset, generate, model_fingerprint
from samplers.dd.heldout import main
from samplers.dd.job import dd_loss
from samplers.dd.student import DDStudent
from tests.conftest import make_tiny_pair
from training.checkpoint import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    var, vae = make_tiny_pair(3)
    cfg = DDConfig(data_dir=str(root / "data"), num_samples=10, shard_size=4, seed=7, cfg=1.5, top_k=8, flow_steps=16,
                   t2=2, loss_split=2)
    generate(cfg, var, vae, show_progress=False)
    torch.manual_seed(1)
    student = DDStudent.from_teacher(var, t2=2, loss_split=2).eval()
    paths = {"vae": save_model(root / "vae.safetensors", vae),
             "student": save_model(root / "student.safetensors", student,
                                   extra={"teacher_fingerprint": model_fingerprint(var)})}
    other_var, other_vae = make_tiny_pair(4)
    paths["other_student"] = save_model(root / "other.safetensors", DDStudent.from_teacher(other_var, t2=2, loss_split=2),
                                        extra={"teacher_fingerprint": model_fingerprint(other_var)})
    paths["other_vae"] = save_model(root / "other_vae.safetensors", other_vae)
    return cfg, student, vae, {k: str(v) for k, v in paths.items()}, root


def argv(cfg, paths, *extra, students=("s",), vae="vae", n="3"):
    out = ["--data", cfg.data_dir, "--val-samples", n, "--tokenizer", paths[vae]]
    for name in students:
        out += ["--student", f"{name}={paths['student']}"]
    return out + list(extra)


def test_scores_the_last_pairs_as_dd_loss_does_by_hand(setup):
    cfg, student, vae, paths, root = setup
    out = root / "scores.json"
    main(argv(cfg, paths, "--out", str(out), "--batch-size", "2", students=("a", "b")))
    result = json.loads(out.read_text())
    assert result["held_out"] == "pairs 7..9 of 10"
    labels, noise, tokens = DDDataset(cfg.data_dir).fetch([7, 8, 9], "cpu")
    codebook = vae.quantize.embedding.weight.detach()
    with torch.no_grad():
        for t in (0, 2):
            _, want = dd_loss(student, student, codebook, labels, noise, tokens, torch.full((3,), t), 0.0)
            for name in ("a", "b"):
                got = result["scores"][name][f"t{t}"]
                assert got["ce"] == pytest.approx(float(want["ce"]), abs=2e-5)
                assert got["acc_s3"] == pytest.approx(float(want["acc_s3"]), abs=2e-5)
    assert len(result["students"]["a"]["sha256"]) == 64


@pytest.mark.parametrize("case, match", [
    ("other_student", "other teacher weights"), ("other_vae", "not the tokenizer"), ("count", "--val-samples 11"),
    ("spec", "expected NAME=PATH")])
def test_bad_inputs_fail_clearly(setup, case, match):
    cfg, _, _, paths, _ = setup
    args = {"other_student": argv(cfg, {**paths, "student": paths["other_student"]}),
            "other_vae": argv(cfg, paths, vae="other_vae"),
            "count": argv(cfg, paths, n="11"),
            "spec": argv(cfg, paths)[:-2] + ["--student", paths["student"]]}[case]
    with pytest.raises(ValueError, match=match):
        main(args)
