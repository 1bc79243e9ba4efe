"""Checkpoint I/O for tokenizers and transformers.

Two formats:
* ours: one `.safetensors` file whose metadata holds the format name and version, the model kind and
  its JSON config (plus optional extra JSON, e.g. a label map), written atomically;
* official: the bare `torch.save`d state dicts of the public VAR release (`vae_ch160v4096z32.pth`,
  `var_d{12..36}.pth`), read with `weights_only=True`; the VAR config is inferred from tensor shapes, and
  `overrides` supply the fields no tensor records (num_heads when attention is not L2-normalised).
Every mismatch raises `CheckpointMismatchError` listing missing/unexpected keys, differing shapes and
the likely cause; a file that is no checkpoint at all (text, empty, truncated, renamed) raises its subclass
`NotACheckpointError` naming the file and what it looks like instead.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import tomllib
import typing
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tokenizers import VQVAE, VQVAEConfig
from tokenizers.config import official_vqvae_config
from training.atomic import atomic_write
from training.hub import resolve_path
from var.config import VARConfig, from_dict
from var.model import VAR

FORMAT_NAME = "var-toolkit"
FORMAT_VERSION = 1
# kind -> (model class, config class). Models defined above this layer (e.g. the distilled-decoding student in
# samplers/dd/) add themselves with `register_kind`, so checkpoint I/O never imports an accelerator.
KINDS: dict[str, tuple[type, type]] = {"vqvae": (VQVAE, VQVAEConfig), "var": (VAR, VARConfig)}


def register_kind(kind: str, model_cls: type, config_cls: type) -> None:
    """Make `save_model`/`load_model` handle another model kind (its constructor takes (config, init=...))."""
    if kind in KINDS and KINDS[kind] != (model_cls, config_cls):
        raise KeyError(f"checkpoint kind {kind!r} is already registered for {KINDS[kind][0].__name__}")
    KINDS[kind] = (model_cls, config_cls)


# Buffers every model rebuilds from its config: an (L, L) attention mask is 1.85 MB at L = 680, more than a small
# model's weights. Our files leave them out (format version 1 files that hold them still load); official .pth
# files keep theirs.
DERIVED_BUFFERS = ("attn_bias_for_masking",)


def _is_derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def kind_of(model: nn.Module) -> str | None:
    return next((k for k, (cls, _) in KINDS.items() if type(model) is cls), None)


class CheckpointMismatchError(RuntimeError):
    pass


class NotACheckpointError(CheckpointMismatchError):
    """The file is empty, truncated, or not a checkpoint at all (a text/HTML file renamed .pth, ...)."""


# ---- diagnostics --------------------------------------------------------------------------------------
def _likely_causes(shape_diffs: dict[str, tuple], missing: list[str], unexpected: list[str]) -> list[str]:
    causes = []
    keys = set(shape_diffs)
    if keys & {"pos_1LC", "lvl_1L", "attn_bias_for_masking"}:
        causes.append("the scale list differs: a VAR checkpoint only loads with the patch_nums it was trained "
                      "with (e.g. 256px L=680 vs 512px L=2240)")
    if keys & {"head.weight", "head.bias", "quantize.embedding.weight"}:
        causes.append("the vocabulary size differs (codebook / output head rows)")
    if "word_embed.weight" in keys:
        causes.append("the latent width (z_channels) differs from the tokenizer the model was trained with")
    if "class_emb.weight" in keys:
        causes.append("num_classes differs (the class table has num_classes + 1 rows)")
    if "pos_start" in keys or any(k.endswith("mat_qkv.weight") for k in keys):
        causes.append("the width (embed_dim) differs: a different model size")
    if any(k.startswith("blocks.") for k in missing + unexpected):
        causes.append("the depth or the AdaLN variant (per-block vs shared_aln) differs")
    if any(k.startswith(("encoder.", "decoder.")) for k in list(keys) + missing + unexpected):
        causes.append("the tokenizer architecture (ch, ch_mult, num_res_blocks) differs")
    if any("quant_resi" in k for k in missing + unexpected):
        causes.append("share_quant_resi differs (number/layout of phi convolutions)")
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in unexpected) and any(k.startswith("blocks.") for k in missing):
        causes.append("this is a tokenizer checkpoint, not a VAR one")
    if any(k.startswith("blocks.") for k in unexpected) and any(k.startswith("encoder.") for k in missing):
        causes.append("this is a VAR checkpoint, not a tokenizer one")
    return causes


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; on any mismatch raise one readable error instead of PyTorch's wall of text."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_diffs = {k: (tuple(state_dict[k].shape), tuple(own[k].shape)) for k in set(own) & set(state_dict)
                   if tuple(state_dict[k].shape) != tuple(own[k].shape)}
    if isinstance(model, VQVAE):  # the usage statistic is replaced when its scale count differs
        shape_diffs.pop("quantize.ema_vocab_hit_SV", None)
    if missing or unexpected or shape_diffs:
        lines = [f"checkpoint {source} does not match the {type(model).__name__} being loaded:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        for k, (got, want) in sorted(shape_diffs.items())[:8]:
            lines.append(f"  shape of {k}: checkpoint {got}, model {want}")
        causes = _likely_causes(shape_diffs, missing, unexpected)
        if causes:
            lines.append("  likely cause: " + "; ".join(causes))
        raise CheckpointMismatchError("\n".join(lines))
    if isinstance(model, VAR) and not torch.equal(state_dict["lvl_1L"].to(own["lvl_1L"].device), own["lvl_1L"]):
        raise CheckpointMismatchError(f"checkpoint {source} was trained with another scale list of the same total "
                                      f"length; a VAR checkpoint only loads with its own patch_nums")
    model.load_state_dict(state_dict, strict=True)


_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", 0x80  # torch.save's zip container / a legacy raw pickle stream
_REFETCH = "re-download it or save it again"


def _not_a_checkpoint(path: Path, why: str) -> NotACheckpointError:
    return NotACheckpointError(f"{path} is not a PyTorch checkpoint: {why}")


def _sniff(head: bytes, expected: str) -> str:
    """What a file that failed to load really is, judged from its first bytes ('' when nothing is known)."""
    if head[:4] == _ZIP_MAGIC or head[:1] == bytes([_PICKLE_PROTO]):
        return "" if expected == "pth" else "it is a PyTorch .pth file: rename it to .pth"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "" if expected == "safetensors" else "it is a safetensors file: rename it to .safetensors"
    if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return f"it is a text file (starts with {head[:24]!r}), e.g. an error page saved by a failed download; {_REFETCH}"
    return ""


# ---- our format -----------------------------------------------------------------------------------------
def save_model(path: str | Path, model: VQVAE | VAR, extra: dict | None = None) -> Path:
    """Write `model` (weights + config + format version) to one safetensors file, atomically."""
    path = Path(path)
    kind = kind_of(model)
    if kind is None:
        raise TypeError(f"save_model takes a registered model kind ({', '.join(KINDS)}), got {type(model).__name__}")
    # clone: safetensors refuses tensors sharing storage, and views must not drag their whole storage along
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if not _is_derived(k)}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "kind": kind,
            "config": json.dumps(dataclasses.asdict(model.config)), "extra": json.dumps(extra or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict:
    """Format metadata of one of our checkpoints: kind, config (dict), extra (dict), format_version."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with path.open("rb") as fh:
        head = fh.read(64)
    if not head:
        raise NotACheckpointError(f"{path} is not a safetensors checkpoint: the file is empty (0 bytes); {_REFETCH}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated / foreign files
        why = _sniff(head, "safetensors") or f"it is truncated or corrupt ({err}); {_REFETCH}"
        raise NotACheckpointError(f"{path} is not a readable safetensors checkpoint: {why}") from err
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointMismatchError(f"{path} has no '{FORMAT_NAME}' metadata; it was not written by save_model")
    try:
        version = int(meta.get("format_version", -1))
        config, extra = json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
        if not isinstance(config, dict) or not isinstance(extra, dict):
            raise ValueError("its config/extra entry is not a JSON object")
    except (KeyError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: its '{FORMAT_NAME}' metadata is damaged ({type(err).__name__}: {err}); "
                                      f"{_REFETCH}") from err
    if version > FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path} has format version {version}, newer than this code ({FORMAT_VERSION}); "
                                      f"update the toolkit")
    if meta.get("kind") not in KINDS:
        hint = " (import samplers to register the accelerator kinds)" if meta.get("kind") == "dd_student" else ""
        raise CheckpointMismatchError(f"{path}: unknown model kind {meta.get('kind')!r}{hint}")
    return {"kind": meta["kind"], "format_version": version, "config": config, "extra": extra}


