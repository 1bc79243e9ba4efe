"""eval.model_card on the shipped 32 px models: the VAR subset (--var-limit) scores exactly what a run on those
images alone scores, while the tokenizer keeps the whole set; bad values are one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from eval import model_card

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "fmnist"


def card(tmp_path: Path, root: Path, *extra: str) -> dict:
    out = tmp_path / f"card{len(list(tmp_path.iterdir()))}.json"
    return model_card.main(["--tokenizer", str(SHIPPED / "tokenizer.safetensors"), "--var",
                            f"refiner={SHIPPED / 'var_refiner.safetensors'}", "--data-root", str(root),
                            "--threads", "1", "--out", str(out), *extra])


def test_var_limit_scores_the_first_images_and_keeps_the_tokenizer_set(tmp_path, fashion_mnist_root):
    both = card(tmp_path, fashion_mnist_root, "--limit", "24", "--var-limit", "8")
    alone = card(tmp_path, fashion_mnist_root, "--limit", "8")
    assert both["tokenizer"]["num_images"] == 24 and alone["tokenizer"]["num_images"] == 8
    assert both["dataset"]["var_images"] == 8 == alone["dataset"]["var_images"]
    for key in ("token_accuracy_per_scale", "cross_entropy_per_scale", "token_accuracy_all"):
        assert both["var"]["refiner"][key] == alone["var"]["refiner"][key], key
    with pytest.raises(ValueError, match="--var-limit must be >= 0"):
        card(tmp_path, fashion_mnist_root, "--limit", "8", "--var-limit", "-1")
