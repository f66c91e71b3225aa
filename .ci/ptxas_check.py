#!/usr/bin/env python3
"""Reads a build log made with ptxas -v (PARACOMM_PTXAS_VERBOSE=1, or CMake's -DPARACOMM_PTXAS_VERBOSE=ON) and
fails when any kernel spills registers or has a stack frame (local memory: slow, and never needed by paracomm's
kernels), or when the log holds no ptxas report at all (the flag did not reach nvcc, or nothing was compiled).

    python3 .ci/ptxas_check.py BUILD_LOG [--summary FILE]

Prints one line per kernel and architecture (registers, stack, spills, shared memory, parameter bytes), then a
summary line; exit status 1 on any spill or stack frame, 2 when no kernel was found.
"""
import argparse
import re
import sys


def parse(text):
    """One dict per (kernel, arch) in the order ptxas reported them: name, arch, regs, stack, spill_st, spill_ld,
    smem, cmem (the kernel-parameter constant bank, bytes)."""
    kernels, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0,
                       "smem": 0, "cmem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            if s:
                current["smem"] = int(s.group(1))
            c = re.search(r"(\d+) bytes cmem\[0\]", line)
            if c:
                current["cmem"] = int(c.group(1))
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--summary", help="also write the report to this file")
    args = ap.parse_args()
    kernels = parse(open(args.log, errors="replace").read())
    lines = []
    bad = [k for k in kernels if k["stack"] or k["spill_st"] or k["spill_ld"]]
    for k in kernels:
        flag = "  <-- SPILL/STACK" if k in bad else ""
        lines.append(f"{k['arch']:7} regs={k['regs']:3} stack={k['stack']} spill_st={k['spill_st']} "
                     f"spill_ld={k['spill_ld']} smem={k['smem']} param_cmem={k['cmem']}  {k['name']}{flag}")
    if kernels:
        # Recent ptxas (CUDA 13) no longer prints cmem[0], the kernel-parameter bank: say so rather than print 0.
        cmem = max(k["cmem"] for k in kernels)
        params = f"kernel parameters <= {cmem} bytes" if cmem else "kernel parameter bytes not reported by this ptxas"
        total = (f"ptxas: {len(kernels)} kernels (x arch: {', '.join(sorted({k['arch'] for k in kernels}))}); "
                 f"{len(bad)} with spills or a stack frame; registers <= {max(k['regs'] for k in kernels)}; "
                 f"shared memory <= {max(k['smem'] for k in kernels)} bytes; {params}")
    else:
        total = f"ptxas: no kernel report in {args.log} (was -Xptxas -v passed?)"
    lines.append(total)
    # The full table goes to the summary file; the console gets the offenders and the total.
    print("\n".join([line for line in lines[:-1] if "SPILL" in line] + [total]))
    if args.summary:
        with open(args.summary, "w") as f:
            f.write("\n".join(lines) + "\n")
    if not kernels:
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
