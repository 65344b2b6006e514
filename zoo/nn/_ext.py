"""The compiled step of the fused LSTM recurrence (``zoo/nn/csrc/lstm_step.cpp``): build it, and load it if built.

`load` never compiles unless asked (``build=True``, as ``python -m zoo.nn.build`` does): at run time the fused path
uses the extension only when its shared library is already in the cache, so a layer's first call never waits a
minute for the compiler. The cache is ``$ZOO_EXT_DIR/ext-<torch version>-<hash>`` (default root ``~/.cache/zoo``),
the hash covering the source, the compiler flags and the CPU (its model and instruction-set flags: the build uses
``-march=native``), so a changed source, another torch or a cache (or image) built on another CPU never loads.
``ZOO_NO_EXT=1`` disables the extension (the Python loop runs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

NAME = "zoo_lstm_step"
SOURCE = Path(__file__).parent / "csrc" / "lstm_step.cpp"
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # -ffast-math: glibc's vector expf (libmvec)
LDFLAGS = ["-fopenmp"]

_loaded: dict[str, ModuleType | None] = {}
_libraries: dict[str, Path] = {}  # ZOO_EXT_DIR -> `library()`: hashing the source costs ~0.3 ms, paid once


def disabled() -> bool:
    """Whether ``ZOO_NO_EXT`` asks for the Python loop."""
    return os.environ.get("ZOO_NO_EXT", "") not in ("", "0")


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux: the first processor of /proc/cpuinfo), else its name."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        first = info.read_text().split("\n\n", 1)[0]
        keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
        return "\n".join(line for line in first.splitlines() if line.split(":", 1)[0].strip() in keep)
    return f"{platform.machine()} {platform.processor()}"


def build_directory() -> Path:
    """The cache folder of this source, these flags, this CPU and this torch."""
    key = SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode() + cpu_identity().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    root = Path(os.environ.get("ZOO_EXT_DIR") or Path.home() / ".cache" / "zoo")
    return root / f"ext-{torch.__version__}-{digest}"


def library() -> Path:
    """Where the built shared library lies (whether or not it exists)."""
    return build_directory() / f"{NAME}.so"


def load(build: bool = False) -> ModuleType | None:
    """The extension module, or None: not built (and ``build`` false), or disabled by ``ZOO_NO_EXT``.

    With ``build`` it compiles first where needed (about a minute) and raises the compiler's error if that fails.
    """
    if disabled():
        return None
    root = os.environ.get("ZOO_EXT_DIR", "")
    if build or root not in _libraries:
        _libraries[root] = library()
    path = _libraries[root]
    key = str(path)
    if build:
        from torch.utils import cpp_extension

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),  # (copies: cpp_extension appends to them)
            extra_ldflags=list(LDFLAGS),
            build_directory=str(folder),
            verbose=False,
        )
        _loaded[key] = module
        return module
    if key not in _loaded:
        _loaded[key] = _import(path) if path.is_file() else None
    return _loaded[key]


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
