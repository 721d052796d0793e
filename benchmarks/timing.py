"""Wall time of a GPU call, as the benchmark scripts measure it."""

import time

import torch


def ms_per_call(fn, repeats: int, warmup: int = 3) -> float:
    """Mean wall milliseconds of `fn` over `repeats` calls after `warmup` calls, the GPU
    synchronised before and after the timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3
