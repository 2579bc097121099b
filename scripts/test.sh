#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then runs the whole suite,
# including the tests against a real Prometheus. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
