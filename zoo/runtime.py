"""The process settings that `train.py` and the speed benchmark share, so that users get the benchmarked speed.

On glibc, malloc returns every large buffer (a training step's activations) to the system when it is freed and faults
it in again at the next step; for a recurrent layer on the CPU those page faults cost about 40% of a step, the native
layer's included. `tune_malloc` re-executes the process with ``GLIBC_TUNABLES`` raising malloc's mmap and trim
thresholds, so freed buffers are reused. ``ZOO_SYSTEM_MALLOC=1`` (or a ``GLIBC_TUNABLES`` of your own) keeps glibc's
defaults.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def tune_malloc() -> None:
    """Re-execute this process (same command) with `TUNABLES`, once, on glibc; elsewhere, or when the user set
    ``GLIBC_TUNABLES`` or ``ZOO_SYSTEM_MALLOC=1``, do nothing."""
    if platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ:
        return
    if os.environ.get("ZOO_SYSTEM_MALLOC", "") not in ("", "0"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": TUNABLES})
