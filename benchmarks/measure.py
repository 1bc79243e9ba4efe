"""Machine measurements shared by the benchmarks: process memory, device synchronisation, and the matmul peak
every FLOP/s figure is divided by (measured in the same run, same dtype and threads)."""
from __future__ import annotations

import os
import time

import torch

try:
    import resource  # Unix only
except ImportError:
    resource = None


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS from getrusage (kB on Linux/BSD, bytes on macOS)
        if resource is None:
            return 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            c = a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
        del c
    return 2 * size**3 * repeats / best
