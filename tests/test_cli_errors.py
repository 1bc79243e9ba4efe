"""Every command-line entry point reports a user error as exactly one `error: ...` line naming the flag or
file, exits with status 2 and shows no traceback (unless --debug); long flags never match by prefix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
NO = "/no/such/dir/x"
PY = [sys.executable]

# (command, text the error line must contain): a missing input file for every CLI
MISSING_FILE = [
    (PY + ["sample.py", "--var", f"{NO}.safetensors"], f"{NO}.safetensors"),
    (PY + ["train.py", "var", "--config", f"{NO}.toml"], f"{NO}.toml"),
    (PY + ["-m", "eval.fid", "--samples", f"{NO}.npz", "--proxy-classifier", f"{NO}.safetensors"], NO),
    (PY + ["-m", "eval.card", "--samples", f"{NO}.npz", "--metrics", f"{NO}.json"], f"{NO}.json"),
    (PY + ["-m", "eval.ref_stats", "--images", NO, "--proxy-classifier", f"{NO}.safetensors", "--out", f"{NO}.npz"], NO),
    (PY + ["-m", "eval.tokenizer_metrics", "--tokenizer", f"{NO}.safetensors", "--data", NO], f"{NO}.safetensors"),
    (PY + ["-m", "eval.train_classifier", "--data", NO, "--out", f"{NO}.safetensors"], NO),
    (PY + ["-m", "eval.model_card", "--tokenizer", f"{NO}.safetensors", "--out", f"{NO}.json"], f"{NO}.safetensors"),
    (PY + ["-m", "benchmarks.benchmark", "--var", f"{NO}.safetensors", "--out", NO], f"{NO}.safetensors"),
    (PY + ["-m", "samplers.scalekv.calibration", "--var", f"{NO}.safetensors", "--tokenizer", f"{NO}.safetensors",
           "--out", f"{NO}.json"], f"{NO}.safetensors"),
    (PY + ["-m", "samplers.dd.data", "--config", f"{NO}.toml"], f"{NO}.toml"),
    (PY + ["-m", "samplers.dd.heldout", "--data", NO, "--val-samples", "8", "--tokenizer", f"{NO}.safetensors",
           "--student", f"a={NO}.safetensors"], NO),
]
# a prefix of a real flag: with argparse's default prefix matching it would be accepted silently
ABBREVIATED = [
    (PY + ["sample.py", "--per-clas", "2"], "unrecognized arguments: --per-clas"),
    (PY + ["train.py", "var", "--conf", "configs/fmnist_var_drafter.toml"], "--config"),
    (PY + ["-m", "eval.fid", "--sampl", f"{NO}.npz"], "--samples"),
    (PY + ["-m", "eval.card", "--sampl", f"{NO}.npz"], "--samples"),
    (PY + ["-m", "eval.ref_stats", "--imag", NO, "--proxy-classifier", "x", "--out", "x"], "--imag"),
    (PY + ["-m", "eval.tokenizer_metrics", "--tok", "x", "--data", "x"], "--tok"),
    (PY + ["-m", "eval.train_classifier", "--dat", NO], "--dat"),
    (PY + ["-m", "eval.model_card", "--tok", "x", "--out", "x"], "--tok"),
    (PY + ["-m", "benchmarks.benchmark", "--repeat", "1"], "unrecognized arguments: --repeat"),
    (PY + ["-m", "samplers.scalekv.calibration", "--var", "x", "--tok", "x", "--out", "x"], "--tok"),
    (PY + ["-m", "samplers.dd.data", "--conf", "x"], "--conf"),
]
# bad values, configs and mismatched files
BAD_INPUT = [
    (PY + ["sample.py", "--classes", "a"], "argument --classes"),
    (PY + ["sample.py", "--var", "checkpoints/fmnist/tokenizer.safetensors"], "tokenizer.safetensors"),
    (PY + ["train.py", "var", "--config", "configs/fmnist_var_drafter.toml", "--set", "trainsteps=3"], "--set"),
    (PY + ["train.py", "var", "--config", "configs/fmnist_var_drafter.toml", "--set", "train.stepz=3"], "stepz"),
    (PY + ["-m", "eval.fid", "--samples", f"{NO}.npz"], "--proxy-classifier"),
    (PY + ["-m", "eval.fid", "--samples", f"{NO}.npz", "--proxy-classifier", "x", "--ref-stats-from-file"],
     "--ref-stats-from-file applies to the Inception reference"),
    (PY + ["-m", "benchmarks.benchmark", "--repeats", "0"], "--repeats"),
    (PY + ["-m", "benchmarks.benchmark", "--batch-sizes", "0"], "--batch-sizes"),
    (PY + ["-m", "eval.fid", "--samples", f"{NO}.npz", "--proxy-classifier", f"{NO}.safetensors", "--out",
           "README.md/metrics.json"], "README.md is not a writable folder"),
    (PY + ["-m", "benchmarks.benchmark", "--cfg", "inf"], "--cfg"),
    (PY + ["-m", "benchmarks.substrate_v2", "--proxy-classifier", f"{NO}.safetensors"], f"{NO}.safetensors"),
    (PY + ["-m", "benchmarks.code_finetuned", "--proxy-classifier", f"{NO}.safetensors"], f"{NO}.safetensors"),
    (PY + ["train.py", "var", "--config", "configs/fmnist_var_drafter.toml", "--set", "train.steps.x=3"],
     "train.steps is a value, not a table"),
]


def run_all(cases: list[tuple[list[str], str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each is mostly interpreter start-up), then collect them."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, _ in cases]
    done = []
    for (cmd, _), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    where = " ".join(proc.args[1:])
    assert proc.returncode == 2, f"{where}: status {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: stderr is not one error line:\n{proc.stderr}"
    assert expected in lines[0], f"{where}: {lines[0]!r} does not name {expected!r}"


@pytest.mark.parametrize("group", ["missing_file", pytest.param("abbreviated", marks=pytest.mark.slow), "bad_input"])
def test_user_errors_are_one_line_with_status_2(group):
    cases = {"missing_file": MISSING_FILE, "abbreviated": ABBREVIATED, "bad_input": BAD_INPUT}[group]
    for (_, expected), proc in zip(cases, run_all(cases)):
        assert_one_error_line(proc, expected)


def test_debug_shows_the_traceback():
    cmd, _ = MISSING_FILE[0]
    proc = subprocess.run(cmd + ["--debug"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_run_cli_contract():
    """In-process: the status, the single line and KeyError's message without repr quotes."""
    import contextlib
    import io

    from training.errors import run_cli

    def fails(exc):
        def main(argv):
            raise exc
        return main

    for exc, text in [(KeyError("unknown sampler 'x'"), "error: unknown sampler 'x'"),
                      (ValueError("bad\n  value"), "error: bad; value"),
                      (SystemExit("old style"), "error: old style"),
                      (FileExistsError("runs/x already holds a run; pass --resume"),
                       "error: runs/x already holds a run; pass --resume"),
                      (PermissionError(13, "Permission denied", "/out"), "error: /out: permission denied; check the path")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert run_cli(fails(exc), []) == 2
        assert err.getvalue() == text + "\n"
    assert run_cli(lambda argv: 3, []) == 3 and run_cli(lambda argv: None, []) == 0
    with pytest.raises(ValueError):
        run_cli(fails(ValueError("x")), ["--debug"])
    with pytest.raises(RuntimeError):  # not a user error: the traceback is the report
        run_cli(fails(RuntimeError("bug")), [])
