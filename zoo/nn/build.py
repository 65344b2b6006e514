"""Compile the fused recurrences' loops into their cache, one build per instruction-set level:
``python -m zoo.nn.build`` (every level this compiler targets; ``--level avx2`` for one), exit code 1 if a build
fails."""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import _ext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.nn.build", description=__doc__)
    parser.add_argument("--level", action="append", choices=list(_ext.levels()), help="build only this level")
    args = parser.parse_args(argv)
    if _ext.disabled():
        print("ZOO_NO_EXT is set: nothing built", file=sys.stderr)
        return 1
    wanted = args.level or list(_ext.levels())
    print(f"building {_ext.SOURCE} ({', '.join(wanted)}) into {_ext.build_directory()} ...", flush=True)

    def one(level: str) -> str | None:
        start = time.perf_counter()
        try:
            path = _ext.build(level)
        except Exception as error:  # the compiler's output is in the message
            return f"{level}: build failed: {error}"
        print(f"built {path} in {time.perf_counter() - start:.1f} s", flush=True)
        return None

    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        errors = [e for e in pool.map(one, wanted) if e]
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        print(f"this CPU runs the {_ext.loaded_level()!r} build")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
