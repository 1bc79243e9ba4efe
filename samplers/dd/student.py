"""Distilled-decoding student (spec accelerators.md 4.4): the teacher's transformer re-wired to map a whole
sequence of per-token Gaussian noise vectors to the teacher's flow-mapped tokens in one forward.

Sequence: one start slot (class vector + pos_start) and one slot per token of every scale; level 0 is the
start slot, level s+1 is VAR scale s. A slot's input is a Cvae-vector, either the codebook embedding of a
known token ("data") or that token's noise ("noise"), projected by the teacher's `word_embed`. A learned
2-row slot-type embedding says which; it is added to the input and, through one linear map per block (plus
one before the heads), after every attention residual. The level-sibling mask lets a slot see every slot
of coarser levels and itself only: within a scale the teacher's tokens are independent given the prefix,
so each token only needs its own noise. Outputs: the teacher's classifier head (V logits, read out by
argmax) and a new continuous head (non-affine LayerNorm, class-conditioned scale/shift table, linear ->
Cvae) that regresses the code vector. The backbone is a `VAR` whose scale list has an extra leading 1x1
level, so every teacher tensor has a same-named student tensor (level/position tables one row longer).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from training.checkpoint import register_kind
from var.config import VARConfig
from var.layers import layer_norm
from var.model import VAR
from var.prefix_attention import prefix_segments

DATA, NOISE = 0, 1  # rows of the slot-type table


@dataclass
class DDStudentConfig(VARConfig):
    """The teacher's VARConfig (patch_nums = the teacher's data scales) plus the distillation schedule."""
    t2: int = 5  # second timestep: at t = t2 scales < t2 are given as data (spec 4.5)
    loss_split: int = 5  # scales < loss_split are read through the classifier head, the rest through the continuous one

    def __post_init__(self) -> None:
        super().__post_init__()
        K = len(self.patch_nums)
        if not 1 <= self.t2 < K:
            raise ValueError(f"invalid DDStudentConfig: t2 must be in [1, {K - 1}] for {K} scales, got {self.t2}")
        if not 0 <= self.loss_split <= K:
            raise ValueError(f"invalid DDStudentConfig: loss_split must be in [0, {K}] for {K} scales, got {self.loss_split}")

    def teacher_config(self) -> VARConfig:
        return VARConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VARConfig)})


def level_sibling_mask(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(S, S) bool, S = 1 + sum pn^2: query slot i may see key slot j iff level(j) < level(i) or i == j."""
    lvl_S = slot_levels(patch_nums)
    return (lvl_S[None, :] < lvl_S[:, None]) | torch.eye(lvl_S.numel(), dtype=torch.bool)


