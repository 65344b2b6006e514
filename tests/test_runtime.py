"""`zoo.runtime.tune_malloc`: `train.py` and the speed benchmark run under the same glibc malloc settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from zoo.runtime import TUNABLES

CODE = "import os, sys; from zoo.runtime import tune_malloc; tune_malloc(); print(os.environ.get('GLIBC_TUNABLES'))"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, TUNABLES), ({"ZOO_SYSTEM_MALLOC": "1"}, "None"), ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, None)],
    ids=["default", "opt-out", "user-set"],
)
def test_the_process_reruns_once_with_the_tuned_malloc(env: dict[str, str], expected: str | None) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ZOO_SYSTEM_MALLOC")}
    done = subprocess.run(
        [sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.splitlines() == [expected or env["GLIBC_TUNABLES"]]  # one line: re-executed once, not twice
