"""Chart of a legacy Block-SJD result file (benchmarks/results/sjd_bench_random.json, written before the
benchmark protocol was unified). Its timing loop is gone: Block-SJD and distilled decoding are now sampler
specs of the one protocol, measured in the same interleaved rounds as every other row, e.g.

  python -m benchmarks.benchmark --sampler default --sampler sjd:draft=jacobi --sampler sjd:draft=var \
      --sampler sjd:draft=dd --sampler dd:schedule=1step --model draft_model=checkpoints/fmnist/var_refiner.safetensors \
      --model student=checkpoints/fmnist/dd_student.safetensors --out benchmarks/results/engine_fmnist

`python -m benchmarks.plot bars benchmarks/results/sjd_bench_random.json` still redraws the old chart with `plot`.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.plotting import bar_panel, save_panels


def plot(result: dict, path: Path) -> None:
    panels = []
    speed = result["speed"]
    panels.append(bar_panel([(k.replace("batch_", "B="), [("noise floor", row["default"]["noise_floor_ratio"])]
                              + [(s, v["speed_ratio"]) for s, v in row.items() if s != "default"])
                             for k, row in speed.items()], "Block-SJD exact: speed x vs default (same run)", ref_line=1.0))
    panels.append(bar_panel([(k.replace("batch_", "B="), [(s, v["forwards_ratio"]) for s, v in row.items() if s != "default"])
                             for k, row in speed.items()], "target forwards / default forwards", ref_line=1.0))
    last = list(speed.values())[-1]
    K = len(result["patch_nums"])
    panels.append(bar_panel([(f"s{si}", [(s, v["token_acceptance_per_scale"][si] or 0.0) for s, v in last.items()
                                         if s != "default"]) for si in range(K - 1)],
                            f"token acceptance per scale ({list(speed)[-1]})"))
    rel = result["relaxed"]
    panels.append(bar_panel([(k, [("x vs exact", v["speed_ratio_vs_exact_sjd"]), ("token agree", v["token_agreement_vs_exact"])])
                             for k, v in rel.items()], "relaxed modes vs exact Block-SJD (same seeds)", ref_line=1.0))
    save_panels(panels, path)
