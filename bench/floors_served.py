"""The floors of ``bench.floors`` under ``wrk``: the bounds where ``make bench`` measures.

``python -m bench.floors_served [--backend sqlite|postgresql] [--rounds N] [--duration S]``
seeds a database as ``make bench`` does and serves the six apps of ``bench.floors`` (``raw``,
``naive``, ``reference`` and the three floors), each in its own uvicorn process: the
reference and its two floors on Bastion's uvloop with the reference's pacing, ``raw``,
``raw_floor`` and ``naive`` on stock uvloop, as ``make bench`` serves them. It then loads
each app in turn with ``wrk`` at 64 connections, 3 rounds of 5 s per scenario after 1 s of
warm-up, the order rotating each round, and reads each server's CPU time from ``/proc``
around every run. It prints, per scenario and app, req/s, the server's CPU microseconds per
request and the share of a core it used (medians over the rounds), then the bounds as
``bench.floors`` computes them, from CPU per request under load.

Why under load: one request at a time in-process, a request costs less than under ``wrk``,
and not by the same amount for every app (bench/README.md, fifteenth pass: the reference's
SQLite point read 338 against 600 us, ``raw``'s 82 against 150), so in-process bounds can
say a target is within reach when it is not. A server that uses a whole core serves
``1 / CPU per request``; where one uses less (waiting on its database), its req/s falls
further behind than its CPU says, so a bound stays an upper bound. ``naive`` on SQLite uses
a little more than a core (aiosqlite's thread beside the loop), so its req/s is a little
higher than its CPU says, and the bounds to ``naive`` a little lower than printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.floors import ANSWERS, APPS, report
from bench.run import (
    BASTION_UVLOOP,
    CONNECTIONS,
    SCENARIOS,
    Server,
    create_postgres_database,
    drop_postgres_database,
    run_wrk,
    seed,
    server_env,
)

FACTORY: Final = "bench.floors_served:served_app"
FLOORS: Final = {
    "raw_floor": "uvloop",
    "reference_floor": BASTION_UVLOOP,
    "unit_floor": BASTION_UVLOOP,
}
"""The floors and the loop each is served on: that of the app it is the floor of."""
VARIANT_OF: Final = {"raw": "raw", "naive": "naive", "reference": "bastion"}
"""``make bench``'s variant for each app of ``bench.floors`` that is not a floor."""
WARMUP_S: Final = 1


def served_app() -> Any:
    """The ``bench.floors`` app named by ``BENCH_FLOOR_APP``, answering what ``raw`` answered
    (``BENCH_FLOOR_ANSWERS``, a JSON file): a uvicorn factory.

    Raises:
        KeyError: either variable is unset, or the app is not one of ``bench.floors``'.
    """
    ANSWERS.update(json.loads(Path(os.environ["BENCH_FLOOR_ANSWERS"]).read_text()))
    return APPS[os.environ["BENCH_FLOOR_APP"]]()


@dataclass(frozen=True)
class Run:
    """One ``wrk`` run against one app: its req/s and the server's CPU seconds meanwhile."""

    rps: float
    requests: int
    cpu_s: float
    duration_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6

    @property
    def core_share(self) -> float:
        return self.cpu_s / self.duration_s


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds the process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_answers(port: int, conversation_id: str, key: str) -> dict[str, Any]:
    """What ``raw`` answers to each scenario's request: what the floors answer."""
    answers = {}
    for name, scenario in SCENARIOS.items():
        body = scenario.get("BENCH_BODY")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/conversations/{conversation_id}{scenario['BENCH_SUFFIX']}",
            method=scenario["BENCH_METHOD"],
            data=body.encode() if body else None,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            answers[name] = json.load(reply)
    return answers


