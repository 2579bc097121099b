#!/usr/bin/env bash
# The demo: installs what is missing (scripts/setup.sh), then runs the whole story locally:
# a demo service with a good 1.0.0 and a bad 2.0.0, a real Prometheus scraping it, rollbackd
# watching, detecting the bad release, rolling it back and verifying. Exits 0 when it did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python demo/run.py
