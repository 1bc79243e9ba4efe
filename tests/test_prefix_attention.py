"""Prefix attention (var/prefix_attention.py): the segment plan of block-structured masks, and attention computed
segment by segment equal to one SDPA call over the full mask, forward and backward, for VAR's block-causal mask
and the distilled student's level-sibling mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samplers.dd.student import DDStudent, level_sibling_mask, slot_levels
from tests.conftest import make_tiny_pair
from var.prefix_attention import Segment, prefix_segments, segmented_attention

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def block_causal(patch_nums) -> torch.Tensor:
    lvl = torch.cat([torch.full((p * p,), s) for s, p in enumerate(patch_nums)])
    return lvl[:, None] >= lvl[None, :]


def ends(patch_nums, start: int = 0) -> list[int]:
    return torch.tensor([p * p for p in patch_nums]).cumsum(0).add(start).tolist()


def test_plan_of_the_block_causal_mask_merges_small_scales_and_needs_no_mask_after():
    plan = prefix_segments(block_causal(PATCH_NUMS), ends(PATCH_NUMS))
    # scales 0-5 (1 + 4 + ... + 36 = 91 queries) merge: inside them the mask matters; every later scale is one
    # segment that sees exactly its prefix, scale included
    assert plan == (Segment(0, 91, 91, True), Segment(91, 155, 155, False), Segment(155, 255, 255, False),
                    Segment(255, 424, 424, False), Segment(424, 680, 680, False))
    assert prefix_segments(block_causal(PATCH_NUMS), ends(PATCH_NUMS), min_queries=1)[0] == Segment(0, 1, 1, False)
    with pytest.raises(ValueError, match="scale ends"):
        prefix_segments(block_causal(PATCH_NUMS), [1, 5])


def test_plan_of_the_level_sibling_mask_stops_at_each_level():
    levels = torch.bincount(slot_levels(PATCH_NUMS)).tolist()
    plan = prefix_segments(level_sibling_mask(PATCH_NUMS), torch.tensor(levels).cumsum(0).tolist())
    assert [s.k_end for s in plan] == [s.q_end for s in plan] and all(s.masked for s in plan)  # siblings hidden
    assert plan[-1] == Segment(425, 681, 681, True)


@pytest.mark.parametrize("kind", ["block_causal", "level_sibling"])
def test_segmented_attention_equals_one_masked_call_forward_and_backward(kind):
    patch_nums = (1, 2, 3, 4, 6, 8)
    if kind == "block_causal":
        visible, bounds = block_causal(patch_nums), ends(patch_nums)
    else:
        visible = level_sibling_mask(patch_nums)
        bounds = torch.bincount(slot_levels(patch_nums)).cumsum(0).tolist()
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[None, None]
    plan = prefix_segments(visible, bounds, min_queries=16)
    assert len(plan) > 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, visible.shape[0], 8, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, visible.shape[0], 8, generator=gen)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    ref_grads = torch.autograd.grad(full, (q, k, v), grad)
    seg = segmented_attention(q, k, v, bias, plan, scale=0.3)
    grads = torch.autograd.grad(seg, (q, k, v), grad)
    torch.testing.assert_close(seg, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_models_use_the_plan_and_give_the_one_call_result():
    """The teacher-forced VAR forward and the student forward with their plans vs. with the plan disabled."""
    var, vae = make_tiny_pair(4, patch_nums=(1, 2, 3, 4, 8))  # the 8x8 scale is a segment of its own
    labels = torch.tensor([0, 1, 2])
    idx = [torch.randint(0, var.config.vocab_size, (3, p * p)) for p in var.patch_nums]
    x_tf = vae.teacher_forcing_input(idx)
    student = DDStudent.from_teacher(var, t2=2, loss_split=5).eval()
    slots = torch.randn(3, var.seq_len, var.config.z_channels)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = counting
        try:
            segmented = var(labels, x_tf), student(labels, slots, 0)
            planned_calls = list(calls)
            var.__dict__["_prefix_plans"] = {var.seq_len: None}
            student.attn_segments = None
            calls.clear()
            one_call = var(labels, x_tf), student(labels, slots, 0)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [var.seq_len] * var.depth + [var.seq_len + 1] * var.depth
    assert len(planned_calls) > len(calls) and max(planned_calls) < var.seq_len + 1
    torch.testing.assert_close(segmented[0], one_call[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(segmented[1], one_call[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
