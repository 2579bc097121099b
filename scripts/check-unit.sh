#!/usr/bin/env bash
# Checks systemd/rollbackd.service the way CI does: `systemd-analyze verify` must print
# nothing on stderr, and the offline security score must be 2.0 or better (lower is safer).
# verify checks that ExecStart's program exists, so a copy pointing at this checkout's
# .venv/bin/rollbackd is what is verified; the unit is otherwise unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s#/usr/local/bin/rollbackd#$PWD/.venv/bin/rollbackd#" systemd/rollbackd.service \
    > "$work/rollbackd.service"
if ! systemd-analyze verify "$work/rollbackd.service" 2> "$work/verify.err" \
    || [ -s "$work/verify.err" ]; then
    echo "systemd-analyze verify failed:" >&2
    cat "$work/verify.err" >&2
    exit 1
fi
systemd-analyze security --offline=true --threshold=20 "$work/rollbackd.service" \
    | tail -n 1
echo "systemd/rollbackd.service: verify clean, security within 2.0"
