"""Host (CPU) memory: keep freed blocks in the process for reuse.

A training step on the CPU allocates and frees the same large buffers every minibatch
(layer outputs and gradients of tens of MB).  glibc's malloc serves blocks above its mmap
threshold (at most 32 MB) with fresh ``mmap`` calls and returns them with ``munmap``, so
every step page-faults and zero-fills all of them again; on the 2-core VMs here that was
about a fifth of a tdnn_1j training step (``bench/bench_train_step.py``).
:func:`keep_freed_memory` tells malloc to serve every block from its heap and not to
return freed memory to the system, so the second step reuses the first step's pages.
The process then holds on to its peak heap size, which a training process reaches in its
first steps anyway.

Only glibc is tuned (``mallopt``); elsewhere (musl, macOS, Windows) nothing changes.
``PKWRAP_KEEP_FREED_MEMORY=0`` turns it off; a process preloading another allocator
(jemalloc, tcmalloc) is left alone.
"""
import ctypes
import ctypes.util
import logging
import os

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state = {"done": None}


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring).

    Args:
      enable: False does nothing (and returns False).
    Returns:
      True if malloc was tuned by this or an earlier call, False if it was left alone
      (disabled, not glibc, or another allocator preloaded).
    """
    if not enable or os.environ.get("PKWRAP_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if _state["done"] is not None:
        return _state["done"]
    ok = False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        log.debug("keep_freed_memory: %s is preloaded; malloc left alone", preload)
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                # no mmap'd blocks (served from the heap instead), and no trimming of the
                # heap's free top (2^31 - 1 bytes is the largest value mallopt takes)
                ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
        except OSError:
            ok = False
    _state["done"] = ok
    return ok