def load_model(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu",
               overrides: dict | None = None):
    """Load one of our checkpoints; `kind` ("vqvae"/"var") guards against passing the wrong file; `overrides`
    replace fields of the stored config (validated against the kind's config class)."""
    meta = read_metadata(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointMismatchError(f"{path} holds a {meta['kind']} checkpoint, but a {kind} was expected")
    model_cls, config_cls = KINDS[meta["kind"]]
    fields = {**meta["config"], **parse_overrides(config_cls, overrides, str(path))}
    try:
        config = from_dict(config_cls, fields, f"{path} config")
    except (TypeError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: {err}") from err
    model = model_cls(config) if model_cls is VQVAE else model_cls(config, init=False)
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        state_dict = {k: fh.get_tensor(k) for k in fh.keys()}
    # the model just built from the stored config holds the derived buffers the file left out
    state_dict.update({k: v for k, v in model.state_dict().items() if _is_derived(k) and k not in state_dict})
    load_state_dict_checked(model, state_dict, str(path))
    return model.to(device).eval()


# ---- official release ------------------------------------------------------------------------------------
def _torch_load(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the official checkpoints are on the Hugging Face Hub "
                                f"repository FoundationVision/var (vae_ch160v4096z32.pth, var_d16.pth, ...)")
    with path.open("rb") as fh:
        head = fh.read(64)
    if not head:
        raise _not_a_checkpoint(path, f"the file is empty (0 bytes); {_REFETCH}")
    if head[:4] != _ZIP_MAGIC and head[:1] != bytes([_PICKLE_PROTO]):
        raise _not_a_checkpoint(path, _sniff(head, "pth") or f"unknown content (starts with {head[:8]!r}); {_REFETCH}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused a Python object; torch's message then suggests weights_only=False, which would
        # run arbitrary code from the file: keep only the object's name
        # torch words it "Unsupported global: GLOBAL x" or, for blocked modules, "unsupported GLOBAL x whose ..."
        culprit = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(err), re.IGNORECASE)
        if culprit is None:  # a broken pickle stream (e.g. a truncated legacy-format file)
            raise _not_a_checkpoint(path, f"it is truncated or corrupt (unreadable pickle stream); {_REFETCH}") from err
        raise CheckpointMismatchError(f"{path} holds Python objects besides tensors ({culprit.group(1)}); this toolkit "
                                      f"never runs pickle code: save the bare weights with "
                                      f"torch.save(model.state_dict(), path) where the file was made") from err
    except Exception as err:  # truncated zip, broken pickle stream: torch raises RuntimeError/EOFError/KeyError...
        detail = re.split(r"(?<=\.)\s", str(err).strip())[0][:120] or "no detail"  # first sentence only
        raise _not_a_checkpoint(path, f"it is truncated or corrupt ({type(err).__name__}: {detail}); {_REFETCH}") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{path} is not a bare state dict of tensors (a training checkpoint?); "
                                      f"extract the model weights first")
    return sd


def load_official_vae(path: str | Path, patch_nums=None, device="cpu") -> VQVAE:
    """`vae_ch160v4096z32.pth`; it is resolution-agnostic, so any patch_nums may be used."""
    config = official_vqvae_config(patch_nums) if patch_nums else official_vqvae_config()
    vae = VQVAE(config)
    load_state_dict_checked(vae, _torch_load(path), str(path))
    return vae.to(device).eval()


def parse_overrides(config_cls: type, overrides: dict | None, source: str) -> dict:
    """`overrides` checked against `config_cls`: unknown names are an error listing the valid ones; values may
    be typed or strings as written on a command line ("4", "true", "[1, 2]", parsed as TOML literals)."""
    if not overrides:
        return {}
    valid = sorted(f.name for f in dataclasses.fields(config_cls))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown {config_cls.__name__} field(s) {', '.join(unknown)} in the overrides; "
                         f"valid fields are {', '.join(valid)}")
    hints = typing.get_type_hints(config_cls)
    parsed = {}
    for name, value in overrides.items():
        if isinstance(value, str) and hints[name] is not str:
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{source}: override {name}={value!r} is not a valid value ({err})") from err
        parsed[name] = value
    return parsed


