#!/usr/bin/env bash
# paracomm on the GPU machine in one device call of at most 9 minutes (one H200, 16 cores, Python 3.12, torch
# 2.11+cu130, nvcc 13.0, the nvidia-nccl wheel, no internet: nothing is installed, the build uses what is there).
#
#   bash bench/gpu_check.sh                       every step, in priority order, inside the time budget
#   bash bench/gpu_check.sh --only STEP,STEP      just those (a second call: the list the first one printed)
#   bash bench/gpu_check.sh --list                the steps
#   options: --budget SECONDS (default 510: the whole script, packing included), PYTHON=... (default python3)
#
# Steps, in priority order (the build comes first whenever any step needs it):
#   env              GPU, driver, torch, NCCL
#   build            setup.py build_ext --inplace for sm_90 (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=cores), with the
#                    ptxas report: ptxas_summary.txt, failing on any spill or stack frame; build_info()
#   test-kernels     tests/test_cuda_kernels.py: the CUDA kernels against their CPU twins
#   test-nccl        tests/test_allreduce_cuda.py (+ tests/test_nccl_executor.py when it exists): the NCCL
#                    all-reduce at 2 ranks on the GPU, bitwise against torch.distributed
#   bench-kernels    python -m paracomm.bench kernels (with the device-to-device copy ceiling)
#   bench-ar2        python -m paracomm.bench allreduce, 2 ranks on the GPU, every algorithm, fp32, against NCCL
#   bench-ar2-bf16   the same with --wire-dtype bf16
#   bench-ar4        4 ranks on the GPU, fp32
#   bench-ar4-bf16   4 ranks, --wire-dtype bf16
#   test-rest        the remaining cuda-marked tests
#
# Each step runs under `timeout` (its own limit, cut to what is left of the budget); a failing step does not
# stop the next ones (a failed build does: nothing else can run). A step that no longer fits is not started.
# At the end: a table of every step (ok / FAILED / skipped / not run) and the --only line for what did not run.
# Without a GPU (a dry run) the build still runs when torch has CUDA and nvcc is found, and every step that
# needs the GPU prints why it skips.
#
# Results: everything in .tmp/gpu_check/ (kept in the work tree while the machine stays warm); copied to $OUT
# (at most 8 files, the device tool's limit): summary.txt, gpu_check.json (every step's status, time, and the
# build_info), ptxas_summary.txt, kernels.json, allreduce.json (the four all-reduce runs, by step name),
# logs.tgz (every log, junit XML and JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

ALL_STEPS=(env build test-kernels test-nccl bench-kernels bench-ar2 bench-ar2-bf16 bench-ar4 bench-ar4-bf16 test-rest)
declare -A LIMIT=([env]=30 [build]=300 [test-kernels]=150 [test-nccl]=150 [bench-kernels]=100 [bench-ar2]=80
                  [bench-ar2-bf16]=60 [bench-ar4]=90 [bench-ar4-bf16]=70 [test-rest]=240)
MIN_START=25   # seconds: a step is not started with less than this left
RESERVE=15     # seconds kept for the summary, the tarball and the copy to $OUT

BUDGET=510
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    --list) printf '%s\n' "${ALL_STEPS[@]}"; exit 0 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
STEPS=("${ALL_STEPS[@]}")
if [ -n "$ONLY" ]; then
  IFS=',' read -r -a WANT <<<"$ONLY"
  for s in "${WANT[@]}"; do
    [ -n "${LIMIT[$s]:-}" ] || { echo "unknown step: $s (steps: ${ALL_STEPS[*]})" >&2; exit 2; }
  done
  # Every step but env needs the build: on a fresh machine a full one, on a warm one (same tree) a no-op.
  for w in "${WANT[@]}"; do [ "$w" != env ] && WANT+=(build) && break; done
  STEPS=()
  for s in "${ALL_STEPS[@]}"; do  # priority order, whatever order --only gave
    [[ " ${WANT[*]} " == *" $s "* ]] && STEPS+=("$s")
  done
fi

LOGS=$ROOT/.tmp/gpu_check
rm -rf "$LOGS"
mkdir -p "$LOGS" "$ROOT/.tmp"
PY=${PYTHON:-python3}
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
export TMPDIR="$ROOT/.tmp" TORCHINDUCTOR_CACHE_DIR="$ROOT/.tmp/inductor"
export TORCH_CUDA_ARCH_LIST=9.0 PARACOMM_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
export PYTHONUNBUFFERED=1
STATUS=$LOGS/steps.tsv
: >"$STATUS"

# One interpreter start (importing torch takes seconds): GPU present, torch's version and CUDA, pytest-timeout.
read -r HAVE_GPU TORCH_VERSION TORCH_CUDA HAVE_PT_TIMEOUT < <("$PY" -c "
import importlib.util, torch
print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda or '-',
      int(importlib.util.find_spec('pytest_timeout') is not None))" 2>/dev/null || echo "0 none - 0")
