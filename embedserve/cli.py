"""The `embedserve` command: `embedserve launch [options]` starts a server, `embedserve bench` loads one."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: embedserve <command> [options]

commands:
  launch    start an embedding server (same as python -m embedserve.launch); see embedserve launch --help
  bench     closed-loop load against a running server, with a summary table; see embedserve bench --help
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "launch":
        from embedserve.launch import main as launch_main

        return launch_main(rest)
    if command == "bench":
        from embedserve.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"embedserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
