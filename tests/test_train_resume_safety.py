"""Trustworthy runs: --resume never unpickles, survives a damaged newest checkpoint and a log line cut by a
kill, rebuilds a corrupt or stale token cache, and bad config values fail up front naming their key."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
try:
    from tests.test_training import REPO, TINY_VAE, params, read_log, write_var_config
except ImportError:  # tests/ without __init__.py: a third-party `tests` package may shadow it, tests/ is on sys.path
    from test_training import REPO, TINY_VAE, params, read_log, write_var_config
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_any, save_model
from training.data import build_dataset
from training.run_state import load_tree, rng_state, save_tree, set_rng_state, write_manifest
from training.token_cache import shard_path, token_cache_manifest
from training.var_job import VARJob


class Payload:
    """Unpickling this runs code: it writes `marker` (what a crafted run directory could do on resume)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def write_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 3, "evil": Payload(marker)}, path)


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: the crafted file does execute code under a pickle load."""
    write_payload(tmp_path / "p.pt", tmp_path / "marker")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert (tmp_path / "marker").read_text() == "pwned"


def make_tokenizer(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_model(path, VQVAE(VQVAEConfig(**TINY_VAE)))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.safetensors", seed=0)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A finished 3-step VAR run with checkpoints after steps 2 and 3 (and its config file)."""
    root = tmp_path_factory.mktemp("base")
    cfg = write_var_config(root, tokenizer, steps=3, ckpt_every=1, ema=0.9, accum=2, cond_drop=0.3)
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={root / 'run'}"])
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["latest.txt", "step_0000002", "step_0000003"]
    return root / "run", cfg


def copy_run(base_run, tmp_path) -> tuple[Path, Path, dict]:
    run, cfg = base_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", cfg, params(run / "var.safetensors")


def resume(cfg: Path, run: Path, *extra: str):
    return train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={run}", "--resume", *extra])


# ---- no pickle on resume -------------------------------------------------------------------------------
def test_state_tree_round_trips_exactly(tmp_path):
    """Whatever optimizers / models / scalers hand over comes back equal in value, type and dtype."""
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
            "param_groups": [{"params": [0, 7], "betas": (0.9, 0.95), "lr": 1 / 3, "fused": None, "amsgrad": False}],
            "__dunder__": "kept", "weights": {"w": torch.randn(4, dtype=torch.bfloat16), "idx": torch.arange(5)},
            "empty": torch.zeros(0, 2), "nested": [(1, "a"), [2.5e-300, float("inf")]]}
    tied = torch.randn(3)
    tree["tied"] = {"a": tied, "b": tied}  # shared storage (tied weights) must not trip safetensors
    save_tree(tmp_path, "t", tree)
    back = load_tree(tmp_path, "t")

    def same(x, y):
        assert type(x) is type(y), (x, y)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, dict):
            assert list(x) == list(y)
            for k in x:
                same(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                same(u, v)
        else:
            assert x == y

    same(tree, back)


def test_rng_states_round_trip(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.gauss(0, 1), np.random.standard_normal()  # a cached gaussian is part of both states
    save_tree(tmp_path, "rng", rng_state())
    draws = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    set_rng_state(load_tree(tmp_path, "rng"), "rng.json")
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])


def test_checkpoints_hold_no_pickle(base_run):
    ckpt = base_run[0] / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "rng_rank0.json", "rng_rank0.safetensors",
                                                      "state.json", "state.safetensors"]
    state = load_tree(ckpt, "state")
    assert state["step"] == 3 and state["pos"] == 24 and state["config"]["optim"]["betas"] == [0.9, 0.95]
    assert json.loads((ckpt / "rng_rank0.json").read_text())["tree"]["python"]["version"] == 3
    for path in ckpt.glob("*.safetensors"):  # parses as safetensors: a JSON header then raw tensor bytes
        assert load_file(path)


def test_old_pickled_checkpoint_is_refused_without_running_it(tmp_path, tokenizer):
    cfg = write_var_config(tmp_path, tokenizer, steps=4)
    ckpt = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "marker"
    write_payload(ckpt / "step_0000003" / "train_state.pt", marker)
    write_payload(ckpt / "step_0000003" / "rng_rank0.pt", marker)
    (ckpt / "latest.txt").write_text("step_0000003")
    with pytest.raises(ValueError, match=r"no intact checkpoint .*step_0000003: old pickled train_state.pt format, "
                                         r"not loaded") as err:
        resume(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_tampered_checkpoints_with_rewritten_manifests_are_refused(base_run, tmp_path):
    """An attacker who also rewrites manifest.json still gets no code run: the file is parsed as safetensors."""
    run, cfg, _ = copy_run(base_run, tmp_path)
    marker = tmp_path / "marker"
    for step in ("step_0000002", "step_0000003"):
        folder = run / "checkpoints" / step
        write_payload(folder / "state.safetensors", marker)
        write_manifest(folder)
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step_0000003: .*state.safetensors: not a valid "
                                         r"safetensors file.*step_0000002: ") as err:
        resume(cfg, run)
    assert "\n" not in str(err.value) and not marker.exists()


