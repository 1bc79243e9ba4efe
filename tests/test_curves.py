"""training.curves: the plot command reads metrics.jsonl like --resume does (a partial last line is skipped),
pairs train and val keys, and writes a PNG of the documented size; its errors are one line."""
from __future__ import annotations

import json
import struct
import sys

import pytest

from training import curves
from training.errors import run_cli

pytest.importorskip("matplotlib")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_log(path, steps=range(10, 110, 10), val_every=20, partial: str | None = None):
    lines = []
    for s in steps:
        record = {"step": s, "epoch": 0, "loss": 5.0 / s, "acc_s0": s / 200, "acc_s3": s / 400, "lr": 1e-4,
                  "note": "text is not a curve"}
        if s % val_every == 0:
            record.update(val_loss=6.0 / s, val_acc_s3=s / 500)
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n" + (partial or ""))
    return path


def test_partial_last_line_is_skipped(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", partial='{"step": 110, "loss": 0.0')
    label, records = curves.load_run(tmp_path)  # the run folder
    assert label == tmp_path.name
    steps, values = curves.series(records, "loss")
    assert steps == list(range(10, 110, 10)) and values == [5.0 / s for s in steps]
    assert curves.series(records, "val_loss")[0] == [20, 40, 60, 80, 100]
    assert curves.load_run(log)[1] == records  # the file itself


def test_train_and_val_keys_share_a_panel(tmp_path):
    runs = [curves.load_run(write_log(tmp_path / "a.jsonl"))]
    # `loss,val_loss` is one panel, not two; `acc_s3` brings its val twin; `+` joins keys
    assert curves.resolve_panels("loss,val_loss,acc_s0+acc_s3", runs) == [["loss", "val_loss"],
                                                                         ["acc_s0", "acc_s3", "val_acc_s3"]]
    # defaults: loss, the last scale's accuracy, lr (psnr / grad_norm / images_per_s are absent)
    assert curves.resolve_panels(None, runs) == [["loss", "val_loss"], ["acc_s3", "val_acc_s3"], ["lr"]]


def test_smooth_is_the_trailing_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for n in (1, 2, 3, 7, 10):
        expected = [sum(values[max(0, i - n + 1): i + 1]) / len(values[max(0, i - n + 1): i + 1])
                    for i in range(len(values))]
        assert curves.smooth(values, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("keys, panels", [(None, 3), ("loss", 1), ("loss,acc_s0,acc_s3,lr", 4)])
def test_cli_writes_png_of_the_layout_size(tmp_path, keys, panels):
    (tmp_path / "run").mkdir()
    write_log(tmp_path / "run" / "metrics.jsonl", partial='{"ste')
    write_log(tmp_path / "other.jsonl", steps=range(5, 60, 5))
    out = tmp_path / "fig" / "curves.png"
    argv = [str(tmp_path / "run"), str(tmp_path / "other.jsonl"), "--out", str(out), "--dpi", "40", "--smooth", "3"]
    assert run_cli(curves.main, argv + (["--keys", keys] if keys else [])) == 0
    cols = min(3, panels)
    rows = -(-panels // cols)
    assert png_size(out) == (160 * cols, 120 * rows)  # 4 x 3 inches a panel at 40 dpi
    assert not [p for p in out.parent.iterdir() if p.name != "curves.png"]  # no temp file left behind


def one_error_line(capsys, argv) -> str:
    assert run_cli(curves.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_missing_key_is_one_line(tmp_path, capsys):
    write_log(tmp_path / "m.jsonl")
    err = one_error_line(capsys, [str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "x.png"), "--keys", "loss,psnr"])
    assert "'psnr' is in none of the logs" in err and "acc_s0" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.png")]
    assert "no such run folder" in one_error_line(capsys, [str(tmp_path / "nope.jsonl"), *out])
    assert "no metrics.jsonl" in one_error_line(capsys, [str(tmp_path), *out])
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 3, "loss": 1}\n')
    assert "bad.jsonl:2: corrupt log line" in one_error_line(capsys, [str(tmp_path / "bad.jsonl"), *out])
    write_log(tmp_path / "m.jsonl")
    assert "--smooth must be >= 1" in one_error_line(capsys, [str(tmp_path / "m.jsonl"), *out, "--smooth", "0"])
    assert "2 labels for 1 runs" in one_error_line(capsys, [str(tmp_path / "m.jsonl"), *out, "--labels", "a,b"])


def test_without_matplotlib_the_error_names_the_install(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "m.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    err = one_error_line(capsys, [str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in err
