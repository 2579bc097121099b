"""Summarise a py-spy profile in its ``raw`` format (collapsed stacks, what
``check_scale.py --profile DIR`` writes): the share of samples per thread root, per
innermost frame (self) and per function anywhere on the stack (inclusive).

    .venv/bin/python bench/profile_summary.py bench-out/check_scale-2000-default.txt

py-spy samples every thread that is not idle; a thread blocked in a socket read still
counts (it holds no GIL but py-spy cannot always tell), so read shares as "where threads
are", and the daemon's CPU% from check_scale.py as how busy it was.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path


def summarise(path: Path, top_self: int, top_inclusive: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    roots: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        roots[frames[0]] += n
        own[frames[-1]] += n
        # A function counts once per sample however deep it recurses; lines are dropped.
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[name] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples"]
    for title, counter, top in (
        ("thread roots", roots, 5),
        ("self", own, top_self),
        ("inclusive", inclusive, top_inclusive),
    ):
        out.append(f"-- {title}")
        out += [f"{n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, nargs="+")
    parser.add_argument("--self", dest="top_self", type=int, default=15)
    parser.add_argument("--inclusive", type=int, default=40)
    args = parser.parse_args()
    for path in args.profile:
        print(summarise(path, args.top_self, args.inclusive))


if __name__ == "__main__":
    main()
