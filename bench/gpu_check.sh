#!/usr/bin/env bash
# paracomm on the GPU machine: one device call of at most 8 minutes for what matters most, then a second call
# (--only) for the slow fault tests and the rest. On the machine: one H200, 16 cores, torch with CUDA, nvcc, the
# nvidia-nccl wheel, no internet: nothing is installed, the build uses what is there.
#
#   bash bench/gpu_check.sh                       the first call's steps, in priority order, in their time boxes
#   bash bench/gpu_check.sh --plan                print the steps with their time boxes and the totals; run nothing
#   bash bench/gpu_check.sh --only STEP,STEP      just those (e.g. the second call the plan prints)
#   bash bench/gpu_check.sh --list                every step's name
#   options: --budget SECONDS (default 480: the whole call, packing included), --no-build (skip the build; every
#            step that needs it then skips too), PYTHON=... (default python3)
#
# First call, in priority order (boxes in --plan; the build comes first whenever any step needs it):
#   env              GPU, driver, torch, NCCL
#   build            setup.py build_ext --inplace for sm_90 (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=cores), with the
#                    ptxas report: ptxas_summary.txt, failing on any spill or stack frame; build_info()
#   test-kernels     tests/test_cuda_kernels.py: the CUDA kernels against their CPU twins (odd sizes, offsets)
#   test-nccl        tests/test_allreduce_cuda.py + tests/test_nccl_executor.py, -m "not slow": NCCL correctness
#                    at 1-2 ranks, stream semantics (async leaves the stream free), destruction, capture
#   overlap          python -m paracomm.bench overlap: a matmul chain alone / beside paracomm.all_reduce(64 MiB,
#                    async) / beside dist.all_reduce(async): the overlap ratio of each
#   ddp              python -m paracomm.bench ddp at 2 ranks: torch's allreduce hook, paracomm's, ring_hook + bf16
#   hosttime         python -m paracomm.bench hosttime: host us per call and last_enqueue_us at 4 KiB and 64 MiB
#   bench-ar2        python -m paracomm.bench allreduce, 2 ranks, --algorithm all, fp32, against NCCL
# Second call (--only, as --plan prints it):
#   test-slow        the slow cuda fault tests (killed / stalled / absent peers, destruction at the deadline,
#                    4 ranks), every_algorithm excepted
#   bench-kernels    python -m paracomm.bench kernels (with the device-to-device copy ceiling)
# Third call:
#   test-algos       test_every_algorithm_matches_cpu_executor_and_reference (1-4 ranks)
#   bench-ar2-bf16   the all-reduce benchmark with --wire-dtype bf16
#   bench-ar4        4 ranks on the GPU, fp32
#   test-rest        the remaining cuda-marked tests
#
# Each step runs under `timeout` (its box, cut to what is left of the budget); a failing step does not stop the
# next ones (a failed build does: nothing else can run). A step that no longer fits is not started. NCCL_DEBUG=WARN.
# At the end: a table of every step (ok / FAILED / skipped / not run) and the --only line for what did not run.
# Without a GPU (a dry run) the build still runs when torch has CUDA and nvcc is found, and every step that needs
# the GPU prints why it skips.
#
# Results: everything in .tmp/gpu_check/ (kept in the work tree while the machine stays warm); copied to $OUT
# (at most 8 files, the device tool's limit): summary.txt, gpu_check.json (every step's status, time, and the
# build_info), ptxas_summary.txt, kernels.json, allreduce.json (the all-reduce runs, by step name),
# probes.json (overlap, ddp, hosttime), logs.tgz (every log, junit XML and JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

FIRST_STEPS=(env build test-kernels test-nccl overlap ddp hosttime bench-ar2)
SECOND_STEPS=(test-slow bench-kernels)
THIRD_STEPS=(test-algos bench-ar2-bf16 bench-ar4 test-rest)
ALL_STEPS=("${FIRST_STEPS[@]}" "${SECOND_STEPS[@]}" "${THIRD_STEPS[@]}")
# Time boxes (seconds). Each call's boxes plus RESERVE fit the default budget (8 minutes), a cold build included.
declare -A LIMIT=([env]=15 [build]=160 [test-kernels]=45 [test-nccl]=95 [overlap]=40 [ddp]=45 [hosttime]=25
                  [bench-ar2]=45 [test-slow]=250 [bench-kernels]=40 [test-algos]=200 [bench-ar2-bf16]=30
                  [bench-ar4]=40 [test-rest]=30)
declare -A WHAT=([env]="GPU, driver, torch, NCCL" [build]="sm_90 build + ptxas check"
                 [test-kernels]="CUDA kernels vs CPU twins" [test-nccl]="NCCL correctness, not slow"
                 [overlap]="overlap probe, 64 MiB async" [ddp]="DDP step, 3 hooks, 2 ranks"
                 [hosttime]="host us per call, 4 KiB / 64 MiB" [bench-ar2]="all-reduce bench, --algorithm all"
                 [test-slow]="slow fault tests" [bench-kernels]="kernel bench"
                 [test-algos]="every algorithm x dtype, 1-4 ranks" [bench-ar2-bf16]="all-reduce, bf16 wire"
                 [bench-ar4]="all-reduce, 4 ranks" [test-rest]="other cuda tests")
MIN_START=10   # seconds: a step is not started with less than this left
RESERVE=10     # seconds kept for the summary, the tarball and the copy to $OUT

BUDGET=480
ONLY=""
PLAN=0
NO_BUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#--budget=}; shift ;;
    --plan) PLAN=1; shift ;;
    --no-build) NO_BUILD=1; shift ;;
    --list) printf '%s\n' "${ALL_STEPS[@]}"; exit 0 ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