def infer_var_config(state_dict: dict[str, torch.Tensor], overrides: dict | None = None,
                     source: str = "state dict") -> VARConfig:
    """Recover a VAR's shape from its state dict (scale list from `lvl_1L`, depth from block keys, ...).

    The head count is recorded only by L2-normalised attention (`scale_mul_1H11`); without it, `num_heads`
    must come from `overrides`. Fields no tensor records (drop rates, norm_eps, init scales) take the
    official training values unless overridden."""
    required = ("pos_start", "lvl_1L", "class_emb.weight", "head.weight", "word_embed.weight", "blocks.0.ffn.fc1.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise CheckpointMismatchError(f"{source}: not a VAR state dict: missing {absent}"
                                      + (" (this looks like a tokenizer checkpoint)" if "encoder.conv_in.weight" in state_dict else ""))
    overrides = parse_overrides(VARConfig, overrides, source)
    counts = Counter(state_dict["lvl_1L"].view(-1).tolist())
    patch_nums = tuple(round(counts[s] ** 0.5) for s in sorted(counts))
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    C = state_dict["pos_start"].shape[-1]
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    fields = dict(num_classes=state_dict["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C,
                  mlp_ratio=state_dict["blocks.0.ffn.fc1.weight"].shape[0] / C,
                  shared_aln="shared_ada_lin.1.weight" in state_dict, attn_l2_norm=attn_l2_norm,
                  patch_nums=patch_nums, vocab_size=state_dict["head.weight"].shape[0],
                  z_channels=state_dict["word_embed.weight"].shape[1], drop_path_rate=0.1 * depth / 24)
    if attn_l2_norm:
        fields["num_heads"] = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1]
    elif "num_heads" not in overrides:
        raise CheckpointMismatchError(
            f"{source}: num_heads cannot be inferred: the attention is not L2-normalised, so no tensor records the "
            f"head count; pass the value the model was trained with (a divisor of the width {C}): "
            f"overrides={{'num_heads': N}} in load_any/load_official_var, sample.py --var-override num_heads=N")
    fields.update(overrides)
    try:
        return from_dict(VARConfig, fields, f"{source} config")
    except (TypeError, ValueError) as err:
        raise CheckpointMismatchError(f"{source}: {err}") from err