# ---- a resume keeps the run's settings -------------------------------------------------------------------
@pytest.mark.parametrize("change,early", [("train.seed=5", True), ("train.mixed_precision=bf16", True),
                                          ("other_tokenizer", True), ("var.cond_drop_rate=0.9", False),
                                          ("var.depth=3", False)])
def test_resume_refuses_changed_settings(base_run, tmp_path, monkeypatch, change, early):
    """Only steps, logging and paths may change. Run-level settings are refused before any dataset or token
    cache is built (from the checkpoint's state.json); model settings once the models exist."""
    run, cfg, before = copy_run(base_run, tmp_path)
    if change == "other_tokenizer":  # the same config, other weights: other tokens
        change = f"train.tokenizer={make_tokenizer(tmp_path / 'other.safetensors', seed=1)}"
    if early:
        monkeypatch.setattr("training.data.build_datasets", lambda *a, **k: pytest.fail("built the datasets first"))
    with pytest.raises(ValueError, match=r"config differs .* in \[\'" + ("models" if not early else "")):
        resume(cfg, run, "--set", change, "--set", "train.steps=4")
    assert torch.equal(params(run / "var.safetensors")["head.weight"], before["head.weight"])


def test_resume_may_change_loader_only_settings(base_run, tmp_path):
    """data.num_workers and friends do not change a batch, so a resume on another machine may set them."""
    run, cfg, _ = copy_run(base_run, tmp_path)
    resume(cfg, run, "--set", "data.num_workers=1", "--set", "data.prefetch_factor=4", "--set", "train.steps=4")
    assert [r["step"] for r in read_log(run)][-1] == 4


