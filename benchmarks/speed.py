"""Speed of every variant against the native layer of the same size (a script, not a test).

For each shape (batch, length, input, hidden) and variant it times, interleaved with `torch.nn.LSTM` (`torch.nn.GRU`
for the GRU variants, `torch.nn.RNN` with ReLU for IndRNN) built in the same process, the median training step
(forward + backward) and inference (forward in evaluation mode under `torch.no_grad`), their ratios to the native
layer, tokens per second, the peak memory a training step adds (CUDA: `max_memory_allocated`; CPU: the peak resident set
of a fresh process), and the first call (warm-up) time: building the layer and its first training step.

    python benchmarks/speed.py                         # all variants, all shapes, CPU
    python benchmarks/speed.py --variants ln_lstm bn_lstm --shapes 32,100,64,256 --repeats 5
    python benchmarks/speed.py --device cuda --json speed-cuda.json
    python benchmarks/speed.py --device cuda --backend python --autocast bf16   # another backend; mixed precision

On glibc the script re-executes itself with `GLIBC_TUNABLES` raising malloc's mmap and trim thresholds, as `train.py`
does (`zoo.runtime.tune_malloc`), because the default settings return large buffers to the system after every step
and the page faults that follow slow every layer, the native one included (about 40% on `torch.nn.LSTM` here);
`--system-malloc` keeps the default. The allocator
settings are printed and stored with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import zoo
import zoo.nn
from zoo.runtime import tune_malloc

SHAPES = [(32, 100, 64, 256), (64, 200, 64, 512), (100, 784, 1, 100), (64, 100, 50, 1000)]
PROBE_TUNABLES = "glibc.malloc.mmap_threshold=65536"  # the memory probe: every large buffer its own mapping
BACKEND = "auto"  # `zoo.nn.RNN`'s backend (--backend)
AUTOCAST: torch.dtype | None = None  # both layers' steps under torch.autocast in this dtype (--autocast)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve")  # printed when present


def cpu_flags() -> str:
    """The instruction-set flags of /proc/cpuinfo that decide which kernels run (Linux; else empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return ""
    return ",".join(f for f in ISA_FLAGS if f in flags)


def native_for(variant: str, input_size: int, hidden: int) -> nn.Module:
    """The vendor-kernel layer a variant is compared with."""
    if variant.endswith("gru"):
        return nn.GRU(input_size, hidden)
    if variant.endswith("indrnn"):
        return nn.RNN(input_size, hidden, nonlinearity="relu")
    return nn.LSTM(input_size, hidden)


def build(variant: str, input_size: int, hidden: int, steps: int) -> nn.Module:
    options = {"max_steps": steps} if "max_steps" in zoo.nn.get_variant(variant).options else {}
    return zoo.nn.RNN(variant, input_size, hidden, backend=BACKEND, **options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=AUTOCAST, enabled=AUTOCAST is not None):
        out, _ = module(x)
    out.float().sum().backward()


def infer_step(module: nn.Module, x: Tensor) -> None:
    """Inference as a user runs it: evaluation mode (batch norms read their running statistics), no autograd."""
    module.eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=AUTOCAST, enabled=AUTOCAST is not None):
        module(x)
    module.train()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_memory(variant: str, shape: tuple[int, int, int, int], which: str, device: torch.device) -> float:
    """Peak bytes a training step adds to what its module and input hold.

    CUDA: `max_memory_allocated`. CPU: a fresh process (so no freed memory is cached from earlier steps) resets the
    kernel's peak-RSS counter (``/proc/self/clear_refs``), runs one step and reads ``VmHWM`` against ``VmRSS`` before.
    On glibc that process maps every buffer of 64 KiB or more on its own (`PROBE_TUNABLES`), returned to the system when
    freed, so the peak is that of the live buffers; with one heap (the timing settings) it moved by up to one (T, B, 4H)
    tensor with the heap's layout between otherwise equal runs.
    """
    if device.type == "cuda":
        batch, steps, input_size, hidden = shape
        module = (
            build(variant, input_size, hidden, steps) if which == "ours" else native_for(variant, input_size, hidden)
        )
        module, x = module.to(device), torch.randn(steps, batch, input_size, device=device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(module, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    cmd = [sys.executable, __file__, "--memory-probe", variant, ",".join(map(str, shape)), which, "--backend", BACKEND]
    if AUTOCAST is not None:  # (the probe measures the step the timings ran)
        cmd += ["--autocast", {torch.bfloat16: "bf16", torch.float16: "fp16"}[AUTOCAST]]
    env = {**os.environ, "GLIBC_TUNABLES": PROBE_TUNABLES} if platform.libc_ver()[0] == "glibc" else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(variant: str, shape_arg: str, which: str) -> None:
    """Child process of `peak_memory` on CPU: prints the bytes one training step adds."""
    batch, steps, input_size, hidden = (int(v) for v in shape_arg.split(","))
    module = build(variant, input_size, hidden, steps) if which == "ours" else native_for(variant, input_size, hidden)
    x = torch.randn(steps, batch, input_size)
    train_step(module, torch.randn(2, 2, input_size))  # one-time initialisation (thread pools, kernels) on a tiny input

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size
    train_step(module, x)
    print(status("VmHWM:") - base)


def bench(variant: str, shape: tuple[int, int, int, int], repeats: int, device: torch.device, memory: bool) -> dict:
    batch, steps, input_size, hidden = shape
    torch.manual_seed(0)
    x = torch.randn(steps, batch, input_size, device=device)
    t0 = time.perf_counter()
    ours = build(variant, input_size, hidden, steps).to(device)
    train_step(ours, x)
    sync(device)
    first_call = time.perf_counter() - t0
    native = native_for(variant, input_size, hidden).to(device)
    train_step(native, x)
    times: dict[str, list[float]] = {k: [] for k in ("train", "train_native", "infer", "infer_native")}
    for _ in range(repeats):  # interleaved, so both see the same machine state
        times["train_native"].append(timed(lambda: train_step(native, x), device))
        times["train"].append(timed(lambda: train_step(ours, x), device))
        times["infer_native"].append(timed(lambda: infer_step(native, x), device))
        times["infer"].append(timed(lambda: infer_step(ours, x), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = peak_memory(variant, shape, "ours", device) if memory else float("nan")
    mem_native = peak_memory(variant, shape, "native", device) if memory else float("nan")
    return {
        "variant": variant,
        "backend": ours.backend,
        "shape": {"batch": batch, "length": steps, "input": input_size, "hidden": hidden},
        "train_ms": 1e3 * med["train"],
        "train_native_ms": 1e3 * med["train_native"],
        "train_ratio": med["train"] / med["train_native"],
        "infer_ms": 1e3 * med["infer"],
        "infer_native_ms": 1e3 * med["infer_native"],
        "infer_ratio": med["infer"] / med["infer_native"],
        "train_tokens_per_s": batch * steps / med["train"],
        "peak_mb": mem / 2**20,
        "peak_native_mb": mem_native / 2**20,
        "memory_ratio": mem / mem_native if mem_native > 0 else float("nan"),
        "first_call_s": first_call,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=[v.name for v in zoo.nn.list_variants()])
    p.add_argument(
        "--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES], help="batch,length,input,hidden"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default="speed.json", help="where to write the figures")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--backend", default="auto", help="the variants' backend (zoo.nn.backends; default auto)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="run both layers under torch.autocast")
    p.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global BACKEND, AUTOCAST
    BACKEND = args.backend
    AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    if args.memory_probe:
        _memory_probe(*args.memory_probe)
        return

    if not args.system_malloc:
        tune_malloc()  # as train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {
        "zoo": zoo.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(glibc default)"),
        "compiled_step": zoo.nn.fused.extension_available(),  # built by `python -m zoo.nn.build`
        "backend": args.backend,
        "autocast": args.autocast or "off",
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    header = (
        f"{'variant':<11} {'backend':<9} {'B,T,I,H':<16} {'train ms':>9} {'native':>8} {'ratio':>6} {'infer ms':>9} "
        f"{'native':>8} {'ratio':>6} {'tok/s':>9} {'peak MB':>8} {'mem×':>5} {'first s':>7}"
    )
    print(header)
    rows = []
    for shape_arg in args.shapes:
        shape = tuple(int(v) for v in shape_arg.split(","))
        for variant in args.variants:
            r = bench(variant, shape, args.repeats, device, not args.no_memory)
            rows.append(r)
            print(
                f"{variant:<11} {r['backend']:<9} {shape_arg:<16} {r['train_ms']:9.1f} {r['train_native_ms']:8.1f} "
                f"{r['train_ratio']:6.2f} {r['infer_ms']:9.1f} {r['infer_native_ms']:8.1f} {r['infer_ratio']:6.2f} "
                f"{r['train_tokens_per_s']:9.0f} {r['peak_mb']:8.1f} {r['memory_ratio']:5.2f} {r['first_call_s']:7.2f}",
                flush=True,
            )
    with open(args.json, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
