"""Writing a benchmark result (JSON + its Markdown table) and splicing a generated block into the README, for
the benchmarks that own their README block (benchmarks/scalekv_quality.py, benchmarks/code_finetuned.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from training.atomic import atomic_write_json, atomic_write_text


def write_result(out_stem: str | Path, result: dict, markdown: Callable[[dict], str]) -> str:
    """<stem>.json and <stem>.md, both atomic; returns the Markdown."""
    out, table = Path(out_stem), markdown(result)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), table)
    return table


def replace_block(readme: Path, markers: tuple[str, str], block: str) -> None:
    """Replace the text from markers[0] to markers[1] (both included) by `block`, which holds both markers."""
    text = readme.read_text()
    if markers[0] not in text or markers[1] not in text:
        raise ValueError(f"{readme} has no {markers[0]} ... {markers[1]} block; add the two marker lines where the "
                         f"table belongs")
    start, end = text.index(markers[0]), text.index(markers[1]) + len(markers[1])
    atomic_write_text(readme, text[:start] + block + text[end:])
