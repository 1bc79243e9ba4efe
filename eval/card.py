"""Eval card: one JSON + Markdown record of a set of generated samples and its metrics.

    python -m eval.card --samples samples/d16_cfg1.5/ --sample-record samples/d16_cfg1.5/record.json \
        --proxy-classifier eval/weights/fmnist_classifier.safetensors [--inception PATH --ref REF.npz] \
        --card samples/d16_cfg1.5/eval_card

Takes every option of `python -m eval.fid` plus the sampling record (the JSON sample.py writes next to its
output: model, sampler and all settings, seeds, timings). Runs the evaluation (or reuses --metrics, a JSON
written by eval.fid) and writes <card>.json and <card>.md. `write_card(record, report, path)` is the same
step for code that has just sampled.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from eval.fid import build_parser, run
from eval.proxy import write_json_atomic
from training.atomic import atomic_write_text, check_writable

METRIC_LABELS = {
    "fid": "FID", "sfid": "sFID", "is": "Inception Score", "is_std": "IS std", "precision": "Precision (k=3)",
    "recall": "Recall (k=3)", "kid": "KID", "kid_std": "KID std", "num_samples": "samples",
    "proxy_fd": "proxy FD (classifier features)", "proxy_kid": "proxy KID", "proxy_kid_std": "proxy KID std",
    "proxy_accuracy": "proxy classifier accuracy on intended labels", "proxy_precision": "proxy precision (k=3)",
    "proxy_recall": "proxy recall (k=3)",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "`" + json.dumps(value) + "`" if isinstance(value, (dict, list)) else str(value)


def _fmt_ci(ci: dict | None) -> str:
    return "" if not ci else f"[{ci['low']:.4g}, {ci['high']:.4g}]"


def comparison_markdown(cards: dict[str, dict], part: str = "proxy") -> str:
    """Metrics of several eval cards side by side with their intervals; `*` marks a value whose interval does
    not overlap the first card's (significantly_different), so the difference is not sampling noise."""
    from eval.intervals import significantly_different

    names = list(cards)
    evals = {n: cards[n]["evaluation"][part] for n in names}
    base = evals[names[0]]
    keys = [k for k in base["metrics"] if k != "num_samples" and not k.endswith("_std")]
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in keys:
        cells = []
        for n in names:
            ev = evals[n]
            value, ci = ev["metrics"].get(key), ev.get("intervals", {}).get(key)
            cell = "" if value is None else f"{_fmt(value)} {_fmt_ci(ci)}".strip()
            base_ci = base.get("intervals", {}).get(key)
            if n != names[0] and ci and base_ci and significantly_different(ci, base_ci):
                cell += " *"
            cells.append(cell)
        lines.append(f"| {METRIC_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n`*`: 95 % interval disjoint from {names[0]}'s.\n"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def card_markdown(card: dict) -> str:
    lines = [f"# Eval card: {card['samples']}", "", f"Written {card['written_utc']} · {card['num_samples']} samples "
             f"at {card['image_size'][0]}x{card['image_size'][1]}", ""]
    for part, title in (("inception", "Inception metrics (pytorch-fid layout)"), ("proxy", "Offline proxy (not FID)")):
        if part not in card["evaluation"]:
            continue
        ev = card["evaluation"][part]
        cis = ev.get("intervals", {})
        lines += [f"## {title}", "", "| metric | value | 95 % interval |", "| --- | --- | --- |"]
        lines += [f"| {METRIC_LABELS.get(k, k)} | {_fmt(v)} | {_fmt_ci(cis.get(k))} |" for k, v in ev["metrics"].items()]
        if cis:
            methods = sorted({f"{METRIC_LABELS.get(k, k)}: {ci['method']}" for k, ci in cis.items()})
            lines += ["", "Intervals: " + "; ".join(methods) + "."]
        if "protocol" in ev:
            p = ev["protocol"]
            lines += ["", f"FID protocol: mode `{p['fid_mode']}`, resize {p['resize']}, {p['num_samples']} samples, "
                          f"reference {p.get('reference_stats')}."]
        ref = ev["reference"]
        lines += ["", f"Feature network `{ev['network']['name']}` (weights sha256 `{ev['network'].get('weights_sha256')}`); "
                      f"reference `{ref.get('path')}` ({ref.get('stats_from')}), content sha256 `{ref.get('content_sha256')}`. "
                      f"Timings: {_fmt(ev['timings_s'])}.", ""]
        if part == "proxy":
            lines += [f"_{ev['note']}_", ""]
    if card.get("sampling"):
        lines += ["## Sampling record", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(card["sampling"])]
        lines.append("")
    lines += ["## Evaluation settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(card["evaluation_settings"])]
    return "\n".join(lines) + "\n"


def write_card(sample_record: dict | None, report: dict, path: str | Path) -> tuple[Path, Path]:
    """`report` is eval.fid.run()'s result; writes path.json and path.md atomically."""
    path = Path(path)
    card = {"samples": report["samples"], "num_samples": report["num_samples"], "image_size": report["image_size"],
            "written_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "sampling": sample_record or {},
            "evaluation": {k: report[k] for k in ("inception", "proxy") if k in report},
            "evaluation_settings": {"device": report.get("device"), "software": report.get("software"),
                                    "total_seconds": report.get("total_seconds"), **report.get("settings", {})}}
    json_path, md_path = path.with_suffix(".json"), path.with_suffix(".md")
    write_json_atomic(json_path, card)
    atomic_write_text(md_path, card_markdown(card))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ap.description = __doc__
    ap.add_argument("--sample-record", help="JSON record written by sample.py next to the samples")
    ap.add_argument("--metrics", help="reuse a metrics JSON from `python -m eval.fid` instead of evaluating again")
    ap.add_argument("--card", help="output path without suffix (default: <samples>_eval_card)")
    args = ap.parse_args(argv)
    record = None
    if args.sample_record:
        record = json.loads(Path(args.sample_record).read_text())
    if args.out and not args.metrics:
        check_writable(Path(args.out), "--out", folder=False)  # before the features are computed
    report = json.loads(Path(args.metrics).read_text()) if args.metrics else run(args)
    samples = Path(args.samples)
    card = Path(args.card) if args.card else samples.parent / f"{samples.stem if samples.is_file() else samples.name}_eval_card"
    json_path, md_path = write_card(record, report, card)
    written = [json_path, md_path]
    if args.out and not args.metrics:  # the metrics themselves, as `python -m eval.fid --out` writes them
        write_json_atomic(args.out, report)
        written.append(args.out)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    from training.errors import run_cli

    sys.exit(run_cli(main))
