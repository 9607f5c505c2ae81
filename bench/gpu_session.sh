#!/usr/bin/env bash
# One prepared command for a lent CUDA GPU (an H200 for at most 15 minutes, start-up included):
# the most valuable measurements first, each part under its own timeout, results written as it goes.
# The plan, the device call and what to do with the results: docs/gpu-runbook.md.
#
#   bash bench/gpu_session.sh prepare             # here, once: wheels the device image lacks -> .whl/ (carry it)
#   SIZE=full bash bench/gpu_session.sh           # on the GPU (the device call runs this)
#   SIZE=tiny bash bench/gpu_session.sh           # the CPU dry run: the same parts at the CI size
#
# Environment:
#   SIZE      full (default; needs CUDA) or tiny
#   BUDGET_S  seconds of command time for all parts (default 560 full, 300 tiny): no part starts, and
#             none runs on, past it; the device command's own limit (timeout_s) should be ~40 s more
#   PARTS     which parts, in this order (default: all, in priority order):
#             tests train grid8b speed maxctx grid7b quantspeed
#   MAXCTX_STACKS  bench/train.py stacks for maxctx (default qlora-long; hf,qlora-offload,qlora for the ratios)
#   MAXCTX_START, MAXCTX_MAX, MAXCTX_RES  its search: first probe, doubling cap, resolution (131072, 131072, 16384)
#   OUT       results folder (the device tool sets it; default bench/results/_scratch/gpu-session-SIZE)
#   WORK      scratch folder (default a new /tmp/qlora-gpu-work-XXXX); PYTHON (default .venv/bin/python, else python3)
#
# $OUT receives at most 7 files (the device returns at most 8): gpu-session.log (everything), gpu-session.json
# (environment, imports, each part's status and seconds), gpu-session.md (a status table and every part's
# markdown), and the result JSONs memory-accuracy-*.json, train-*.json, train-max-context-*.json, quant-*.json.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  # Wheels for packages the device image lacks, at the versions of this checkout's .venv, for its Python 3.12.
  # bitsandbytes (43 MB, every CUDA build) is the big one; the rest are small (pydantic_core is compiled).
  set -e
  py=${PYTHON:-.venv/bin/python}
  names="bitsandbytes datasets dill multiprocess fsspec pydantic pydantic_core typing_inspection annotated_types typing_extensions"
  specs=$("$py" - $names <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
PY
)
  rm -rf .whl && mkdir .whl
  git check-ignore -q .whl || { echo "/.whl/ must be git-ignored (add it to .gitignore or .git/info/exclude)" >&2; exit 2; }
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $specs
  ls -l .whl
  tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  whl_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  total=$((tree_bytes + whl_bytes))
  echo "travels: tree $((tree_bytes / 1048576)) MiB + .whl $((whl_bytes / 1048576)) MiB = $((total / 1048576)) MiB (limit 64 MiB)"
  [ "$total" -lt $((64 * 1048576)) ] || { echo "OVER the 64 MiB limit: see docs/gpu-runbook.md" >&2; exit 1; }
  exit 0
fi

SIZE=${SIZE:-full}
case $SIZE in full) budget_default=560 ;; tiny) budget_default=300 ;; *) echo "SIZE must be full or tiny" >&2; exit 2 ;; esac
BUDGET_S=${BUDGET_S:-$budget_default}
PARTS=${PARTS:-tests train grid8b speed maxctx grid7b quantspeed}
MAXCTX_STACKS=${MAXCTX_STACKS:-qlora-long}
# the search: by default one probe at the long-context recipe's planned 131,072 tokens
MAXCTX_START=${MAXCTX_START:-131072}
MAXCTX_MAX=${MAXCTX_MAX:-131072}
MAXCTX_RES=${MAXCTX_RES:-16384}
OUT=${OUT:-bench/results/_scratch/gpu-session-$SIZE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/qlora-gpu-work-XXXX)}
mkdir -p "$WORK/results"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
py=$PYTHON
RESERVE_S=15  # kept back at the end for the last report
SESSION=$OUT/gpu-session.json
rm -f "$SESSION" "$OUT/gpu-session.md"