# ---- damaged newest checkpoint --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(base_run, tmp_path, damage):
    """The step-3 state is damaged: resume from step 2 and redo step 3 -> the same weights and log as the
    uninterrupted run."""
    run, cfg, finished = copy_run(base_run, tmp_path)
    folder = run / "checkpoints" / "step_0000003"
    data = (folder / "state.safetensors").read_bytes()
    if damage == "truncate":
        (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        (folder / "state.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        (folder / "manifest.json").unlink()
    (run / "var.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"checkpoint .*step_0000003 is unusable .*newest intact checkpoint .*step_0000002"):
        resume(cfg, run)
    resumed = params(run / "var.safetensors")
    for k in finished:
        assert torch.equal(finished[k], resumed[k]), k
    # wall time, step time, throughput and memory measure the machine, not the run
    timed = {"wall_s", "step_time_s", "data_time_s", "images_per_s", "tokens_per_s", "rss_mb", "cuda_max_alloc_mb"}
    untimed = [[{k: v for k, v in r.items() if k not in timed} for r in read_log(d)] for d in (run, base_run[0])]
    assert untimed[0] == untimed[1]


# ---- metrics.jsonl cut by a kill ------------------------------------------------------------------------
def test_partial_last_log_line_is_trimmed(base_run, tmp_path):
    run, cfg, _ = copy_run(base_run, tmp_path)
    whole = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "epoch": 0, "lo')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match=r"dropped the partial last line of .*metrics.jsonl"):
        resume(cfg, run)
    assert (run / "metrics.jsonl").read_text() == whole


def test_corrupt_log_line_in_the_middle_is_an_error_naming_it(base_run, tmp_path):
    run, cfg, _ = copy_run(base_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt log line .*delete line 2"):
        resume(cfg, run)


# ---- token cache ----------------------------------------------------------------------------------------
def build_job(cfg_path: Path, *overrides: str) -> VARJob:
    cfg, table = train.load_train_config("var", str(cfg_path), list(overrides))
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)
    vae = load_any(cfg.train.tokenizer, "vqvae")
    var_cfg = train.build_var_config(table, vae, len(dataset.classes), "[var]")
    return VARJob(cfg, var_cfg, dataset, torch.device("cpu"), True)


def direct_tokens(job: VARJob) -> torch.Tensor:
    """Independent of the cache: one batch over the whole data set, straight through the tokenizer."""
    images = torch.stack([job.dataset[i][0] for i in range(len(job.dataset))])
    with torch.no_grad():
        return torch.cat(job.vae.img_to_tokens(images), dim=1).to(torch.int32)


def no_cache_warnings(record) -> bool:
    return not [w for w in record if "token cache" in str(w.message)]


def test_token_cache_is_rebuilt_when_corrupt_stale_or_pickled(tmp_path, tokenizer):
    cfg = write_var_config(tmp_path, tokenizer)
    cache = tmp_path / "shared" / "tokens.safetensors"
    shard = shard_path(cache, 0, 1)
    args = (f"train.token_cache={cache}", f"train.out_dir={tmp_path / 'run'}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        job = build_job(cfg, *args)
    assert no_cache_warnings(record) and shard.exists() and token_cache_manifest(cache).exists()
    truth = direct_tokens(job)
    assert torch.equal(job.tokens[0], truth) and job.tokens[1].tolist() == [i % 4 for i in range(48)]
    with warnings.catch_warnings(record=True) as record:  # second use: read back, no warning
        warnings.simplefilter("always")
        assert torch.equal(build_job(cfg, *args).tokens[0], truth) and no_cache_warnings(record)

    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"token cache .*tokens.safetensors: corrupt \(shard .* does not match its sha256.*rebuilding it"):
        assert torch.equal(build_job(cfg, *args).tokens[0], truth)
    assert shard.read_bytes() == data

    other = make_tokenizer(tmp_path / "other.safetensors", seed=1)
    with pytest.warns(UserWarning, match=r"stale \(built for other tokenizer_sha256\); rebuilding"):
        job = build_job(cfg, *args, f"train.tokenizer={other}")
    assert torch.equal(job.tokens[0], direct_tokens(job)) and not torch.equal(job.tokens[0], truth)
    with pytest.warns(UserWarning, match=r"stale \(built for other .*dataset, num_items\)"):
        build_job(cfg, *args, "data.num_samples=40")

    marker = tmp_path / "marker"
    write_payload(cache, marker)  # an old torch.save cache (here: a malicious one) and no manifest
    token_cache_manifest(cache).unlink()
    with pytest.warns(UserWarning, match=r"no manifest tokens.safetensors.json beside it"):
        assert torch.equal(build_job(cfg, *args).tokens[0], truth)
    assert not marker.exists() and not cache.exists() and torch.equal(load_file(shard)["tokens_NL"], truth)


# ---- config validation ----------------------------------------------------------------------------------
BAD_VALUES = [
    ("optim.base_lr=-1e-3", r"optim.base_lr must be > 0, got -0.001"),
    ("optim.base_lr=nan", r"optim.base_lr must be a finite number, got nan"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps must be >= 0, got -5"),
    ("optim.betas=[0.9, 1.5]", r"optim.betas\[1\] must be in \[0, 1\), got 1.5"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0"),
    ("optim.final_lr_ratio=1.5", r"optim.final_lr_ratio must be in \[0, 1\], got 1.5"),
    ("optim.grad_accum=0", r"optim.grad_accum must be >= 1, got 0"),
    ("optim.ema_decay=1.0", r"optim.ema_decay must be in \[0, 1\), got 1.0"),
    ("data.num_samples=0", r"data.num_samples must be >= 1, got 0"),
    ("data.num_samples=4", r"data.num_samples must be >= optim.batch_size \(8"),
    ("data.num_classes=0", r"data.num_classes must be >= 1, got 0"),
    ("data.image_size=4", r"data.image_size must be >= 8, got 4"),
    ("data.kind=webdataset", r"data.kind must be fashion_mnist, image_folder or procedural"),
    ("train.seed=-1", r"train.seed must be in \[0, \d+\], got -1"),
    ("train.keep_checkpoints=0", r"train.keep_checkpoints must be >= 1, got 0"),
    ("train.sample_cfg=-1.0", r"train.sample_cfg must be >= 0, got -1.0"),
    ("train.num_threads=-2", r"train.num_threads must be >= 0, got -2"),
    ("train.label_smoothing=1.0", r"train.label_smoothing must be in \[0, 1\)"),
    ('train.out_dir=""', r"train.out_dir must not be empty"),
    ("loss.disc_lr_ratio=0.0", r"loss.disc_lr_ratio must be > 0, got 0.0"),
    ("loss.gan_weight=-1.0", r"loss.gan_weight must be >= 0, got -1.0"),
    ("loss.dead_code_every=-1", r"loss.dead_code_every must be >= 0, got -1"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0].split("=")[0] for b in BAD_VALUES])
def test_bad_config_values_name_their_key(tmp_path, tokenizer, override, message):
    cfg = write_var_config(tmp_path, tokenizer)
    with pytest.raises(ValueError, match=message):
        train.load_train_config("var", str(cfg), [override])


def cli_wraps_errors() -> bool:
    return "run_cli" in (REPO / "train.py").read_text()


@pytest.mark.parametrize("override,key", [("optim.base_lr=-1e-3", "optim.base_lr"),
                                          ("data.num_samples=0", "data.num_samples")])
def test_train_cli_rejects_bad_values_before_building_anything(tmp_path, tokenizer, override, key):
    cfg = write_var_config(tmp_path, tokenizer)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "var", "--config", str(cfg), "--set", override,
                           "--set", f"train.out_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and key in done.stderr
    if cli_wraps_errors():
        assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "run").exists()  # failed before the token cache or any run file was written
