"""Flame graph of a ``dispatchd serve`` process under the hot-resource reservation load.

Usage: ``python -m bench.profile_reserve [--out docs/profiles/reserve.svg] [--backend sqlite|postgres]
[--seconds 8]``. Runs ``bench_reservations``'s HTTP load (64 clients, group commit on) and records the
server with py-spy (``pip install py-spy``) for ``--seconds`` at 200 samples/s.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import bench.bench_reservations as reservations_bench
from bench import common


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/profiles/reserve.svg")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    plain_server = common.server

    @contextmanager
    def profiled_server(*server_args, **settings):
        with plain_server(*server_args, **settings) as base:
            command = [py_spy, "record", "-o", args.out, "--pid", str(base.pid)]
            command += ["--duration", str(args.seconds), "--rate", "200", "--nonblocking"]
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                yield base
            finally:
                spy.wait()

    reservations_bench.server = profiled_server
    run = asyncio.run(reservations_bench.bench_http(args.backend, 64, 1.0, float(args.seconds), 256))
    print(f"machine: {common.machine()}")
    print(run.summary())
    print(f"flame graph: {args.out}")


if __name__ == "__main__":
    main()