def start_servers(
    env: dict[str, str], workdir: Path, key: str, ids: list[str]
) -> dict[str, Server]:
    """Every app's server, started and ready; the floors once ``raw``'s answers are known."""
    servers: dict[str, Server] = {}
    try:
        for app, variant in VARIANT_OF.items():
            servers[app] = Server(variant, env, workdir)
        for server in servers.values():
            server.wait_ready()
        answers = workdir / "answers.json"
        answers.write_text(json.dumps(record_answers(servers["raw"].port, ids[0], key)))
        for floor, loop in FLOORS.items():
            floor_env = {**env, "BENCH_FLOOR_APP": floor, "BENCH_FLOOR_ANSWERS": str(answers)}
            servers[floor] = Server(floor, floor_env, workdir, loop, factory=FACTORY)
        for floor in FLOORS:
            servers[floor].wait_ready()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def measure(
    servers: dict[str, Server], wrk_env: dict[str, str], rounds: int, duration_s: int
) -> dict[str, dict[str, list[Run]]]:
    """Every scenario against every server, rounds interleaved: the runs by scenario and app.

    Raises:
        RuntimeError: a run answered with errors (the floors' figures would not be theirs).
    """
    runs: dict[str, dict[str, list[Run]]] = {}
    for scenario, scenario_env in SCENARIOS.items():
        load = {**wrk_env, **scenario_env}
        for server in servers.values():
            run_wrk(server.port, load, WARMUP_S, CONNECTIONS)
        order = list(servers)
        for _ in range(rounds):
            for app in order:
                pid = servers[app].process.pid
                before = process_cpu_s(pid)
                result = run_wrk(servers[app].port, load, duration_s, CONNECTIONS)
                cpu_s = process_cpu_s(pid) - before
                errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
                if errors or not result["requests"]:
                    raise RuntimeError(f"{app} {scenario}: {errors:.0f} errors under wrk")
                seconds = result["duration_us"] / 1e6
                run = Run(result["requests"] / seconds, int(result["requests"]), cpu_s, seconds)
                runs.setdefault(scenario, {}).setdefault(app, []).append(run)
                print(
                    f"  {scenario:17} {app:16} {run.rps:8.1f} req/s"
                    f"  {run.cpu_us_per_request:6.0f} us CPU per request"
                    f"  {run.core_share:4.2f} of a core",
                    flush=True,
                )
            order = order[1:] + order[:1]
    return runs


def summary(backend: str, runs: dict[str, dict[str, list[Run]]]) -> list[str]:
    """The medians per app, the reference's req/s ratios, and ``bench.floors``' bounds from
    CPU per request under load."""
    lines = [f"{backend}: under wrk, {CONNECTIONS} connections (medians over rounds)"]
    for scenario, by_app in runs.items():
        lines.append(f"  {scenario}")
        for app, app_runs in by_app.items():
            lines.append(
                f"    {app:16} {statistics.median(r.rps for r in app_runs):8.1f} req/s"
                f" {statistics.median(r.cpu_us_per_request for r in app_runs):6.0f} us CPU"
                f" {statistics.median(r.core_share for r in app_runs):5.2f} of a core"
            )
        reference = by_app["reference"]
        for baseline in ("raw", "naive"):
            per_round = [a.rps / b.rps for a, b in zip(reference, by_app[baseline], strict=True)]
            lines.append(
                f"    measured reference/{baseline} req/s {statistics.median(per_round):.3f}"
            )
    costs = {
        scenario: {
            app: statistics.median(r.cpu_us_per_request for r in app_runs)
            for app, app_runs in by_app.items()
        }
        for scenario, by_app in runs.items()
    }
    return lines + report(backend, costs, title="CPU us per request under wrk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion_floors_served-") as tmp:
        workdir = Path(tmp)
        name = "bastion_floors_served"
        if options.backend == "postgresql":
            url = asyncio.run(create_postgres_database(name))
        else:
            url = f"sqlite:///{workdir}/{name}.db"
        env = server_env(url)  # make bench's, pools included
        try:
            seed(env, workdir)
            key = (workdir / "key.txt").read_text().strip()
            ids = (workdir / "ids.txt").read_text().split()
            wrk_env = {"BENCH_IDS": str(workdir / "ids.txt"), "BENCH_KEY": key}
            servers = start_servers(env, workdir, key, ids)
            try:
                runs = measure(servers, wrk_env, options.rounds, options.duration)
            finally:
                for server in servers.values():
                    server.stop()
        finally:
            if options.backend == "postgresql":
                asyncio.run(drop_postgres_database(name))
    print("\n".join(summary(options.backend, runs)))


if __name__ == "__main__":
    main()
