"""A stand-in stage for tests/test_warm.py: records who runs it, then waits to be stopped.

argv: <record file> [seconds]. Writes {"pid", "ppid", "cwd", "marker"} (marker: WARM_TEST_MARKER from the
environment), then sleeps `seconds` (default 0) and exits 7.
"""
import json
import os
import sys
import time

record = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
          "marker": os.environ.get("WARM_TEST_MARKER"), "argv": sys.argv[1:]}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("sleeper says hello", flush=True)
print("sleeper warns", file=sys.stderr, flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
sys.exit(7)
