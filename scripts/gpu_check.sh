#!/usr/bin/env bash
# The GPU check of the triton backend (issue 19), for whenever a machine with CUDA is at hand: meant to finish in
# under 8 minutes on one GPU (each part has its own timeout; the sum of the timeouts is 7.5 minutes). Run from anywhere:
#
#   bash scripts/gpu_check.sh            # writes gpu-check/ (or $OUT_DIR): logs, speed JSON, table.md
#
# 1. the CUDA tests: tests/test_nn_triton.py (the Triton kernels compiled, against the reference engine on the GPU:
#    float64, float32, autocast, launch counts) and tests/test_nn_fused.py (auto: triton on CUDA);
# 2. benchmarks/speed.py --device cuda at its four shapes, every variant the backend runs, against cuDNN (ratios
#    measured in one process), then ln_lstm and bn_lstm under the python backend (the loop this backend replaces)
#    and under bf16 autocast at (64,100,50,1000);
# 3. a bf16-mixed Lightning training step (scripts/gpu_smoke.py);
# 4. with 2 GPUs or more, a 2-GPU DDP run of bn_lstm with sync_bn.
# It ends by printing table.md, the speed table to paste into docs/speed.md ("GPUs"). No GPU had run it when it was
# written: its first run is also its test.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT_DIR:-gpu-check}
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

python - <<'EOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, triton {triton.__version__}")
EOF
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
VARIANTS="bn_lstm seqbn_lstm ln_lstm rms_lstm ln_gru rms_gru bn_indrnn"

step tests 150 python -m pytest -q -x --device cuda tests/test_nn_triton.py tests/test_nn_fused.py
step speed 150 python benchmarks/speed.py --device cuda --variants $VARIANTS --repeats 5 --json "$OUT/speed.json"
step speed-python 45 python benchmarks/speed.py --device cuda --backend python --variants ln_lstm bn_lstm \
  --shapes 32,100,64,256 64,100,50,1000 --repeats 3 --json "$OUT/speed-python.json"
step speed-bf16 30 python benchmarks/speed.py --device cuda --autocast bf16 --variants ln_lstm bn_lstm \
  --shapes 64,100,50,1000 --repeats 5 --json "$OUT/speed-bf16.json"
step bf16-mixed 30 python scripts/gpu_smoke.py --precision bf16-mixed --variant ln_lstm
if [ "$GPUS" -ge 2 ]; then
  step ddp-sync-bn 45 python scripts/gpu_smoke.py --devices 2 --variant bn_lstm --sync-bn
else
  echo "== ddp-sync-bn: skipped (one GPU)"
fi

python - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out = sys.argv[1]
print("| variant | backend | autocast | B,T,I,H | train ms | ×cuDNN | infer ms | ×cuDNN | peak MB ×cuDNN | first call s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ("speed.json", "speed-python.json", "speed-bf16.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    data = json.load(open(path))
    env = data["environment"]
    for r in data["results"]:
        s = r["shape"]
        shape = f"{s['batch']},{s['length']},{s['input']},{s['hidden']}"
        print(
            f"| {r['variant']} | {r['backend']} | {env.get('autocast', 'off')} | {shape} | {r['train_ms']:.1f} | "
            f"{r['train_ratio']:.2f} | {r['infer_ms']:.1f} | {r['infer_ratio']:.2f} | {r['memory_ratio']:.2f} | "
            f"{r['first_call_s']:.1f} |"
        )
print(f"\n{env['device']}, torch {env['torch']}")
EOF
exit $status
