"""Every notebook runs top to bottom on CPU with the shipped models; the repo keeps them output-free."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
nbformat = pytest.importorskip("nbformat", reason="test dependency: pip install -r requirements-test.txt")


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


# the sampling notebook in the default run, the others with -m slow (each starts a kernel: ~4 s)
@pytest.mark.parametrize("path", [p if p.name.startswith("01") else pytest.param(p, marks=pytest.mark.slow)
                                  for p in NOTEBOOKS], ids=lambda p: getattr(p, "stem", None))
def test_notebook_is_stripped_and_runs(path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: strip outputs before committing"
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(o.output_type == "display_data" or "image/png" in o.get("data", {}) for c in code for o in c.outputs), \
        f"{path.name} shows no picture"