[ "$TORCH_CUDA" = "-" ] && TORCH_CUDA=""
BUILD_OK=0
PYTEST_TIMEOUT=()
[ "$HAVE_PT_TIMEOUT" = 1 ] && PYTEST_TIMEOUT=(-p pytest_timeout --timeout=120)  # one hung test cannot eat the step

elapsed() { echo $(($(date +%s) - T0)); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STATUS"; }  # step status seconds note

# run_step NAME CMD...: CMD under timeout (the step's limit, cut to the budget left), output to NAME.log.
run_step() {
  local name=$1
  shift
  local left=$((BUDGET - $(elapsed) - RESERVE))
  local limit=${LIMIT[$name]}
  if [ "$left" -lt "$MIN_START" ]; then
    echo "== $name: not run (${left}s of the budget left)"
    record "$name" "not-run" 0 "no time left"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s, at $(elapsed)s): $*"
  local start rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - start))
  if [ "$rc" -eq 0 ]; then
    echo "   ok (${secs}s)"
    record "$name" ok "$secs" ""
  else
    local why="rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s"
    echo "   FAILED: $why (${secs}s); last lines of $name.log:"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/   | /'
    record "$name" FAILED "$secs" "$why"
  fi
  return "$rc"
}

skip() {  # skip NAME WHY
  echo "== $1: skipped: $2"
  record "$1" skipped 0 "$2"
}

step_env() {
  date -u
  nvidia-smi || echo "(no nvidia-smi)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  command -v nvcc && nvcc --version | tail -2
  echo "cores: $(nproc)"
  "$PY" - <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    import nvidia.nccl as n
    info["nccl_wheel"] = list(n.__path__)[0]
except ImportError:
    info["nccl_wheel"] = None
print(json.dumps(info, indent=1))
EOF
}

step_build() {
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import json, paracomm; i = paracomm.build_info(); print(json.dumps(i)); assert i['cuda'], 'not a CUDA build'" \
    | tee "$LOGS/build_info.json"
}

# bench_ar NAME RANKS [EXTRA...]: the all-reduce benchmark, K ranks on the one GPU, beside NCCL's all-reduce.
ALGO_FLAG=()
ALGO_CHECKED=0
bench_ar() {
  local name=$1 ranks=$2
  shift 2
  if [ "$ALGO_CHECKED" = 0 ]; then  # --algorithm (every plan generator) is newer than the benchmark: use it if there
    ALGO_CHECKED=1
    if "$PY" -m paracomm.bench allreduce --help 2>/dev/null | grep -q -- "--algorithm"; then
      ALGO_FLAG=(--algorithm all)
    else
      echo "   (paracomm.bench allreduce has no --algorithm: the all-reduce steps run its default algorithm)"
    fi
  fi
  run_step "$name" "$PY" -m paracomm.bench allreduce --device cuda --ranks-per-gpu "$ranks" "${ALGO_FLAG[@]}" \
    -b 1K -e 128M -f 4 -n 10 -w 3 --timeout 60 --json "$LOGS/$name.json" "$@"
}

