"""Per-image generator seeds from (base seed, image index), valid for CPU and CUDA torch generators.

The CPU generator (mt19937) keeps only the low 32 bits of its seed, CUDA's Philox all 64. Both halves are
therefore built so that they are useful on their own:
* low 32 bits: a bijection of the index keyed by the base seed, so the images of one run never share a
  CPU stream (for fewer than 2**32 images), and two base seeds only collide when their keys happen to
  differ by a small XOR (probability ~ images / 2**32);
* high 31 bits: splitmix64 of (seed, index), which CUDA mixes in as well.
The result lies in [0, 2**63), accepted by `torch.Generator.manual_seed` on every device.
"""
from __future__ import annotations

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of Steele et al.'s splitmix64 finaliser: a bijection of 64-bit integers with full avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit integers (each step is invertible)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def image_seed(base_seed: int, index: int) -> int:
    """Seed of image `index` of a run with `base_seed` (any Python int; negative seeds wrap modulo 2**64)."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int):
        raise TypeError(f"base_seed must be an int, got {type(base_seed).__name__}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"image index must be an int >= 0, got {index!r}")
    key = splitmix64(base_seed & _MASK64)
    low = fmix32((index & _MASK32) ^ (key & _MASK32))
    high = splitmix64(key ^ (index & _MASK64)) >> 33  # 31 bits: the seed stays below 2**63
    return (high << 32) | low
