"""Every registered size builds the exact key/shape/dtype set and parameter count of the official checkpoints
(tests/data/var_schema.json, see tests/data/README.md). Built on the meta device, so the 2B-parameter shapes cost no memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenizers import VQVAE
from tokenizers.config import official_vqvae_config
from var import VAR, var_config
from var.config import PATCH_NUMS_512, VAR_CONFIGS

SCHEMA = Path(__file__).resolve().parent / "data" / "var_schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def _assert_same_state_dict(model: torch.nn.Module, ref: dict) -> None:
    ours = model.state_dict()
    assert list(ours) == list(ref), (f"missing {[k for k in ref if k not in ours][:5]}, "
                                     f"unexpected {[k for k in ours if k not in ref][:5]}")
    for key, spec in ref.items():
        assert list(ours[key].shape) == spec["shape"], key
        assert str(ours[key].dtype) == f"torch.{spec['dtype']}", key


def test_registry_covers_every_official_size(schema):
    assert {f"var_{d}" for d in schema["var"]} <= set(VAR_CONFIGS)


@pytest.mark.parametrize("depth", ["d12", "d16", "d20", "d24", "d30", "d36"])
def test_var_sizes_match_the_official_schema(schema, depth):
    with torch.device("meta"):
        model = VAR(var_config(f"var_{depth}"), init=False)
    _assert_same_state_dict(model, schema["var"][depth]["state_dict"])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == schema["parameter_counts"][f"var_{depth}"] == int(schema["var"][depth]["num_parameters"])
    assert model.seq_len == int(schema["var"][depth]["L"])


def test_official_vqvae_matches_the_schema_at_256_and_512(schema):
    for patch_nums in ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), PATCH_NUMS_512):
        with torch.device("meta"):
            vae = VQVAE(official_vqvae_config(patch_nums))
        _assert_same_state_dict(vae, schema["vae"]["state_dict"])
        assert sum(p.numel() for p in vae.parameters()) == schema["parameter_counts"]["vae_ch160v4096z32"]
        breakdown = {name: sum(p.numel() for p in getattr(vae, name).parameters())
                     for name in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
        expected = schema["vae"]["parameter_breakdown"]
        assert breakdown == {k: expected[k] for k in breakdown}


def test_official_phi_schedule_is_the_reference_one():
    vae_cfg = official_vqvae_config()
    with torch.device("meta"):
        vae = VQVAE(vae_cfg)
    assert vae.quantize.quant_resi.index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("name, size", [("var_d16_256", "var_d16"), ("var_d20_256", "var_d20"),
                                        ("var_d24_256", "var_d24"), ("var_d30_256", "var_d30"),
                                        ("var_d36_512", "var_d36")])
def test_official_toml_configs_build_the_registry_shapes(name, size):
    from dataclasses import asdict

    from training.config import model_configs_from_toml
    vae_cfg, var_cfg = model_configs_from_toml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    assert asdict(var_cfg) == asdict(var_config(size))
    assert asdict(vae_cfg) == asdict(official_vqvae_config(var_cfg.patch_nums))


def test_tiny_toml_config_is_the_golden_configuration():
    from training.config import model_configs_from_toml
    vae_cfg, var_cfg = model_configs_from_toml(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml")
    assert (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.ch, vae_cfg.image_size) == (128, 8, 32, 64)
    assert (var_cfg.depth, var_cfg.embed_dim, var_cfg.num_heads, var_cfg.num_classes) == (2, 64, 4, 10)
    assert var_cfg.patch_nums == vae_cfg.patch_nums == (1, 2, 3, 4) and var_cfg.seq_len == 30
