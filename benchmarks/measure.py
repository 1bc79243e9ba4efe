"""Machine measurements shared by the benchmarks: process memory, device synchronisation, model FLOPs (with the
CPU attention kernel counted), the matmul peak every FLOP/s figure is divided by (measured in the same run,
same dtype and threads), the machine's usable CPUs and load, and the median/IQR summary of repeated values."""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

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


# ---- model FLOPs ------------------------------------------------------------------------------------------------
def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Model FLOPs of attention's backward: twice the forward's two matmuls (dQ, dK, dV, dP), no recomputation."""
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _forward_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch registers formulas for the CUDA attention kernels only; the CPU kernel would count as zero
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _forward_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with CPU attention counted (matmuls, convolutions, attention; no elementwise work)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def median_iqr(values: list[float]) -> dict:
    """Median and inter-quartile range (inclusive quartiles) of repeated measurements."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "iqr": q[2] - q[0], "values": list(values)}


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
