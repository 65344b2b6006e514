"""The compiled loops of the fused recurrences (``zoo/nn/csrc/``: ``zoo_ext.cpp`` and its headers): build them, and
load the build that fits this CPU.

The source is compiled once per instruction-set level, with no ``-march=native`` and no ``-ffast-math``: on x86-64
``avx512`` (``-march=x86-64-v4``), ``avx2`` (``x86-64-v3``: AVX2, FMA) and ``baseline`` (the compiler's default
x86-64); elsewhere ``baseline`` alone. At run time `load` picks the highest level that the CPU has and that is
built, the level PyTorch itself dispatches to (``torch.backends.cpu.get_cpu_capability()``), so one cache, wheel or
Docker image serves every CPU. ``ZOO_EXT_ISA=avx2`` (or ``baseline``) forces a lower level, e.g. to measure an
AVX2-only setting on an AVX-512 machine.

`load` never compiles unless asked (``build=True``, as ``python -m zoo.nn.build`` does): a layer's first call never
waits a minute for the compiler. The cache is ``$ZOO_EXT_DIR/ext-<torch version>-<hash>/<level>/`` (default root
``~/.cache/zoo``), the hash covering the sources and the flags. ``ZOO_NO_EXT=1`` disables the extension (the Python
loop runs). A missing build, or a run on a lower level than the CPU has, is logged once with the command that builds
it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

NAME = "zoo_lstm_step"
CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "zoo_ext.cpp"  # (includes the headers beside it)
# -fno-trapping-math and -fno-math-errno change no result (unlike -ffast-math): they tell GCC that floating-point
# exception flags and errno are not read, so it may compute both sides of a branch. Without them the sigmoid's clamps
# kept its loops scalar at the AVX2 level (and cost a second, masked division at AVX-512).
CFLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
X86_LEVELS = {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "baseline": []}  # best first
CAPABILITY = {"AVX512": "avx512", "AVX2": "avx2"}  # torch's CPU capability -> the level that runs on it
BUILD_COMMAND = "python -m zoo.nn.build"

log = logging.getLogger("zoo.nn")
_loaded: dict[str, ModuleType | None] = {}
_directories: dict[str, Path] = {}  # ZOO_EXT_DIR -> `build_directory()`: hashing the source costs ~0.3 ms, paid once
_said: set[str] = set()


def disabled() -> bool:
    """Whether ``ZOO_NO_EXT`` asks for the Python loop."""
    return os.environ.get("ZOO_NO_EXT", "") not in ("", "0")


def levels() -> dict[str, list[str]]:
    """The instruction-set levels this machine's compiler builds, best first, with their extra flags."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return dict(X86_LEVELS)
    return {"baseline": []}


def cpu_level() -> str:
    """The best level this CPU runs: PyTorch's own dispatch level, lowered by ``ZOO_EXT_ISA`` (never raised)."""
    known = list(levels())
    best = CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    best = best if best in known else "baseline"
    forced = os.environ.get("ZOO_EXT_ISA", "")
    if not forced:
        return best
    if forced not in known:
        raise ValueError(f"ZOO_EXT_ISA={forced!r}: the levels here are {', '.join(known)}")
    if known.index(forced) < known.index(best):
        raise ValueError(f"ZOO_EXT_ISA={forced!r}: this CPU runs {best!r} at most")
    return forced


def build_directory() -> Path:
    """The cache folder of this source, these flags and this torch (one subfolder per level)."""
    root = os.environ.get("ZOO_EXT_DIR", "")
    if root not in _directories:
        flags = " ".join(CFLAGS + LDFLAGS + [f"{k}:{' '.join(v)}" for k, v in levels().items()])
        text = b"".join(f.read_bytes() for f in sorted(CSRC.glob("*.[ch]*")))
        digest = hashlib.sha256(text + flags.encode()).hexdigest()[:16]
        _directories[root] = Path(root or Path.home() / ".cache" / "zoo") / f"ext-{torch.__version__}-{digest}"
    return _directories[root]


def library(level: str | None = None) -> Path:
    """Where the shared library of ``level`` (default: this CPU's) lies, whether or not it exists."""
    return build_directory() / (level or cpu_level()) / f"{NAME}.so"


def build(level: str) -> Path:
    """Compile the source for ``level`` into the cache (about a minute; the compiler's error if it fails), without
    loading it: a level above this CPU's may be built, never run."""
    from torch.utils import cpp_extension

    folder = library(level).parent
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension._write_ninja_file_and_build_library(  # cpp_extension.load's build step, without its import
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=[*CFLAGS, *levels()[level]],
        extra_cuda_cflags=[],
        extra_sycl_cflags=[],
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[],
        build_directory=str(folder),
        verbose=False,
        with_cuda=False,
        with_sycl=False,
    )
    _loaded.clear()
    return library(level)


def load() -> ModuleType | None:
    """The extension module of the best built level this CPU runs, or None: disabled by ``ZOO_NO_EXT``, or not built
    (said once, with the command that builds it)."""
    if disabled():
        return None
    want = cpu_level()
    key = f"{build_directory()}:{want}"
    if key not in _loaded:
        known = list(levels())
        built = [lv for lv in known[known.index(want) :] if library(lv).is_file()]
        module = _import(library(built[0])) if built else None
        _loaded[key] = module
        if module is None:
            say_once(
                f"the compiled CPU loops are not built (or do not load): the Python loop runs, several times "
                f"slower; `{BUILD_COMMAND}` builds them"
            )
        elif built[0] != want:
            say_once(
                f"the compiled CPU loops run their {built[0]!r} build on a CPU that has {want!r}; "
                f"`{BUILD_COMMAND}` builds that"
            )
    return _loaded[key]


def loaded_level() -> str | None:
    """The level of the build that `load` returns (None without one)."""
    module = load()
    return None if module is None else Path(module.__spec__.origin).parent.name


def say_once(message: str) -> None:
    """Log ``message`` as a warning of the ``zoo.nn`` logger, once per process."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _import(path: Path) -> ModuleType | None:
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # built against another library (the hash misses e.g. a changed compiler): Python loop
        return None
    return module