STEPS=("${FIRST_STEPS[@]}")
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

# --plan: the steps of this call and of the second one, each with its box, and the totals (RESERVE included).
print_plan() {  # print_plan TITLE STEP...
  local title=$1 total=$RESERVE
  shift
  echo "$title"
  for s in "$@"; do
    printf '  %-16s %4d s  %s\n' "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
    total=$((total + LIMIT[$s]))
  done
  printf '  %-16s %4d s  %s\n' "(reserve)" "$RESERVE" "summary, tarball, copy to \$OUT"
  printf '  %-16s %4d s  (%d min %02d s; budget %d s)\n' "total" "$total" $((total / 60)) $((total % 60)) "$BUDGET"
}
if [ "$PLAN" = 1 ]; then
  if [ -n "$ONLY" ]; then
    print_plan "plan: bash bench/gpu_check.sh --only $ONLY" "${STEPS[@]}"
  else
    print_plan "plan: first call: bash bench/gpu_check.sh" "${FIRST_STEPS[@]}"
    second=$(IFS=','; echo "${SECOND_STEPS[*]}")
    print_plan "plan: second call: bash bench/gpu_check.sh --only $second" build "${SECOND_STEPS[@]}"
    third=$(IFS=','; echo "${THIRD_STEPS[*]}")
    print_plan "plan: third call: bash bench/gpu_check.sh --only $third" build "${THIRD_STEPS[@]}"
  fi
  exit 0
fi

LOGS=$ROOT/.tmp/gpu_check
rm -rf "$LOGS"
mkdir -p "$LOGS" "$ROOT/.tmp"
PY=${PYTHON:-python3}
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
export TMPDIR="$ROOT/.tmp" TORCHINDUCTOR_CACHE_DIR="$ROOT/.tmp/inductor"
export TORCH_CUDA_ARCH_LIST=9.0 PARACOMM_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
export PYTHONUNBUFFERED=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
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
SLOW_TIMEOUT=()
[ "$HAVE_PT_TIMEOUT" = 1 ] && PYTEST_TIMEOUT=(-p pytest_timeout --timeout=90)  # one hung test cannot eat the step
[ "$HAVE_PT_TIMEOUT" = 1 ] && SLOW_TIMEOUT=(-p pytest_timeout --timeout=200)

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
    -b 4K -e 64M -f 16 -n 5 -w 2 --timeout 60 --json "$LOGS/$name.json" "$@"
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
      if [ "$NO_BUILD" = 1 ]; then
        skip build "--no-build"
      elif [ -z "$TORCH_CUDA" ]; then
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
          run_step test-nccl "$PY" -m pytest -q -rs -m "cuda and not slow" "${PYTEST_TIMEOUT[@]}" \
            tests/test_allreduce_cuda.py tests/test_nccl_executor.py tests/test_collectives_cuda.py \
            --junitxml="$LOGS/test-nccl.xml"
          ;;
        overlap)
          run_step overlap "$PY" -m paracomm.bench overlap --device cuda --ranks-per-gpu 2 --size 64M -n 5 -w 2 \
            --timeout 60 --json "$LOGS/overlap.json"
          ;;
        ddp)
          run_step ddp "$PY" -m paracomm.bench ddp --device cuda --ranks-per-gpu 2 -n 5 -w 2 --timeout 60 \
            --variants torch-allreduce,paracomm-allreduce,ring-bf16+scaler --json "$LOGS/ddp.json"
          ;;
        hosttime)
          run_step hosttime "$PY" -m paracomm.bench hosttime --device cuda --ranks-per-gpu 2 --sizes 4K,64M -n 30 \
            -w 5 --timeout 60 --json "$LOGS/hosttime.json"
          ;;
        bench-ar2) bench_ar bench-ar2 2 ;;
        test-slow)
          run_step test-slow "$PY" -m pytest -q -rs -m "cuda and slow" -k "not every_algorithm" "${SLOW_TIMEOUT[@]}" \
            tests/test_allreduce_cuda.py tests/test_nccl_executor.py tests/test_collectives_cuda.py \
            --junitxml="$LOGS/test-slow.xml"
          ;;
        test-algos)
          run_step test-algos "$PY" -m pytest -q -rs -m "cuda and slow" -k every_algorithm "${SLOW_TIMEOUT[@]}" \
            tests/test_nccl_executor.py --junitxml="$LOGS/test-algos.xml"
          ;;
        bench-kernels) run_step bench-kernels "$PY" -m paracomm.bench kernels --device cuda --json "$LOGS/kernels.json" ;;
        bench-ar2-bf16) bench_ar bench-ar2-bf16 2 --wire-dtype bf16 ;;
        bench-ar4) bench_ar bench-ar4 4 ;;
        test-rest)
          run_step test-rest "$PY" -m pytest -q -rs -m cuda "${PYTEST_TIMEOUT[@]}" --ignore=tests/test_cuda_kernels.py \
            --ignore=tests/test_allreduce_cuda.py --ignore=tests/test_nccl_executor.py \
            --ignore=tests/test_collectives_cuda.py --junitxml="$LOGS/test-rest.xml"
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
probes = {}
for name in ("overlap", "ddp", "hosttime"):
    f = os.path.join(logs, name + ".json")
    if os.path.exists(f):
        try:
            probes[name] = json.load(open(f))
        except ValueError:
            probes[name] = {"error": "unreadable JSON"}
if probes:
    json.dump(probes, open(os.path.join(logs, "probes.json"), "w"))
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
  for f in summary.txt gpu_check.json ptxas_summary.txt kernels.json allreduce.json probes.json; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/"
  done
fi
grep -qv -P "\t(ok|skipped)\t" "$STATUS" && exit 1
exit 0
