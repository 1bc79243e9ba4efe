"""Composition: every pairing of {code, scalekv, sjd, edit, flow} (plus Block-SJD with a VAR and a DD draft) runs
on the shipped pair from Python, and each reduces bitwise to its single accelerator in the degenerate setting
(CoDe with N = K, ScaleKV at full budget, Block-SJD with window 1, edit with an all-unknown mask). The one
pairing without a defined meaning (sjd+flow) is refused with the reason."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samplers import build_sampler
from training.checkpoint import load_any

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist"
LABELS = torch.tensor([0, 3, 7])
ARGS = dict(cfg=1.5, top_k=20, top_p=0.9, seed=[11, 12, 13], decode=False)
PAIRINGS = ["code+scalekv", "code+sjd", "code+edit", "code+flow", "scalekv+sjd", "scalekv+edit", "scalekv+flow",
            "sjd+edit", "edit+flow", "sjd:var", "sjd:dd"]


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    vae = load_any(SHIPPED / "tokenizer.safetensors", "vqvae")
    drafter = load_any(SHIPPED / "var_drafter.safetensors", "var")
    refiner = load_any(SHIPPED / "var_refiner.safetensors", "var")
    student = load_any(SHIPPED / "dd_student.safetensors", "dd_student")
    images = torch.rand(1, 3, vae.config.image_size, vae.config.image_size, generator=torch.Generator().manual_seed(0))
    return dict(vae=vae, drafter=drafter, refiner=refiner, student=student, images=images)


def options(name: str, m: dict, K: int, degenerate: str = "") -> dict:
    """Keyword arguments of `build_sampler` for a stack; `degenerate` names the accelerator to make trivial."""
    kw = dict(var=m["drafter"], vae=m["vae"])
    parts = name.split("+")
    if "code" in parts:
        kw.update(refiner=m["refiner"], draft_scales=K if degenerate == "code" else 3)
    if "scalekv" in parts:
        kw.update({"scalekv.calibration": str(SHIPPED / "scalekv_drafter.json"),
                   "scalekv.refiner_calibration": str(SHIPPED / "scalekv_refiner.json"),
                   "budget_frac": 1.0 if degenerate == "scalekv" else 0.35})
    if "sjd" in parts:
        kw.update(window_scales=1 if degenerate == "sjd" else 3, max_spec_tokens=16)
    if "flow" in parts:
        kw.update(flow_steps=8)
    return kw


def run(name: str, m: dict, K: int, degenerate: str = "", draft: str = ""):
    kw = options(name, m, K, degenerate)
    if draft == "var":
        kw.update(draft="var", draft_model=m["refiner"])
    elif draft == "dd":
        kw.update(draft="dd", student=m["student"])
    sampler = build_sampler(name, **kw)
    if "edit" in name.split("+"):
        side = m["vae"].config.image_size
        mask = torch.ones(1, 1, side, side) if degenerate == "edit" else torch.zeros(1, 1, side, side)
        if degenerate != "edit":
            mask[..., side // 2:, :] = 1
        return sampler.edit(m["images"], mask, LABELS, **ARGS)
    return sampler.sample(LABELS, **ARGS)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.f_hat, b.f_hat)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_every_pairing_runs_on_the_shipped_pair(shipped, pairing):
    K = shipped["drafter"].num_scales
    name, _, draft = pairing.partition(":")
    out = run(name, shipped, K, draft=draft)
    assert len(out.tokens) == K and all(t.shape == (3, p * p) for t, p in zip(out.tokens, shipped["drafter"].patch_nums))
    if "edit" in name:  # known tokens outside the mask are kept at the finest scale
        known = shipped["vae"].img_to_tokens(shipped["images"] * 2 - 1)[-1]
        side = shipped["drafter"].patch_nums[-1]
        top = slice(0, (side // 2) * side)
        assert torch.equal(out.tokens[-1][:, top], known.expand(3, -1)[:, top])
    if "sjd" in name:
        assert sum(out.stats.extra["tokens_tested_per_scale"]) > 0  # drafted scales really were verified
    if "code" in name:
        assert set(out.stats.forwards) >= {"drafter", "refiner"}


@pytest.mark.parametrize("pairing,degenerate,alone", [
    ("code+scalekv", "code", "scalekv"), ("code+scalekv", "scalekv", "code"),
    ("code+sjd", "code", "sjd"), ("code+sjd", "sjd", "code"),
    ("code+edit", "code", "edit"), ("code+edit", "edit", "code"),
    ("code+flow", "code", "flow"),
    ("scalekv+sjd", "scalekv", "sjd"), ("scalekv+sjd", "sjd", "scalekv"),
    ("scalekv+edit", "scalekv", "edit"), ("scalekv+edit", "edit", "scalekv"),
    ("scalekv+flow", "scalekv", "flow"),
    ("sjd+edit", "sjd", "edit"), ("sjd+edit", "edit", "sjd"),
    ("edit+flow", "edit", "flow"),
])
def test_each_pairing_reduces_bitwise_to_its_single_accelerator(shipped, pairing, degenerate, alone):
    K = shipped["drafter"].num_scales
    stacked = run(pairing, shipped, K, degenerate=degenerate)
    single = run(alone, shipped, K)
    assert same(stacked, single), f"{pairing} with {degenerate} made trivial differs from {alone} alone"


@pytest.mark.parametrize("draft", ["var", "dd"])
def test_block_sjd_with_a_draft_model_and_window_1_is_the_default_sampler(shipped, draft):
    K = shipped["drafter"].num_scales
    kw = options("sjd", shipped, K, degenerate="sjd")
    kw.update(draft="var", draft_model=shipped["refiner"]) if draft == "var" else kw.update(draft="dd", student=shipped["student"])
    out = build_sampler("sjd", **kw).sample(LABELS, **ARGS)
    assert same(out, build_sampler("default", var=shipped["drafter"], vae=shipped["vae"]).sample(LABELS, **ARGS))


def test_dd_edit_keeps_the_known_tokens_and_its_second_step_sees_them(shipped):
    """dd+edit (not with one student step, which is refused): the kept tokens are the image's, and the second
    student step, conditioned on the forced coarse scales, draws other free tokens than plain DD from the
    same noise, while the first step's free tokens are plain DD's."""
    m = shipped
    vae, side = m["vae"], m["vae"].config.image_size
    mask = torch.zeros(1, 1, side, side)
    mask[..., : side // 2] = 1  # regenerate the left half
    labels, t2 = torch.tensor([0, 1]), m["student"].t2
    sampler = build_sampler("dd+edit", var=m["drafter"], vae=vae, student=m["student"], schedule="2step")
    edited = sampler.edit(m["images"], mask, labels, seed=[3, 4], decode=False)
    plain = build_sampler("dd", var=m["drafter"], vae=vae, student=m["student"], schedule="2step").sample(
        labels, seed=[3, 4], decode=False)
    encoded = vae.img_to_tokens(m["images"] * 2 - 1)
    free = [r[0] for r in sampler.token_masks(mask)]
    for ours, ref, r in zip(edited.tokens, encoded, free):
        assert torch.equal(ours[:, ~r], ref[:, ~r].expand(2, -1))
    assert all(torch.equal(a[:, r], b[:, r]) for a, b, r in zip(edited.tokens[:t2], plain.tokens[:t2], free[:t2]))
    assert any(not torch.equal(a[:, r], b[:, r]) for a, b, r in zip(edited.tokens[t2:], plain.tokens[t2:], free[t2:]))
    unmasked = sampler.edit(m["images"], torch.ones_like(mask), labels, seed=[3, 4], decode=False)
    assert all(torch.equal(a, b) for a, b in zip(unmasked.tokens, plain.tokens))  # all unknown: plain DD


def test_pairings_without_meaning_are_refused_with_the_reason(shipped):
    m = shipped
    with pytest.raises(ValueError, match="deterministic function of its own Gaussian noise"):
        build_sampler("sjd+flow", var=m["drafter"], vae=m["vae"])
    with pytest.raises(ValueError, match="both define the stages"):
        build_sampler("code+dd", var=m["drafter"], vae=m["vae"], refiner=m["refiner"], student=m["student"])
    with pytest.raises(ValueError, match="qualify it"):
        build_sampler("code+scalekv", var=m["drafter"], vae=m["vae"], refiner=m["refiner"], kv_budget_frac=0.3,
                      calibration="x", refiner_calibration="y")


CLI_ARGS = {
    "code": ["--model", f"refiner={SHIPPED / 'var_refiner.safetensors'}", "--sampler-arg", "draft_scales=3"],
    "scalekv": ["--sampler-arg", f"scalekv.calibration={SHIPPED / 'scalekv_drafter.json'}",
                "--sampler-arg", f"scalekv.refiner_calibration={SHIPPED / 'scalekv_refiner.json'}"],
    "sjd": ["--sampler-arg", "window_scales=3"],
    "flow": ["--sampler-arg", "flow_steps=8"],
}


CLI_DEFAULT = {"code+scalekv", "sjd+edit", "sjd:dd", "sjd+flow"}  # the rest run with `pytest -m slow`


@pytest.mark.parametrize("pairing", [p if p in CLI_DEFAULT else pytest.param(p, marks=pytest.mark.slow)
                                     for p in PAIRINGS + ["sjd+flow"]])
def test_every_pairing_runs_from_sample_py(pairing, tmp_path):
    import subprocess
    import sys

    from PIL import Image
    name, _, draft = pairing.partition(":")
    cmd = [sys.executable, "sample.py", "--sampler", name, "--classes", "3", "--per-class", "1",
           "--out", str(tmp_path / "out"), "--num-threads", "1"]
    for part in name.split("+"):
        cmd += CLI_ARGS.get(part, [])
    if "edit" in name:
        Image.new("RGB", (32, 32), (200, 200, 200)).save(tmp_path / "in.png")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 16, 32, 32))
        mask.save(tmp_path / "mask.png")
        cmd += ["--edit-image", str(tmp_path / "in.png"), "--edit-mask", str(tmp_path / "mask.png")]
    if draft == "var":
        cmd += ["--sampler-arg", "draft=var", "--model", f"draft_model={SHIPPED / 'var_refiner.safetensors'}"]
    if draft == "dd":
        cmd += ["--sampler-arg", "draft=dd", "--model", f"student={SHIPPED / 'dd_student.safetensors'}"]
    run = subprocess.run(cmd, cwd=SHIPPED.parents[1], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if pairing == "sjd+flow":
        assert run.returncode == 2 and "deterministic function of its own Gaussian noise" in run.stderr
        assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
        return
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "images" / "000000.png").is_file()
