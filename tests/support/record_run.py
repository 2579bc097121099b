#!/usr/bin/env python3
"""An executor for tests: appends its argv and ROLLBACKD_* environment to a log file as
one JSON line, then exits 0 (or 1 with ``--fail``, or never with ``--hang``)."""

import json
import os
import sys
import time

log, *rest = sys.argv[1:]
with open(log, "a", encoding="utf-8") as handle:
    env = {k: v for k, v in os.environ.items() if k.startswith("ROLLBACKD_")}
    handle.write(json.dumps({"argv": rest, "env": env, "pid": os.getpid()}) + "\n")
if "--fail" in rest:
    print("deploy failed: registry unreachable", file=sys.stderr)
    sys.exit(1)
if "--hang" in rest:
    while True:
        time.sleep(3600)