def load_official_var(path: str | Path, patch_nums=None, device="cpu", overrides: dict | None = None) -> VAR:
    """`var_d{12,16,20,24,30,36}.pth`. If `patch_nums` is given it must be the file's own scale list;
    `overrides` sets VARConfig fields the weights do not record (num_heads without L2 attention, ...)."""
    sd = _torch_load(path)
    config = infer_var_config(sd, overrides, str(path))
    if patch_nums is not None and tuple(patch_nums) != config.patch_nums:
        raise CheckpointMismatchError(f"{path} was trained with patch_nums {config.patch_nums} (L={config.seq_len}), "
                                      f"not {tuple(patch_nums)}; a VAR checkpoint only loads with its own scale list")
    var = VAR(config, init=False)
    load_state_dict_checked(var, sd, str(path))
    return var.to(device).eval()


def checkpoint_kind(path: str | Path) -> str:
    """The model kind a checkpoint holds: ours say it in their metadata; official files are VARs unless given
    as a tokenizer."""
    return read_metadata(path)["kind"] if Path(path).suffix == ".safetensors" else "var"


def load_any(path: str | Path, kind: str, device="cpu", patch_nums=None, overrides: dict | None = None):
    """Ours (.safetensors) or official (.pth/.pt) by file extension. `overrides` (VAR checkpoints only) sets
    VARConfig fields; ours record their whole config, so there it only suits fields the weights ignore.
    `path` may be an hf://OWNER/REPO/FILE[@REV] URI (resolved through the Hugging Face cache)."""
    path = resolve_path(path)
    suffix = Path(path).suffix
    if overrides and kind != "var":
        raise ValueError(f"{path}: config overrides apply to VAR checkpoints only, not to a {kind}")
    if suffix == ".safetensors":
        return load_model(path, kind=kind, device=device, overrides=overrides)
    if suffix in (".pth", ".pt", ".bin"):
        if kind == "vqvae":
            return load_official_vae(path, patch_nums=patch_nums, device=device)
        return load_official_var(path, patch_nums=patch_nums, device=device, overrides=overrides)
    raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors (ours) or .pth (official)")


