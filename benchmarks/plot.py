"""The panels of the CoDe / ScaleKV benchmark plot (drawn with benchmarks.plotting)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from benchmarks.plotting import bar_panel, save_panels

def panels(result: dict) -> list[Image.Image]:
    out = []
    q = result.get("quality")
    if q:
        groups = [(f"N={n}", [("speed x", r["speed_ratio"]), ("KV peak ratio", r["kv_peak_ratio"])])
                  for n, r in q["code"].items()]
        out.append(bar_panel(groups, "CoDe vs drafter-only (ratios)", ref_line=1.0))
        kv = q["kv_compression"]
        budgets = sorted({k.split("@")[1] for k in kv}, key=float)
        policies = list(dict.fromkeys(k.split("@")[0] for k in kv))
        out.append(bar_panel([(f"{b}", [(p, kv[f"{p}@{b}"]["psnr_db"]) for p in policies if f"{p}@{b}" in kv])
                              for b in budgets], "PSNR (dB) vs uncompressed, by budget fraction", ref_line=25.0))
        out.append(bar_panel([(f"{b}", [(p, kv[f"{p}@{b}"].get("kv_kept_ratio", 1.0)) for p in policies if f"{p}@{b}" in kv])
                              for b in budgets], "kept KV bytes / full cache, by budget fraction"))
    o = result.get("official_shapes")
    if o:
        groups = []
        for key, res in o.items():
            if not key.startswith("batch_"):
                continue
            for name, row in res.items():
                if name == "refiner_only":
                    continue
                groups.append((f"B{key[6:]} {name[4:]}", [(k, v["speed_ratio"]) for k, v in row.items() if k.startswith("code_")]))
        out.append(bar_panel(groups, "official shapes (random init): CoDe speed x vs drafter-only", ref_line=1.0))
    return out


def save_plot(result: dict, path: str | Path) -> Path:
    return save_panels(panels(result), path)
