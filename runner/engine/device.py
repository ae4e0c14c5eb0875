"""Where computation runs, and the precision and memory layout used there."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

import torch


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when there is a GPU (and it is wanted), otherwise the CPU."""
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    """The precision evaluation runs in there: bf16 on GPU; fp32 on CPU (CPU bf16 is slower than fp32 on most
    CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fast_math(device: torch.device) -> ContextManager:
    """Autocast to `compute_dtype` on GPU; nothing to do on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=compute_dtype(device))
    return nullcontext()


def uses_channels_last(device: torch.device) -> bool:
    """channels_last: cuDNN tensor cores want it, and oneDNN on the CPU runs these networks several times
    faster with it."""
    return device.type in ("cuda", "cpu")


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network on `device`, in eval mode, in the memory layout that is fastest there."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if uses_channels_last(device) else model


def free_memory_bytes(device: torch.device) -> int:
    """Memory available to a new allocation on the device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere, free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tune_allocator() -> bool:
    """Keep freed activation buffers in the process instead of returning them to the OS (glibc only).

    By default glibc hands every large block back with munmap, so each new activation tensor is page-faulted
    in again, which slows training and evaluation markedly on a small CPU. And every thread
    allocates from glibc's one main arena: a thread of its own arena (a Tune trial runs in one, and so do the
    driver's data and calibration) gets its memory in heaps of at most 64 MB that glibc unmaps whenever one
    empties, whatever the thresholds say (millions of page faults per trial; none with one arena). The arena limit holds for threads started after
    this call, so call it once per process, first thing, in entry points; a Ray worker's threads exist before
    any trial code runs, so a Ray the sweep starts passes MALLOC_ARENA_MAX=1 to its workers' environment
    (`runner.job.ray_env.OWN_RAY_ENV`). Returns whether the settings took.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                and libc.mallopt(m_arena_max, 1))
