"""A stand-in rank for tests/test_emulate.py (run as ``python -m emulate_probe`` inside an emulated node).

Rank 1 exits with code 3 at once (a failed rank); every other rank sleeps, so only the launcher's teardown can end
it. With EMULATE_PROBE_ALL_SLEEP=1 every rank sleeps (the Ctrl-C test).
"""
import os
import sys
import time

if __name__ == "__main__":
    if os.environ.get("RANK") == "1" and not os.environ.get("EMULATE_PROBE_ALL_SLEEP"):
        sys.exit(3)
    time.sleep(600)
