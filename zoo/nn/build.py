"""Compile the fused LSTM step extension into its cache: ``python -m zoo.nn.build`` (exit code 1 if it fails)."""

from __future__ import annotations

import sys
import time

from . import _ext


def main() -> int:
    if _ext.disabled():
        print("ZOO_NO_EXT is set: nothing built", file=sys.stderr)
        return 1
    start = time.perf_counter()
    print(f"building {_ext.SOURCE} into {_ext.build_directory()} ...", flush=True)
    try:
        _ext.load(build=True)
    except Exception as error:  # the compiler's output is in the message
        print(f"build failed: {error}", file=sys.stderr)
        return 1
    print(f"built {_ext.library()} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
