"""Peak memory of this process: its resident set on CPU, the tensors allocated on a CUDA device.

On Linux the kernel's peak-RSS counter can be reset (`/proc/self/clear_refs`), so the peak of a
stretch of work (a calibration, a run) is measured without what came before it; elsewhere the
process's lifetime peak (`ru_maxrss`) stands in.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading

import torch


def ru_maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # pragma: no cover - psutil is a host dependency, but optional here
        return proc_status_mb("VmRSS")


def vm_hwm_mb() -> float | None:
    return proc_status_mb("VmHWM")


def proc_status_mb(field_name: str) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return vm_hwm_mb() is not None


def memory_kind(device: torch.device) -> str:
    """What `peak_mb` measures on `device`: "cuda" (allocated tensors) or "rss" (the process)."""
    return "cuda" if device.type == "cuda" else "rss"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_mb(device: torch.device) -> float:
    """The peak since `reset_peak(device)` (on CPU without a resettable counter: the process's peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = vm_hwm_mb()
    return hwm if hwm is not None else ru_maxrss_mb()


def return_freed_memory() -> bool:
    """Hand the pages the C allocator keeps after frees back to the system (glibc's malloc_trim).
    A run frees gigabytes from its own thread's arena (activations, copies made for training), and
    glibc keeps them, so the host's process stays that much larger until it exits. Measured by hand
    in Forge after an SDXL run: 10.6 GB of anonymous memory, 7.7 GB after a trim. False where there is
    no glibc (macOS, Windows, musl)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# What glibc's own sliding rule reaches in a process that frees large tensors (its DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit, and twice that for trimming): what a run leaves behind, since the rule cannot be switched back on.
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20


@contextlib.contextmanager
def keep_freed_memory(active: bool = True):
    """For a run on the CPU: the C allocator keeps what a step frees for the next step, instead of handing
    it back to the system and taking it again page by page.

    A training step allocates and frees hundreds of megabytes of activations. glibc maps the large ones
    fresh and returns the top of its heap once more than a few megabytes are free there, so every step
    faults all of it in again (the kernel zeroes each 4 KiB page). Measured with
    `python -m lora_train bench --arch sd15 --text-encoder` (random SD1.5, dim 32, CPU, against
    `--glibc-trimming`, runs alternated): the LoRA step took 13-17 % less time at 256 px, at the same peak.
    At 512 px no difference stood out from this machine's run-to-run spread (6.6-8.3 s either way), where
    the step's time is in large matrix products that fault a smaller share. By hand in the real WebUI
    (v1.10.1, CPU, random SD1.5, 256 px, text encoder trained, 20 steps, two pairs alternated on a quiet
    machine): 3.29 and 3.50 s per step against 4.52 and 4.42 s, a third of the page faults, but a peak
    anonymous memory 0.9-1.0 GB higher (7.25-7.35 GB against 6.34-6.43 GB): memory the heap keeps that
    a later step of another size cannot reuse. That is the price of the speed. Nothing is kept past the run:
    the run manager trims the heap afterwards (`return_freed_memory`). glibc only (elsewhere nothing
    happens). The setting is the process's, so in the WebUI it also holds for the host while the run has
    its queue; nested or overlapping uses (an estimate beside a run) keep it until the last one ends."""
    libc = _glibc() if active else None
    if libc is None:
        yield False
        return
    global _KEEPING
    with _KEEPING_LOCK:
        _KEEPING += 1
        if _KEEPING == 1:
            # a glibc that refuses so high a threshold gets the highest its sliding rule uses
            if not libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30):
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield True
    finally:
        with _KEEPING_LOCK:
            _KEEPING -= 1
            if _KEEPING == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)


_KEEPING = 0  # keep_freed_memory's users at this moment
_KEEPING_LOCK = threading.Lock()


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both are glibc's; musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc
