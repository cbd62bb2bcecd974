"""MKL's vector math, made deterministic from a process's first call on.

torch's float exp/expm1/log/log1p on CPU hand parallel chunks of 2048 elements to MKL's vector
math, which picks its per-CPU code path lazily. When that first call reaches two threads at once,
the worker thread's chunk sometimes runs on a less accurate path: measured with torch 2.13 on a
2-core Xeon, 3 fresh processes in 20 got relative errors up to 3e-5 in the worker's half of a
[15, 1003] exp (never with MKL_CBWR=COMPATIBLE, never from the second call on). A run whose
first exp lands there differs from the same run in another process, which breaks bitwise resume
and float64 comparisons at 1e-5; one call of each function on one thread first avoids the race.
"""
import torch

_settled = False


def settle() -> None:
    """Make each MKL vector-math function's first call, single-threaded (idempotent, ~1 ms)."""
    global _settled
    if _settled:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.float64):
            x = torch.rand(4096, dtype=dtype)
            for fn in (torch.exp, torch.expm1, torch.log, torch.log1p):
                fn(x)
    finally:
        torch.set_num_threads(threads)
    _settled = True
