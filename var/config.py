"""VAR transformer configuration, the size registry, and strict dataclass <- dict/TOML conversion."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass
class VARConfig:
    num_classes: int = 1000  # the class table has one extra row: the null class used for CFG
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1 * 16 / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096  # must equal the tokenizer's
    z_channels: int = 32  # Cvae, must equal the tokenizer's
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0  # -1: sqrt(1 / (3 C))

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.num_heads < 1 or self.embed_dim < 1:
            problems.append(f"embed_dim and num_heads must be >= 1, got {self.embed_dim}, {self.num_heads}")
        elif self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not self.norm_eps > 0:  # NaN fails too
            problems.append(f"norm_eps must be > 0, got {self.norm_eps}")
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(self.patch_nums) or min(self.patch_nums) < 1:
            problems.append(f"patch_nums must hold >= 2 positive non-decreasing sides, got {self.patch_nums}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.depth < 1 or self.mlp_ratio <= 0:
            problems.append(f"depth must be >= 1 and mlp_ratio > 0, got {self.depth}, {self.mlp_ratio}")
        if problems:
            raise ValueError("invalid VARConfig: " + "; ".join(problems))

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


# alng (init_adaln_gamma) per depth follows the official training commands.
_ALNG = {12: 1e-3, 16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 5e-6}


def _official(depth: int, **overrides) -> VARConfig:
    fields = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                  init_adaln_gamma=_ALNG[depth])
    fields.update(overrides)
    return VARConfig(**fields)


VAR_CONFIGS: dict[str, typing.Callable[[], VARConfig]] = {
    "var_d12": lambda: _official(12),
    "var_d16": lambda: _official(16),
    "var_d20": lambda: _official(20),
    "var_d24": lambda: _official(24),
    "var_d30": lambda: _official(30),
    # The 512px model: shared AdaLN ("d36-s") and the 512 scale list.
    "var_d36": lambda: _official(36, shared_aln=True, drop_path_rate=0.15, patch_nums=PATCH_NUMS_512),
}


def var_config(name: str, **overrides) -> VARConfig:
    """Build a registered configuration, e.g. `var_config("var_d16", num_classes=10)`."""
    if name not in VAR_CONFIGS:
        raise KeyError(f"unknown VAR size {name!r}; registered sizes: {', '.join(VAR_CONFIGS)}")
    return dataclasses.replace(VAR_CONFIGS[name](), **overrides)


# ---- strict conversion from plain dicts (TOML, JSON) -------------------------------------------------
def _check_type(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise TypeError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list of {item_type.__name__}, got {type(value).__name__} {value!r}")
        return tuple(_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and wrong types with clear errors."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; the shipped configs are in configs/")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