main() {
  echo "== gpu session: SIZE=$SIZE BUDGET_S=$BUDGET_S PARTS='$PARTS' OUT=$OUT WORK=$WORK python=$py ($(date -u +%FT%TZ))"

  # -- setup: carried wheels, then our own tree on the path (no install: nothing can be fetched there) --
  site=$WORK/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    if [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.12 ]; then
      if timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
           --target "$site" .whl/*.whl; then
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed $(ls .whl/*.whl | wc -l) carried wheels into $site"
      else
        echo "CARRIED WHEELS DID NOT INSTALL (rc $?): going on with what the image has"
      fi
    else
      # the CPU dry run: the wheels are for the device's Python 3.12; check they install there, use none here
      timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site-check" --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 .whl/*.whl \
        && echo "carried wheels install for Python 3.12 ($(ls .whl/*.whl | wc -l) wheels); not used by this $("$py" -V)" \
        || echo "CARRIED WHEELS DO NOT INSTALL for Python 3.12 (rc $?)"
    fi
  else
    echo "no .whl/ wheels carried: bitsandbytes, datasets and pydantic must already be importable"
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    HF_HOME=$WORK/hf QLORA_CACHE=$WORK/qlora-cache MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_VERBOSITY=error

  timeout -k 5 120 "$py" bench/gpu_session.py env --size "$SIZE" --session "$SESSION" --needs "$WORK/needs.sh" \
    || echo "ENVIRONMENT PROBE FAILED (rc $?): every part will be tried anyway"
  [ -f "$WORK/needs.sh" ] && . "$WORK/needs.sh"
  nvidia-smi 2>/dev/null | head -20 || true

  # paged optimizers (bitsandbytes) use CUDA managed memory, which can hang a GPU that does not support it:
  # one tiny step first, under a timeout; if it fails, the parts use the unpaged bitsandbytes optimizers
  no_paged=0
  if [ "${HAVE_BNB:-0}" = 1 ]; then
    timeout -k 5 90 "$py" bench/gpu_session.py paged --session "$SESSION" || { no_paged=1; echo "PAGED OPTIMIZER CHECK FAILED: parts fall back to unpaged optimizers"; }
  fi
  opt_flags=(); recipe_opt=()
  if [ $no_paged = 1 ]; then opt_flags=(--optimizer adamw_8bit); recipe_opt=(optimizer.name=adamw_8bit); fi
  if [ "${HAVE_BNB:-0}" != 1 ]; then recipe_opt=(optimizer.name=adamw); fi

  # the 16 GB random-weight 8B checkpoint, written once by the speed part and reused by max-context:
  # in RAM (/dev/shm) when it has room, else on disk
  ckpt=$WORK/ckpt-8b
  shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2{print $4}')
  if [ "$SIZE" = full ] && [ "${shm_free:-0}" -gt $((20 * 1024 * 1024)) ]; then ckpt=/dev/shm/qlora-ckpt-8b; fi
  [ "$SIZE" = tiny ] && ckpt=$WORK/ckpt-tiny

  # result JSONs reach $OUT after every part; this also copies them every 20 s, so a command killed
  # from outside (a hung GPU) still returns what the running part had written
  ( while sleep 20; do cp -f "$WORK"/results/*.json "$OUT"/; done ) >/dev/null 2>&1 &
  sync_pid=$!

  for p in $PARTS; do
    run_part "$p"
  done

  kill "$sync_pid" 2>/dev/null
  record session "done" 0 "$(( ${#summary[@]} )) parts: ${summary[*]:-}"
  echo "== gpu session done in ${SECONDS} s of ${BUDGET_S}: ${summary[*]:-}"
  echo "== results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

summary=()
# record PART STATUS SECONDS NOTE [extra args for gpu_session.py part]
record() {
  local name=$1 status=$2 secs=$3 note=$4; shift 4
  timeout -k 5 60 "$py" bench/gpu_session.py part --session "$SESSION" --name "$name" --status "$status" \
    --seconds "$secs" --elapsed "$SECONDS" --note "$note" --results-dir "$WORK/results" --out "$OUT" "$@" \
    || echo "(could not record part $name)"
}

# part NAME: minimum seconds to start it, most seconds to give it; then its body
declare -A MIN MAX
if [ "$SIZE" = full ]; then
  MIN=([tests]=30 [train]=30 [grid8b]=45 [speed]=120 [maxctx]=330 [grid7b]=40 [quantspeed]=100)
  MAX=([tests]=100 [train]=100 [grid8b]=180 [speed]=210 [maxctx]=480 [grid7b]=150 [quantspeed]=180)
else
  MIN=([tests]=20 [train]=20 [grid8b]=30 [speed]=20 [maxctx]=20 [grid7b]=30 [quantspeed]=30)
  MAX=([tests]=90 [train]=120 [grid8b]=60 [speed]=90 [maxctx]=120 [grid7b]=60 [quantspeed]=90)
fi

run_part() {
  local name=$1 left limit skip_var rc t0 note="" extra=()
  if [ -z "${MIN[$name]:-}" ]; then echo "== unknown part '$name' (valid: ${!MIN[*]})"; return; fi
  left=$((BUDGET_S - RESERVE_S - SECONDS))
  skip_var=SKIP_$name
  if [ -n "${!skip_var:-}" ]; then
    echo "== part $name: SKIPPED: ${!skip_var}"
    summary+=("$name:skipped"); record "$name" skipped 0 "${!skip_var}"; return
  fi
  if [ "$left" -lt "${MIN[$name]}" ]; then
    echo "== part $name: SKIPPED: ${left} s of the budget left, it needs ${MIN[$name]} s to start"
    summary+=("$name:no-time"); record "$name" skipped 0 "budget: ${left} s left, needs ${MIN[$name]} s"; return
  fi
  limit=$(( left < MAX[$name] ? left : MAX[$name] ))
  echo "== [t=${SECONDS}s] part $name: start (limit ${limit} s, ${left} s of the budget left)"
  t0=$SECONDS
  "part_$name" "$limit"
  rc=$?
  local secs=$((SECONDS - t0)) status=ok
  case $rc in 0) ;; 3) status=no-time ;; 124|137) status=timed-out ;; *) status="failed(rc $rc)" ;; esac
  [ -f "$WORK/note" ] && note=$(cat "$WORK/note") && rm -f "$WORK/note"
  [ -f "$WORK/extra" ] && read -r -a extra < "$WORK/extra" && rm -f "$WORK/extra"
  echo "== [t=${SECONDS}s] part $name: $status in ${secs} s"
  summary+=("$name:$status:${secs}s")
  record "$name" "$status" "$secs" "$note" "${extra[@]}"
}

# `timeout` signals the whole process group, so bench/train.py's children stop with it; each bench script
# also gets a budget a little under the limit, so it stops itself and writes its results first
tmo() { local s=$1; shift; timeout -k 15 "$s" "$@"; }
mins() { "$py" -c "import sys; print(round(max(0.1, (float(sys.argv[1]) - float(sys.argv[2])) / 60), 2))" "$1" "$2"; }

part_tests() {
  # every test file that branches on a CUDA GPU (the CUDA-only tests skip on the CPU, with their reason)
  # (all of their tests on the GPU; on the CPU dry run only the CUDA/device ones, which CI runs anyway)
  local files select=()
  files=$(grep -rl "cuda.is_available" tests/ --include='test_*.py' | sort | tr '\n' ' ')
  [ "$SIZE" = tiny ] && select=(-k "cuda or device")
  echo "CUDA-aware test files: $files${select[*]:+ (${select[*]})}"
  tmo "$1" "$py" -m pytest -q -rs -p no:cacheprovider "${select[@]}" $files 2>&1 | tee "$WORK/pytest.log"
  local rc=${PIPESTATUS[0]}
  echo "--pytest-log $WORK/pytest.log" > "$WORK/extra"
  return "$rc"
}

part_train() {
  local dev=cuda size_args=(max_steps=20 eval_steps=10 save_steps=10)
  if [ "$SIZE" = tiny ]; then dev=cpu; size_args=(max_steps=2 eval_steps=2 save_steps=2 seq_len=128 effective_batch_size=4
                                              data.eval_fraction=0.01); fi
  [ ${#recipe_opt[@]} -gt 0 ] && echo "tiny train with ${recipe_opt[*]} (paged optimizer unavailable)"
  tmo "$1" "$py" -m qlora.cli train recipes/tiny-cpu.yaml device=$dev "${size_args[@]}" "${recipe_opt[@]}" \
    output_dir="$WORK/tiny-train" --no-progress
  local rc=$?
  echo "--metrics $WORK/tiny-train/metrics.jsonl" > "$WORK/extra"
  return $rc
}

part_grid8b() { grid_stage 8b "$1"; }
part_grid7b() { grid_stage 7b "$1"; }
grid_stage() {
  local flags=()
  [ $no_paged = 1 ] && flags=(--no-paged)
  tmo "$2" "$py" bench/gpu_session.py grid --stage "$1" --size "$SIZE" --results-dir "$WORK/results" \
    --budget-s $(( $2 - 10 )) "${flags[@]}"
}

part_speed() {
  local args=(--mode cuda --stacks qlora,hf --batch 1 --batch 4 --steps 6)
  [ "$SIZE" = tiny ] && args=(--tiny --stacks qlora,hf --steps 3)
  tmo "$1" "$py" bench/train.py "${args[@]}" "${opt_flags[@]}" --checkpoint-dir "$ckpt" \
    --budget-min "$(mins "$1" 15)" --results-dir "$WORK/results"
}

part_maxctx() {
  # by default qlora-long alone: the levers of recipes/llama-3.1-8b-128k-24gb.yaml (offload + tiled MLP and norms),
  # whose planned 131,072 tokens at 24 GB (the model's positions) is the claim to check: one probe there, then a
  # fresh-process confirmation, under the 24 GiB per-process cap train_stacks sets
  local args=(--mode max-context --stacks "$MAXCTX_STACKS" --cap-gib 24 --start-seq "$MAXCTX_START"
              --max-seq "$MAXCTX_MAX" --resolution "$MAXCTX_RES" --steps 2)
  [ "$SIZE" = tiny ] && args=(--tiny --mode max-context --stacks "$MAXCTX_STACKS" --cap-gib 0.01 --start-seq 1024 \
                              --resolution 1024 --steps 2)
  tmo "$1" "$py" bench/train.py "${args[@]}" "${opt_flags[@]}" --checkpoint-dir "$ckpt" \
    --budget-min "$(mins "$1" 15)" --results-dir "$WORK/results"
}

part_quantspeed() {
  # quant_speed.py writes into its own folder's results/ (no --results-dir): run a copy in WORK
  local copy=$WORK/bench-copy args=()
  rm -rf "$copy" && mkdir -p "$copy" && cp bench/*.py "$copy"/
  [ "$SIZE" = tiny ] && args=(--quick --reps 1 --mem-runs 1)
  tmo "$1" "$py" "$copy/quant_speed.py" "${args[@]}"
  local rc=$?
  cp -f "$copy"/results/*.json "$copy"/results/*.md "$WORK/results/" 2>/dev/null
  return $rc
}

main 2>&1 | tee -a "$OUT/gpu-session.log"