def check_models_compatible(var: VAR, vae: VQVAE, what: str = "VAR", *, main: VAR | None = None,
                            main_what: str = "the main model", fix: str = "") -> None:
    """`var` must share `vae`'s vocabulary, latent width and scales; with `main` (the model `var` works beside,
    e.g. CoDe's drafter) also its label set. `fix`: the last clause of the label-set error."""
    problems = []
    if var.config.vocab_size != vae.vocab_size:
        problems.append(f"vocabulary size {var.config.vocab_size} vs tokenizer {vae.vocab_size}")
    if var.config.z_channels != vae.z_channels:
        problems.append(f"latent width (z_channels) {var.config.z_channels} vs tokenizer {vae.z_channels}")
    if tuple(var.patch_nums) != tuple(vae.patch_nums):
        problems.append(f"patch_nums {tuple(var.patch_nums)} vs tokenizer {tuple(vae.patch_nums)}")
    if problems:
        raise ValueError(f"{what} and tokenizer do not match: " + "; ".join(problems)
                         + ". Load the tokenizer the model was trained with (its checkpoint config names it), "
                           "or build the tokenizer with the model's patch_nums.")
    if main is not None and var.num_classes != main.num_classes:
        raise ValueError(f"{what} has {var.num_classes} classes but {main_what} {main.num_classes}; "
                         + (fix or "the models must be trained on the same label set"))


# ---- fine-tuning initialisation ---------------------------------------------------------------------------
CLASS_MODES = ("error", "reinit", "resize")


# VARConfig fields that change what the weights compute without changing any tensor's shape
SHAPELESS_VAR_FIELDS = ("num_heads", "norm_eps", "attn_l2_norm")


@torch.no_grad()
def load_init_from(model: nn.Module, path: str | Path, kind: str, class_mode: str = "error") -> dict:
    """Start `model` from the weights in `path` (ours or an official .pth, through load_any: never pickle).

    Every tensor must match exactly (load_state_dict_checked), except, for a VAR whose class count differs
    from the checkpoint's, the class table `class_emb.weight` ((num_classes + 1, C); the last row is the
    null class of condition dropout and CFG), which `class_mode` (train.init_class_embedding) settles:
    "error" raises; "reinit" keeps the model's own rows; "resize" copies rows 0..min(K_old, K_new)-1 and
    moves the null row to the new last row, keeping the model's own rows for the new classes. "Own rows" are
    the model's initialisation, so `model` must come freshly built (VAR(config) initialises; the same seed
    on every process makes them agree). Returns what was done, for the log."""
    if class_mode not in CLASS_MODES:
        raise ValueError(f"train.init_class_embedding must be {', '.join(CLASS_MODES[:-1])} or {CLASS_MODES[-1]}, "
                         f"got {class_mode!r}")
    patch_nums = getattr(model, "patch_nums", None)
    # An official .pth records no config: without L2-normalised attention no tensor gives the head count, and
    # the model's own is the only guess. Our files record theirs, which must then equal the model's.
    official = not str(path).endswith(".safetensors")
    overrides = ({"num_heads": model.config.num_heads}
                 if kind == "var" and official and not model.config.attn_l2_norm else None)
    source = load_any(path, kind, patch_nums=patch_nums, overrides=overrides)
    if kind == "var":
        differ = [f"{f} {getattr(source.config, f)} (file) vs {getattr(model.config, f)} (model)"
                  for f in SHAPELESS_VAR_FIELDS if getattr(source.config, f) != getattr(model.config, f)]
        if differ:
            raise CheckpointMismatchError(f"{path}: {'; '.join(differ)}; no tensor shape records these, so its weights "
                                          f"would compute something else: set them in [var] as the file has them")
    state = source.state_dict()
    report = {"init_from": str(path), "class_mode": "same"}
    own = model.state_dict().get("class_emb.weight") if isinstance(model, VAR) else None
    src = state.get("class_emb.weight")
    # a width mismatch is another model size: left to load_state_dict_checked to report with everything else
    if own is not None and src is not None and src.shape != own.shape and src.shape[1:] == own.shape[1:]:
        k_old, k_new = src.shape[0] - 1, own.shape[0] - 1
        if class_mode == "error":
            raise CheckpointMismatchError(
                f"{path} has {k_old} classes but the model {k_new} (the data's); set train.init_class_embedding = "
                f"\"resize\" (keep the first {min(k_old, k_new)} class rows and the null row) or \"reinit\" "
                f"(a fresh class embedding), or train on data with {k_old} classes")
        rows = own.detach().to("cpu", copy=True)
        keep = min(k_old, k_new) if class_mode == "resize" else 0
        if class_mode == "resize":
            rows[:keep] = src[:keep].to(rows.dtype)
            rows[k_new] = src[k_old].to(rows.dtype)  # the null row stays the null row
        state = {**state, "class_emb.weight": rows}
        report = {**report, "class_mode": class_mode, "classes_from": k_old, "classes": k_new, "copied_rows": keep}
    load_state_dict_checked(model, state, str(path))
    return report
