#!/usr/bin/env bash
# What a lent CUDA GPU should measure, in parts that each fit one 10-minute device command.
# The plan, the device calls and what to do with the results: docs/gpu-runbook.md.
#
#   bash bench/gpu_session.sh train        # CUDA tests + a tiny `qlora train` on the GPU, then bench/train.py --mode cuda
#   bash bench/gpu_session.sh max-context  # bench/train.py --mode max-context (24 GiB cap)
#   bash bench/gpu_session.sh memory       # bench/memory_accuracy.py --device cuda
#   bash bench/gpu_session.sh tiny         # the same plumbing at the CI size on a CPU (checks this script, not the GPU)
#
# Results go to $OUT (the device tool's folder that comes back), else to a temp folder.
# Wheels the device image lacks (bitsandbytes; datasets for `qlora train`) are installed from .whl/ when present.
set -euo pipefail
part=${1:?usage: bash bench/gpu_session.sh train|max-context|memory|tiny}
out=${OUT:-$(mktemp -d /tmp/qlora-gpu-session-XXXX)}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec > >(tee -a "$out/$part.log") 2>&1
start=$(date +%s)
"$py" - <<'PY'
import platform, torch
import bitsandbytes, peft, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
print(f"python {platform.python_version()} torch {torch.__version__} (CUDA {torch.version.cuda}) transformers "
      f"{transformers.__version__} peft {peft.__version__} bitsandbytes {bitsandbytes.__version__}; {gpu}", flush=True)
PY
# minutes (fractional, never below 0) of a part's budget still left after what this part has spent
left() { "$py" -c "import sys; print(max(0.0, float(sys.argv[1]) - (float(sys.argv[3]) - float(sys.argv[2])) / 60))" "$1" "$start" "$(date +%s)"; }
case $part in
  train)
    # bitsandbytes' paged optimizers use CUDA managed memory, which can hang a GPU where it is not
    # supported: try one paged step on a 1e6-element parameter first, with a time limit
    timeout 120 "$py" -c "
import torch, bitsandbytes as bnb
p = torch.nn.Parameter(torch.randn(1000, 1000, device='cuda'))
opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3); p.grad = torch.randn_like(p); opt.step(); torch.cuda.synchronize()
print('paged optimizer step on CUDA: ok')" || { echo "PAGED OPTIMIZER CHECK FAILED: stopping before the 8B runs"; exit 3; }
    "$py" -m pytest -q -x -p no:cacheprovider tests/qlora/test_offload.py tests/qlora/test_loss.py || echo "CUDA TESTS FAILED"
    "$py" -m qlora.cli train recipes/tiny-cpu.yaml device=cuda max_steps=20 output_dir=/tmp/qlora-tiny-cuda \
      > "$out/tiny-train-cuda.log" 2>&1 && tail -5 "$out/tiny-train-cuda.log" || { echo "TINY CUDA TRAIN FAILED"; tail -30 "$out/tiny-train-cuda.log"; }
    "$py" bench/train.py --mode cuda --budget-min "$(left 9)" --results-dir "$out" ;;
  max-context)
    "$py" bench/train.py --mode max-context --resolution 2048 --budget-min "$(left 9)" --results-dir "$out" ;;
  memory)
    # results straight into $OUT after every row: a row cut off at the device's limit loses only itself
    "$py" bench/memory_accuracy.py --device cuda --budget-min "$(left 8)" --results-dir "$out" || echo "SOME ROWS FAILED" ;;
  tiny)
    "$py" bench/train.py --tiny --stacks hf,qlora --budget-min 2 --results-dir "$out"
    "$py" bench/train.py --tiny --mode max-context --stacks hf,qlora --cap-gib 0.01 --start-seq 256 --resolution 256 \
      --steps 2 --budget-min 2 --results-dir "$out" ;;
  *) echo "unknown part '$part'; valid: train, max-context, memory, tiny" >&2; exit 2 ;;
esac
echo "part $part done in $(( $(date +%s) - start )) s; results in $out"
