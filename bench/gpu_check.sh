#!/usr/bin/env bash
# One pass of paracomm on the GPU machine (no internet: torch+cu130, nvcc 13.0 and the NCCL wheel are there).
#
#   OUT=/some/dir bench/gpu_check.sh [STEP ...]      STEP: env build info test-cuda test-rest kernels allreduce ddp
#                                                    (default: all of them, in that order)
#
# The device tool allows 10 minutes a call, and no step is given more than 540 s, so a lease runs it as a few
# calls: `env build info test-cuda`, then `test-rest`, then `kernels allreduce ddp` (the build stays in the
# work tree only while the machine stays warm: run the calls back to back, or repeat `build` first).
#
# Writes to .tmp/gpu_check (and copies to $OUT: the JSON results, the plot, ptxas_summary.txt and a tarball of
# everything): one <step>.log per step, ptxas.log + ptxas_summary.txt (register / spill / stack report
# of every kernel, from the build), build_info.json, pytest-*.xml, kernels.json, allreduce.json + .png, allreduce_bf16.json, ddp.json, and
# gpu_check.json (every step's exit status and duration). Every step runs under `timeout` and a failing step
# does not stop the next ones; the script exits non-zero if any step failed. Steps can be run in separate
# invocations (the in-place build stays in the work tree), e.g. `build info` first, then `test-cuda`.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Everything is written to LOGS in the work tree (it survives between calls while the machine is warm); at the
# end the results and a tarball of all logs are copied to $LOGS, within the device tool's 8 files.
LOGS=$ROOT/.tmp/gpu_check
DEST=${OUT:-}
mkdir -p "$LOGS" "$ROOT/.tmp"
PY=${PYTHON:-python3}
export PATH="/usr/local/cuda/bin:$PATH"
export TMPDIR="$ROOT/.tmp" TORCHINDUCTOR_CACHE_DIR="$ROOT/.tmp/inductor"
export TORCH_CUDA_ARCH_LIST=9.0 PARACOMM_PTXAS_VERBOSE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # also finds an in-place build if pip install failed
export PYTHONUNBUFFERED=1

STATUS="$LOGS/steps.tsv"
FAILED=0

# run_step NAME SECONDS CMD...: runs CMD under timeout, output to $LOGS/NAME.log, status to steps.tsv.
run_step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start end rc
  start=$(date +%s)
  timeout --kill-after=30 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((end - start))" >>"$STATUS"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    echo "   FAILED rc=$rc ($((end - start)) s); last lines of $name.log:"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/   | /'
  else
    echo "   ok ($((end - start)) s)"
  fi
  return 0
}

step_env() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  nvcc --version || true
  "$PY" - <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    import nvidia.nccl as n
    info["nccl_wheel"] = list(n.__path__)[0]
except ImportError:
    info["nccl_wheel"] = None
print(json.dumps(info, indent=1))
EOF
}

step_build() {
  # The README's install command; -v so the ptxas report reaches the log, --no-deps because there is no
  # index to ask (everything is installed already).
  if ! "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    echo "pip install failed; falling back to an in-place build"
    "$PY" setup.py build_ext --inplace || return 1
  fi
}

summarize_ptxas() {
  grep -E "ptxas info|bytes stack frame" "$LOGS/build.log" >"$LOGS/ptxas.log" || true
  "$PY" - "$LOGS/ptxas.log" >"$LOGS/ptxas_summary.txt" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
kernels, current = [], None
for line in lines:
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
    if m:
        current = {"name": m.group(1), "arch": m.group(2)}
        kernels.append(current)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and current is not None:
        current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m and current is not None:
        current["regs"] = int(m.group(1))
bad = [k for k in kernels if k.get("stack", 0) or k.get("spill_st", 0) or k.get("spill_ld", 0)]
print(f"{len(kernels)} kernels compiled; {len(bad)} with a stack frame or spills")
if kernels:
    print("registers: max", max(k.get("regs", 0) for k in kernels))
for k in bad:
    print(f"  {k['arch']} stack={k.get('stack')} spill_st={k.get('spill_st')} spill_ld={k.get('spill_ld')} {k['name']}")
EOF
  cat "$LOGS/ptxas_summary.txt"
}

step_info() {
  "$PY" -c "import json, paracomm; print(json.dumps(paracomm.build_info()))" | tee "$LOGS/build_info.json"
}

write_summary() {
  "$PY" - "$STATUS" "$LOGS/gpu_check.json" <<'EOF'
import json, sys
steps = []
for line in open(sys.argv[1]):
    name, rc, seconds = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "log": f"{name}.log"})
json.dump({"steps": steps, "ok": all(s["rc"] == 0 for s in steps)}, open(sys.argv[2], "w"), indent=1)
print(json.dumps(steps))
EOF
}

export -f step_env step_build step_info
export PY LOGS

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env build info test-cuda test-rest kernels allreduce ddp)
for s in "${STEPS[@]}"; do
  case "$s" in
    env) run_step env 120 bash -c step_env ;;
    build)
      run_step build 540 bash -c step_build
      summarize_ptxas
      ;;
    info) run_step info 120 bash -c step_info ;;
    # The CUDA-marked tests first (the kernels against their CPU twins), then everything else, which includes
    # the multi-rank tests: both under timeout, a hung rank cannot stall the run.
    test-cuda) run_step test-cuda 540 "$PY" -m pytest -q -rs -m cuda --durations=15 --junitxml="$LOGS/pytest-cuda.xml" ;;
    test-rest) run_step test-rest 540 "$PY" -m pytest -q -rs -m "not cuda" --durations=15 --junitxml="$LOGS/pytest-rest.xml" ;;
    kernels) run_step kernels 420 "$PY" -m paracomm.bench kernels --json "$LOGS/kernels.json" ;;
    allreduce)
      # One GPU: 4 ranks on it over NCCL's socket transport (docs/ARCHITECTURE.md), paracomm's ring beside NCCL's own
      # all-reduce on the same ranks; then the bf16 wire (its algbw against NCCL's fp32 is the issue's target).
      run_step allreduce 540 "$PY" -m paracomm.bench allreduce --ranks-per-gpu 4 -b 1K -e 256M -f 4 \
        --timeout 120 --json "$LOGS/allreduce.json" --plot "$LOGS/allreduce.png"
      run_step allreduce-bf16 300 "$PY" -m paracomm.bench allreduce --ranks-per-gpu 4 -b 1M -e 256M -f 4 \
        --wire-dtype bfloat16 --timeout 120 --json "$LOGS/allreduce_bf16.json"
      ;;
    ddp) run_step ddp 420 "$PY" -m paracomm.bench ddp --ranks-per-gpu 2 --timeout 120 --json "$LOGS/ddp.json" ;;
    *)
      echo "unknown step: $s (env build info test-cuda test-rest kernels allreduce ddp)" >&2
      FAILED=1
      ;;
  esac
done
write_summary
if [ -n "$DEST" ]; then
  mkdir -p "$DEST"
  tar czf "$DEST/gpu_check_logs.tgz" -C "$LOGS" .
  for f in gpu_check.json ptxas_summary.txt kernels.json allreduce.json allreduce.png allreduce_bf16.json ddp.json; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$DEST/"
  done
fi
exit "$FAILED"
