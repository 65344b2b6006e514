"""Compile the ``triton`` backend's kernels ahead of time for a GPU architecture, without a GPU.

``python -m zoo.nn.gpu.compile [--arch 90] [--quick]`` builds every specialization the backend launches (norm kinds,
float32 and float64, with and without the half-precision GEMM copies) through Triton's compiler down to a cubin
(Triton's bundled ``ptxas``) and prints each one's registers and spill stack (``cuobjdump -res-usage``). The
interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics; this checks what it cannot: that the
kernels compile for the GPU at the tiles the host picks, and whether they spill. Run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator


def _specializations(quick: bool) -> Iterator[tuple[str, dict, dict]]:
    """(kernel name, constexprs, pointer dtypes other than fp32) for the kernels at `recurrence.tile`'s tiles."""
    from . import kernels as K
    from .recurrence import tile

    tl = K.tl
    kinds = [(K.LN, K.LN), (K.RMS, K.RMS), (K.BN, K.BN), (K.AFFINE, K.AFFINE), (K.NONE, K.NONE)]
    shapes = [(64, 1000)] if quick else [(64, 1000), (32, 256), (2, 64)]
    for batch, hidden in shapes:
        for kh, kc in kinds:
            br, bj = tile((kh, kc), batch, hidden, 4)
            for lowp in (False, True) if not quick or kh == K.LN else (False,):
                low = {"z_ptr": "bf16", "hl_ptr": "bf16"} if lowp else {}
                yield (
                    "lstm_forward",
                    dict(KH=kh, KC=kc, HAS_BH=True, HAS_BC=True, SAVE=True, LOWP=lowp, ACC=tl.float32, BR=br, BJ=bj),
                    low,
                )
            low = {"dhg_ptr": "bf16", "dz_ptr": "bf16", "z_ptr": "bf16"}
            yield "lstm_backward", dict(KH=kh, KC=kc, STORE_DZ=True, ACC=tl.float32, BR=br, BJ=bj), low
        br, bj = tile((K.LN,), batch, hidden, 3)
        for k in (K.LN, K.RMS):
            low = {"a_ptr": "bf16", "hl_ptr": "bf16"}
            yield (
                "gru_forward",
                dict(KRZ=k, KN=k, HAS_BRZ=True, HAS_BN=True, SAVE=True, LOWP=True, ACC=tl.float32, BR=br, BJ=bj),
                low,
            )
            low = {"a_ptr": "bf16", "dhg_ptr": "bf16", "da_ptr": "bf16"}
            yield "gru_backward", dict(KRZ=k, KN=k, HAS_BN=True, ACC=tl.float32, BR=br, BJ=bj), low
        br, bj = tile((K.NONE,), batch, hidden, 1)
        ints = {"sizes_ptr": "i32", "offsets_ptr": "i32"}
        yield "indrnn_forward", dict(ACC=tl.float32, BR=br, BJ=bj), ints
        yield "indrnn_backward", dict(HAS_DOUT=True, ACC=tl.float32, BR=br, BJ=bj), ints
    br, bj = tile((K.BN,), 4, 4, 4)  # float64
    f64 = {"ACC": tl.float64, "BR": br, "BJ": bj}
    yield "lstm_forward", dict(KH=K.BN, KC=K.BN, HAS_BH=False, HAS_BC=True, SAVE=True, LOWP=False, **f64), "fp64"
    yield "lstm_backward", dict(KH=K.BN, KC=K.BN, STORE_DZ=True, **f64), "fp64"


FLOATS = {"eps_h", "eps_c", "eps_rz", "eps_n", "momentum"}


def compile_all(arch: int, quick: bool) -> list[str]:
    """Compile every specialization for ``sm_<arch>``; one line of resource usage each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels as K
    from .recurrence import GATES, warps

    if K.INTERPRETED:
        raise SystemExit("TRITON_INTERPRET=1 is set: the kernels were defined for the interpreter; unset it")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    lines = []
    for name, consts, ptrs in _specializations(quick):
        fn = getattr(K, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*" + (ptrs if isinstance(ptrs, str) else ptrs.get(arg, "fp32"))
            else:
                signature[arg] = "fp32" if arg in FLOATS else "i32"  # (Python floats pass as fp32)
        num_warps = warps(consts["BR"] * consts["BJ"] * GATES.get(name, 1))
        src = ASTSource(fn=fn, signature=signature, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        usage = ""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            run = subprocess.run(
                [os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
            )
            usage = " ".join(w for line in run.stdout.splitlines() if "REG:" in line for w in line.split()[:2])
        shown = {k: v for k, v in consts.items() if k not in ("ACC",)}
        dtype = "fp64" if ptrs == "fp64" else "fp32"
        lines.append(f"{name} {dtype} warps={num_warps} {shown}: {usage or 'compiled'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, 80: A100)")
    parser.add_argument("--quick", action="store_true", help="one shape, fewer variants")
    args = parser.parse_args(argv)
    for line in compile_all(args.arch, args.quick):
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
