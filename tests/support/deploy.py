#!/usr/bin/env python3
"""A deploy command for tests: switches a fake service (support/fake_service.py) to a
version through its /control endpoint, as a real deploy script would switch the real one.

    deploy.py CONTROL_URL VERSION [--error-ratio R] [--latency-seconds S] [--log FILE]
              [--hang | --hang-after | --fail]

``--log`` appends one JSON line per run (argv and the ROLLBACKD_* environment), so a test
can count how often the executor ran. ``--hang`` blocks after logging (a stuck deploy);
``--hang-after`` switches, then blocks; ``--fail`` exits 1 without switching.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("control_url")
    parser.add_argument("version")
    parser.add_argument("--error-ratio", type=float, default=0.0)
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--log")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--hang-after", action="store_true", help="switch, then hang")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    if args.log:
        entry = {
            "argv": sys.argv[1:],
            "env": {k: v for k, v in os.environ.items() if k.startswith("ROLLBACKD_")},
            "pid": os.getpid(),
        }
        with open(args.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    if args.hang:
        while True:
            time.sleep(3600)
    if args.fail:
        print("deploy failed: registry unreachable", file=sys.stderr)
        return 1
    settings = {"version": args.version, "error_ratio": args.error_ratio}
    if args.latency_seconds is not None:
        settings["latency_seconds"] = args.latency_seconds
    body = json.dumps(settings).encode()
    request = urllib.request.Request(
        args.control_url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        print(f"deployed {args.version}: HTTP {response.status}", flush=True)
    while args.hang_after:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