echo "paracomm gpu_check: steps ${STEPS[*]}; budget ${BUDGET}s; GPU: $([ $HAVE_GPU = 1 ] && echo yes || echo NO)"
for s in "${STEPS[@]}"; do
  case "$s" in
    env)
      export -f step_env
      export PY
      run_step env bash -c step_env
      ;;
    build)
      if [ -z "$TORCH_CUDA" ]; then
        skip build "torch ($TORCH_VERSION) has no CUDA: no CUDA build here"
      elif ! command -v nvcc >/dev/null; then
        skip build "no nvcc on PATH or in /usr/local/cuda/bin"
      else
        export -f step_build
        export PY LOGS
        if run_step build bash -c step_build; then
          BUILD_OK=1
        fi
        # The report comes from the build that compiled the kernels: on a warm machine a second call's build is a
        # no-op, so the last report is kept beside the logs (.tmp/ptxas_summary.txt) and reused.
        if grep -q "ptxas info" "$LOGS/build.log"; then
          if "$PY" .ci/ptxas_check.py "$LOGS/build.log" --summary "$LOGS/ptxas_summary.txt" >/dev/null; then
            tail -n 1 "$LOGS/ptxas_summary.txt" | sed 's/^/   /'
          else
            echo "   ptxas check FAILED:"; grep -E "SPILL" "$LOGS/ptxas_summary.txt" | sed 's/^/   | /'
            tail -n 1 "$LOGS/ptxas_summary.txt" | sed 's/^/   /'
            record ptxas FAILED 0 "spills or a stack frame (ptxas_summary.txt)"
          fi
          cp "$LOGS/ptxas_summary.txt" "$ROOT/.tmp/ptxas_summary.txt"
        elif [ -f "$ROOT/.tmp/ptxas_summary.txt" ]; then
          cp "$ROOT/.tmp/ptxas_summary.txt" "$LOGS/ptxas_summary.txt"
          echo "   no kernel recompiled; the ptxas report of the build that compiled them: $(tail -n 1 "$LOGS/ptxas_summary.txt")"
        else
          echo "   no kernel recompiled and no earlier ptxas report here: delete build/ for a full build to get one"
          record ptxas skipped 0 "no kernel recompiled, no earlier report"
        fi
      fi
      ;;
    *)
      if [ "$HAVE_GPU" != 1 ]; then
        skip "$s" "no CUDA GPU (torch.cuda.is_available() is False)"
        continue
      fi
      if [ "$BUILD_OK" != 1 ]; then
        skip "$s" "no CUDA build (the build step failed or did not run)"
        continue
      fi
      case "$s" in
        test-kernels)
          run_step test-kernels "$PY" -m pytest -q -rs "${PYTEST_TIMEOUT[@]}" tests/test_cuda_kernels.py \
            --junitxml="$LOGS/test-kernels.xml"
          ;;
        test-nccl)
          files=(tests/test_allreduce_cuda.py)
          [ -f tests/test_nccl_executor.py ] && files+=(tests/test_nccl_executor.py)
          run_step test-nccl "$PY" -m pytest -q -rs "${PYTEST_TIMEOUT[@]}" "${files[@]}" --junitxml="$LOGS/test-nccl.xml"
          ;;
        bench-kernels) run_step bench-kernels "$PY" -m paracomm.bench kernels --device cuda --json "$LOGS/kernels.json" ;;
        bench-ar2) bench_ar bench-ar2 2 ;;
        bench-ar2-bf16) bench_ar bench-ar2-bf16 2 --wire-dtype bf16 ;;
        bench-ar4) bench_ar bench-ar4 4 ;;
        bench-ar4-bf16) bench_ar bench-ar4-bf16 4 --wire-dtype bf16 ;;
        test-rest)
          run_step test-rest "$PY" -m pytest -q -rs -m cuda "${PYTEST_TIMEOUT[@]}" --ignore=tests/test_cuda_kernels.py \
            --ignore=tests/test_allreduce_cuda.py --ignore=tests/test_nccl_executor.py --junitxml="$LOGS/test-rest.xml"
          ;;
      esac
      ;;
  esac
done

# ---- summary: table, what did not run, files for $OUT ---------------------------------------------------------
"$PY" - "$STATUS" "$LOGS" "$(elapsed)" "$BUDGET" >"$LOGS/summary.txt" <<'EOF'
import glob, json, os, sys
status, logs, elapsed, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = []
for line in open(status):
    name, state, secs, note = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": state, "seconds": int(secs), "note": note})
info = None
if os.path.exists(os.path.join(logs, "build_info.json")):
    try:
        info = json.loads(open(os.path.join(logs, "build_info.json")).read().strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
summary = {"steps": steps, "elapsed_s": elapsed, "budget_s": budget, "build_info": info,
           "ok": all(s["status"] in ("ok", "skipped") for s in steps)}
json.dump(summary, open(os.path.join(logs, "gpu_check.json"), "w"), indent=1)
ar = {}
for f in sorted(glob.glob(os.path.join(logs, "bench-ar*.json"))):
    try:
        ar[os.path.basename(f)[:-5]] = json.load(open(f))
    except ValueError:
        ar[os.path.basename(f)[:-5]] = {"error": "unreadable JSON"}
if ar:
    json.dump(ar, open(os.path.join(logs, "allreduce.json"), "w"))
print(f"{'step':16} {'status':9} {'s':>5}  note")
for s in steps:
    print(f"{s['step']:16} {s['status']:9} {s['seconds']:5}  {s['note']}")
print(f"elapsed {elapsed}s of a {budget}s budget")
skipped = [s["step"] for s in steps if s["status"] == "skipped"]
rerun = [s["step"] for s in steps if s["status"] in ("not-run", "FAILED") and s["step"] != "ptxas"]
if skipped:
    print("skipped (the notes say why): " + ",".join(skipped))
if rerun:
    print("did not run or failed: " + ",".join(rerun))
    print("next call: bash bench/gpu_check.sh --only " + ",".join(rerun))
elif not skipped:
    print("every step ran and passed")
EOF
cat "$LOGS/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
  for f in summary.txt gpu_check.json ptxas_summary.txt kernels.json allreduce.json; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/"
  done
fi
grep -qv -P "\t(ok|skipped)\t" "$STATUS" && exit 1
exit 0
