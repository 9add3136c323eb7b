"""CPU instructions per request, counted by valgrind: a figure that does not move with the machine.

``python -m bench.instructions [--backend sqlite|postgresql] [--scenario NAME] [--app NAME]
[--requests N]`` sends one of ``make bench``'s requests into an ASGI app in-process, one at a
time (as ``bench.floors`` does), under ``valgrind --tool=callgrind``, twice: once with a
warm-up only and once with the warm-up and ``N`` more requests. The difference of the two
totals, divided by ``N``, is what a request costs in instructions, start-up and warm-up left
out. Everything the Python process runs counts (Python, the driver's C code, the event loop);
the database server and the kernel do not.

Why: on this shared 2-core machine CPU time per request moved by a factor of two within
minutes on some days, which buries a 3 % change in noise; instruction counts repeat to about
1 % (four runs of the same code, 500 requests each, spread over 0.4 % of their totals, which
is about 2 % of the 300 requests' difference; more requests narrow it). They are not time (a
cache miss counts once, a syscall's kernel side not at all): use them to compare two versions
of the same request, and ``make bench`` for the ratios. A run takes two to five minutes
(valgrind runs the process about 50 times slower).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

from asgi_lifespan import LifespanManager

from bench.floors import ANSWERS, APPS, SCENARIOS, _send
from bench.layers import ROOT, measure_seeded

WARM_UP: Final = 200
_COLLECTED: Final = re.compile(r"Collected : (\d+)")


async def _run(app_name: str, scenario_name: str, workdir: Path, requests: int) -> None:
    """Send the warm-up and ``requests`` more requests into the app (the counted child)."""
    key = (workdir / "key.txt").read_text().strip()
    ids = (workdir / "ids.txt").read_text().split()
    chosen = random.Random(7).choices(ids, k=WARM_UP + requests)  # the same ids in both runs
    scenario = SCENARIOS[scenario_name]
    if app_name.endswith("_floor"):
        # A floor answers what raw answered, recorded first (as bench.floors does); both runs
        # do it, so its cost cancels out of the difference.
        raw = APPS["raw"]()
        async with LifespanManager(raw):
            ANSWERS[scenario_name] = json.loads(await _send(raw, scenario, ids[0], key))
    app = APPS[app_name]()
    async with LifespanManager(app):
        for conversation_id in chosen:
            await _send(app, scenario, conversation_id, key)


def _counted(backend: str, app: str, scenario: str, requests: int) -> int:
    """Instructions of one child run (``requests`` after the warm-up), as callgrind counts them.

    Raises:
        RuntimeError: valgrind failed or printed no total.
    """
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/callgrind.out",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            f"--backend={backend}",
            f"--app={app}",
            f"--scenario={scenario}",
            f"--requests={requests}",
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="create_message")
    parser.add_argument("--app", choices=sorted(APPS), default="reference")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.requests < 1 and not options.child:
        parser.error("--requests must be at least 1")
    if options.child:
        measure_seeded(
            options.backend,
            "bastion_instructions",
            lambda workdir, requests: _run(options.app, options.scenario, workdir, requests),
            options.requests,
        )
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install -y valgrind)")
    args = (options.backend, options.app, options.scenario)
    base = _counted(*args, 0)
    total = _counted(*args, options.requests)
    per_request = (total - base) / options.requests
    print(
        f"{options.backend} {options.scenario} {options.app}: {per_request / 1e6:.3f} M "
        f"instructions per request ({options.requests} requests; totals {base:,} and {total:,})"
    )


if __name__ == "__main__":
    main()