def slot_levels(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(S,) level of every slot: 0 for the start slot, s + 1 for the tokens of scale s."""
    return torch.cat([torch.zeros(1, dtype=torch.long)] +
                     [torch.full((p * p,), s + 1, dtype=torch.long) for s, p in enumerate(patch_nums)])


class DDStudent(nn.Module):
    def __init__(self, config: DDStudentConfig, init: bool = True):
        super().__init__()
        if not isinstance(config, DDStudentConfig):
            raise TypeError(f"DDStudent needs a DDStudentConfig, got {type(config).__name__}; "
                            f"build one with DDStudent.from_teacher(var, t2=..., loss_split=...)")
        self.config = c = config
        C = c.embed_dim
        self.patch_nums, self.num_classes, self.depth = c.patch_nums, c.num_classes, c.depth
        self.num_scales = len(c.patch_nums)
        backbone_cfg = dataclasses.replace(c.teacher_config(), patch_nums=(1,) + tuple(c.patch_nums))
        self.backbone = VAR(backbone_cfg, init=init)
        self.slot_type = nn.Embedding(2, C)
        self.type_proj = nn.ModuleList(nn.Linear(C, C) for _ in range(c.depth + 1))  # per block + before heads
        self.cont_ada = nn.Embedding(c.num_classes + 1, 2 * C)  # class-conditioned (scale, shift) of the continuous head
        self.cont_head = nn.Linear(C, c.z_channels)
        lvl_S = slot_levels(c.patch_nums)
        self.register_buffer("lvl_S", lvl_S, persistent=False)
        self.register_buffer("scale_of_token_L", lvl_S[1:] - 1, persistent=False)
        bias = torch.zeros(lvl_S.numel(), lvl_S.numel()).masked_fill_(~level_sibling_mask(c.patch_nums), float("-inf"))
        self.register_buffer("attn_bias", bias[None, None], persistent=False)
        level_ends = torch.cumsum(torch.bincount(lvl_S), 0).tolist()
        self.attn_segments = prefix_segments(level_sibling_mask(c.patch_nums), level_ends)
        if init:
            self.init_new_weights()

    # ---- sizes / compatibility with the VAR interface the samplers check ------------------------------
    @property
    def seq_len(self) -> int:
        return self.scale_of_token_L.numel()

    @property
    def t2(self) -> int:
        return self.config.t2

    @property
    def loss_split(self) -> int:
        return self.config.loss_split

    @property
    def class_emb(self) -> nn.Embedding:  # samplers find the device through it
        return self.backbone.class_emb

    def scale_slices(self) -> list[slice]:
        out, start = [], 0
        for p in self.patch_nums:
            out.append(slice(start, start + p * p))
            start += p * p
        return out

    # ---- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_new_weights(self) -> None:
        """The tensors the teacher does not have. The per-block type maps start at zero, so the initial
        student computes the teacher's blocks on its new inputs; their gradients are not zero because the
        type embedding is."""
        std = self.backbone.init_std
        nn.init.trunc_normal_(self.slot_type.weight, std=std, a=-2.0, b=2.0)
        for lin in self.type_proj:
            lin.weight.zero_()
            lin.bias.zero_()
        self.cont_ada.weight.zero_()
        nn.init.trunc_normal_(self.cont_head.weight, std=std, a=-2.0, b=2.0)
        self.cont_head.bias.zero_()

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher: VAR, t2: int, loss_split: int | None = None) -> "DDStudent":
        """Copy every teacher tensor; the level and position tables get one new (random) leading row for the
        start slot, the rest are the teacher's rows of the same token (offset by one)."""
        fields = {f.name: getattr(teacher.config, f.name) for f in dataclasses.fields(VARConfig)}
        cfg = DDStudentConfig(**fields, t2=t2, loss_split=t2 if loss_split is None else loss_split)
        student = cls(cfg).to(teacher.class_emb.weight.device)
        own = student.backbone.state_dict()
        for name, tensor in teacher.state_dict().items():
            if name in ("lvl_1L", "attn_bias_for_masking"):
                continue  # the backbone's own scale bookkeeping
            if name == "lvl_embed.weight":
                own[name][1:] = tensor
            elif name == "pos_1LC":
                own[name][:, 1:] = tensor
            else:
                own[name].copy_(tensor)
        student.backbone.load_state_dict(own)
        return student.train(teacher.training)

    # ---- forward ---------------------------------------------------------------------------------------
    def slot_types(self, B: int, t, device) -> torch.Tensor:
        """(B, S) slot-type ids: the start slot and scales < t are data, scales >= t noise."""
        t_B = torch.as_tensor(t, device=device)
        if t_B.is_floating_point():
            raise ValueError(f"t must be an integer number of leading data scales, got {t!r}")
        t_B = t_B.long().expand(B) if t_B.ndim == 0 else t_B.long()
        if t_B.shape != (B,) or bool((t_B < 0).any()) or bool((t_B > self.num_scales).any()):
            raise ValueError(f"t must be an int or a (B,) tensor in [0, {self.num_scales}], got {t!r}")
        is_noise = self.scale_of_token_L[None, :] >= t_B[:, None]
        start = torch.zeros(B, 1, dtype=torch.bool, device=device)
        return torch.cat((start, is_noise), dim=1).long()  # DATA = 0, NOISE = 1

    def forward(self, labels_B: torch.Tensor, slots_BLCv: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,); slots (B, L, Cvae): code vectors of the scales < t, noise of the scales >= t;
        t: int or (B,). Returns classifier logits (B, L, V) and continuous code vectors (B, L, Cvae), fp32."""
        bb = self.backbone
        B, L = labels_B.shape[0], self.seq_len
        if slots_BLCv.shape != (B, L, self.config.z_channels):
            raise ValueError(f"slots must have shape (B={B}, L={L}, Cvae={self.config.z_channels}), got "
                             f"{tuple(slots_BLCv.shape)}; concatenate the per-scale maps of {self.patch_nums} row-major")
        cond_BD = bb.condition(labels_B)
        types_BS = self.slot_types(B, t, slots_BLCv.device)
        with torch.autocast(device_type=slots_BLCv.device.type, enabled=False):
            start = cond_BD.float().unsqueeze(1) + bb.pos_start
            x_BSC = torch.cat((start, bb.word_embed(slots_BLCv.float())), dim=1)
            type_BSC = self.slot_type(types_BS)
            x_BSC = x_BSC + bb.lvl_embed(self.lvl_S)[None] + bb.pos_1LC + type_BSC
        cond = bb.shared_ada_lin(cond_BD)
        device_type = x_BSC.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x_BSC, cond = x_BSC.to(dtype), cond.to(dtype)
        for block, proj in zip(bb.blocks, self.type_proj):  # the teacher's own block code, plus the type injection
            x_BSC = block(x_BSC, cond, self.attn_bias, mid_residual=proj(type_BSC), segments=self.attn_segments)
        h_BLC = (x_BSC + self.type_proj[-1](type_BSC).to(x_BSC.dtype))[:, 1:].float()
        logits_BLV = bb.logits(h_BLC, cond_BD)
        scale, shift = self.cont_ada(labels_B.long()).view(B, 1, 2, -1).float().unbind(2)
        cont = layer_norm(h_BLC, self.config.norm_eps).mul(scale.add(1)).add_(shift)
        return logits_BLV, self.cont_head(cont).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


register_kind("dd_student", DDStudent, DDStudentConfig)
