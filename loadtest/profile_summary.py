"""Fold py-spy's raw (collapsed-stack) output into a table of the functions where one
thread spends its time: ``python -m loadtest.profile_summary prof.txt [--thread main]``."""

from __future__ import annotations

import argparse
import collections
import sys


def fold(lines, focus: str = "") -> tuple[int, collections.Counter]:
    """Inclusive sample counts per function (``name [file]``) over stacks containing
    ``focus`` (every stack when empty); a function counts once per stack."""
    totals: collections.Counter = collections.Counter()
    n = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if focus:
            hit = [i for i, f in enumerate(frames) if focus in f]
            if not hit:
                continue
            frames = frames[hit[0]:]
        n += int(count)
        seen = set()
        for f in frames:
            name = f.split(" (")[0]
            where = f.rpartition("(")[2].split(":")[0].rsplit("/", 1)[-1]
            key = f"{name} [{where}]"
            if key not in seen:
                seen.add(key)
                totals[key] += int(count)
    return n, totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.profile_summary", description=__doc__)
    p.add_argument("raw", help="py-spy record -f raw output")
    p.add_argument("--focus", default="Runner.run",
                   help="only stacks through this frame (default: the event loop thread)")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args(argv)
    with open(a.raw) as fh:
        n, totals = fold(fh, a.focus)
    print(f"{n} samples through {a.focus!r}")
    for key, count in totals.most_common(a.top):
        print(f"{count:7d} {100 * count / max(n, 1):5.1f}%  {key[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
