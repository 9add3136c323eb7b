"""``make bench``: the reference service beside baselines, interleaved, on SQLite and PostgreSQL.

For each backend: seed a database, start one uvicorn process per variant (``bastion`` — the
reference service itself — ``raw``, ``naive``, ``sync``), then for every scenario run ``wrk``
against each variant in turn, round after round (the order rotates each round), so that the
machine's drift hits every variant alike. Ratios are medians of per-round ratios. Last,
``concurrency_1000``: the point read with 1000 connections, against ``bastion`` and ``raw``,
each on a fresh server on uvloop (as every other scenario) and again on asyncio's loop
(``*_asyncio_loop``).

"uvloop" means stock uvloop for the baselines and Bastion's batch-accepting uvloop
(``bastion.event_loop``) for the reference service, the loop its README says to serve it on:
stock uvloop accepts one new connection per loop turn (bench/README.md, findings 31 and 41).

Writes ``bench/results/latest.json`` and ``bench/results/latest.md``.
``BENCH_QUICK=1`` gives a short smoke run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from bench.bulk import bench_bulk

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LUA = ROOT / "bench" / "wrk" / "conversations.lua"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL",
    os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
)

ROUNDS = 2 if QUICK else 3
DURATION_S = 1 if QUICK else 5
# A second of warm-up (several hundred requests) fills the pools and the statement caches; the
# full run stays under 10 minutes on a slow day (589 s with 2 s of warm-up). The quick run
# skips it (140 s with it, against the 2 minutes asked): a smoke run's first round is warm-up.
WARMUP_S = 0 if QUICK else 1
THREADS = 2
CONNECTIONS = 64
# concurrency_1000 runs as long as the other scenarios: it runs four times per backend (two
# variants, two loops), and 10 s each took make bench to 598 s on a slow day. The quick run
# gives it 2 s, so that all 1000 connections are open for most of it.
CONCURRENCY_1000_S = 2 if QUICK else DURATION_S
# The 100,000 rows; the quick run inserts a fifth, enough to show the path works.
BULK_ROWS = 20_000 if QUICK else 100_000
BASTION_APP = "conversations.app:create_app"
BASTION_UVLOOP = "bastion.event_loop:new_event_loop"
"""What ``--loop uvloop`` becomes for the reference service (module docstring)."""
VARIANTS = {
    "bastion": BASTION_APP,
    # The same service with its Redis cache on (REDIS_URL): reads served from the cache.
    "bastion_cached": BASTION_APP,
    "raw": "bench.apps.raw:app",
    "naive": "bench.apps.naive:app",
    "sync": "bench.apps.sync:app",
}
MESSAGE_BODY = json.dumps(
    {
        "role": "user",
        "content": "A benchmark message with a little text in it.",
        "metadata": {"client": "wrk"},
        "sources": [{"url": "https://example.com/source", "title": "Source"}],
    }
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CACHED_SCENARIOS = {"get_conversation", "list_messages"}
"""Where the cached variant runs: reads. Its writes would only add an invalidation."""
SCENARIOS = {
    "get_conversation": {"BENCH_SUFFIX": "", "BENCH_METHOD": "GET"},
    "list_messages": {"BENCH_SUFFIX": "/messages?limit=20", "BENCH_METHOD": "GET"},
    "create_message": {
        "BENCH_SUFFIX": "/messages",
        "BENCH_METHOD": "POST",
        "BENCH_BODY": MESSAGE_BODY,
    },
}


@dataclass
class Result:
    backend: str
    scenario: str
    variant: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and that this run has not given to another server.

    The servers of a backend start at once, each binding only once it has imported its app:
    the kernel may offer a port again before the server it went to binds it.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


class Server:
    """One variant in its own uvicorn process, started; :meth:`wait_ready` waits for it.

    Starting is separate from waiting so that several servers can import and start at once.
    """

    def __init__(
        self,
        variant: str,
        env: dict[str, str],
        workdir: Path,
        loop: str = "uvloop",
        *,
        factory: str | None = None,
    ) -> None:
        """``factory``: serve the app this ``module:function`` makes instead of the
        variant's (``bench.floors_served``'s floors), on ``loop`` as given."""
        self.variant = variant
        self.port = free_port()
        target = factory or VARIANTS[variant]
        command = [sys.executable, "-m", "uvicorn", target, "--port", str(self.port)]
        if factory is not None:
            command.append("--factory")
        elif target == BASTION_APP:
            command.append("--factory")
            if loop == "uvloop":
                loop = BASTION_UVLOOP
        command += ["--log-level", "warning", "--no-access-log", "--loop", loop]
        if variant == "bastion_cached":
            env = {**env, "REDIS_URL": REDIS_URL, "CACHE_PREFIX": f"bench-{self.port}"}
        self.log = (workdir / f"{variant}-{loop.split(':')[0]}-{self.port}.log").open("w")
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> None:
        """Return once the server accepts connections; stop it and raise if it does not."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                # The log lives in the run's temporary directory, gone once the run fails.
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.variant} exited; the end of its log:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.variant} did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_wrk(port: int, env: dict[str, str], duration_s: int, connections: int) -> dict[str, float]:
    command = [
        "wrk",
        f"-t{THREADS}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
    ]
    output = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"BENCH_JSON (\{.*\})", output)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{output}")
    return dict(json.loads(match.group(1)))


def summarise(
    backend: str,
    scenario: str,
    variant: str,
    rnd: int,
    raw: dict[str, float],
    connections: int = CONNECTIONS,
) -> Result:
    errors = int(raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"])
    if raw["requests"] == 0:
        # Nothing completed: every connection's request hung past the run (a stalled server).
        errors = max(errors, connections)
    return Result(
        backend=backend,
        scenario=scenario,
        variant=variant,
        round=rnd,
        rps=round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        p50_ms=round(raw["p50_us"] / 1000, 2),
        p99_ms=round(raw["p99_us"] / 1000, 2),
        errors=errors,
    )


def loop_lag_p99_ms(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as reply:
            body = json.load(reply)
    except (OSError, ValueError):
        return None
    lag = body.get("loop_lag_ms")
    return None if lag is None else float(lag["p99"])


async def drop_postgres_database(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def create_postgres_database(name: str) -> str:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def run_scenarios(
    backend: str, env: dict[str, str], wrk_env: dict[str, str], workdir: Path
) -> tuple[list[Result], dict[str, dict[str, list[float]]]]:
    """Every scenario at 64 connections, all variants' servers up, rounds interleaved; also
    the loop lag's p99 after each round, by variant (``bastion``, ``raw``) and scenario."""
    results: list[Result] = []
    variant_lags: dict[str, dict[str, list[float]]] = {"bastion": {}, "raw": {}}
    servers: dict[str, Server] = {}
    try:
        for variant in VARIANTS:
            servers[variant] = Server(variant, env, workdir)
        for server in servers.values():
            server.wait_ready()
        for scenario, scenario_env in SCENARIOS.items():
            order = [
                variant
                for variant in servers
                if variant != "bastion_cached" or scenario in CACHED_SCENARIOS
            ]
            if WARMUP_S:  # warm up every variant that runs this scenario, once
                for variant in order:
                    run_wrk(
                        servers[variant].port, {**wrk_env, **scenario_env}, WARMUP_S, CONNECTIONS
                    )
            for rnd in range(ROUNDS):
                for variant in order:
                    raw = run_wrk(
                        servers[variant].port, {**wrk_env, **scenario_env}, DURATION_S, CONNECTIONS
                    )
                    result = summarise(backend, scenario, variant, rnd, raw)
                    results.append(result)
                    print(
                        f"{backend:10} {scenario:17} {variant:8} round {rnd}: "
                        f"{result.rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                        f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                        flush=True,
                    )
                    if variant in variant_lags:
                        lag = loop_lag_p99_ms(servers[variant].port)
                        if lag is not None:
                            variant_lags[variant].setdefault(scenario, []).append(lag)
                order = order[1:] + order[:1]
    finally:
        for server in servers.values():
            server.stop()
    return results, variant_lags


def run_concurrency_1000(
    backend: str, env: dict[str, str], wrk_env: dict[str, str], workdir: Path
) -> list[Result]:
    """The point read at 1000 connections: ``bastion`` and ``raw``, each on both loops.

    ``raw`` shows what the framework and the driver alone give at 1000 connections on this
    machine. uvloop (libuv 1.45 and later) accepts one new connection per loop turn, asyncio's
    loop a batch, and the wait shows in the p99 (bench/README.md, finding 31), so each variant
    runs on both. Every run gets a fresh server, alone and warmed up for the same time, so
    that the loop is the only difference; the loop that goes first alternates.
    """
    results: list[Result] = []
    point_read = {**wrk_env, **SCENARIOS["get_conversation"]}
    for index, variant in enumerate(("bastion", "raw")):
        loops = ("uvloop", "asyncio") if index % 2 == 0 else ("asyncio", "uvloop")
        for loop in loops:
            server = Server(variant, env, workdir, loop=loop)
            server.wait_ready()
            try:
                if WARMUP_S:
                    run_wrk(server.port, point_read, WARMUP_S, CONNECTIONS)
                raw = run_wrk(server.port, point_read, CONCURRENCY_1000_S, 1000)
            finally:
                server.stop()
            name = variant if loop == "uvloop" else f"{variant}_asyncio_loop"
            result = summarise(backend, "concurrency_1000", name, 0, raw, connections=1000)
            results.append(result)
            print(f"{backend:10} concurrency_1000 {name}: {result}", flush=True)
    return results


@contextmanager
def timed_phase(backend: str, phase: str) -> Iterator[None]:
    """Print how long a phase of the run took: where a run's minutes go."""
    started = time.monotonic()
    yield
    print(f"{backend:10} {phase} took {time.monotonic() - started:.0f} s", flush=True)


def server_env(url: str) -> dict[str, str]:
    """The environment of every variant's server (and of the seeding) on database ``url``."""
    return {
        **os.environ,
        "DATABASE_URL": url,
        "BENCH_DATABASE_URL": url,
        # Each variant may use 16 connections for its work (bastion: per pool), so that all
        # four servers fit in the shared server's max_connections (100) at once.
        "DB_POOL_SIZE": "8",
        "DB_MAX_OVERFLOW": "8",
        "PYTHONPATH": str(ROOT),
    }


def seed(env: dict[str, str], workdir: Path) -> None:
    """Seed the database of ``env`` (``bench.seed``: its key and ids go to ``workdir``).

    Raises:
        subprocess.CalledProcessError: seeding failed.
    """
    subprocess.run(
        [sys.executable, "-m", "bench.seed", str(workdir)], env=env, cwd=ROOT, check=True
    )


def bench_backend(
    backend: str,
    workdir: Path,
    results: list[Result],
    lags: dict[str, dict[str, dict[str, float]]],
) -> None:
    """Seed ``backend``, run every scenario, ``concurrency_1000`` and the bulk insert, adding
    to ``results``, and to ``lags`` each variant's highest loop-lag p99 per scenario."""
    if backend == "postgresql":
        url = asyncio.run(create_postgres_database("bastion_bench"))
    else:
        url = f"sqlite:///{workdir}/bench.db"
    env = server_env(url)
    try:
        with timed_phase(backend, "seeding"):
            seed(env, workdir)
        wrk_env = {
            "BENCH_IDS": str(workdir / "ids.txt"),
            "BENCH_KEY": (workdir / "key.txt").read_text().strip(),
        }
        with timed_phase(backend, "scenarios at 64 connections"):
            scenario_results, variant_lags = run_scenarios(backend, env, wrk_env, workdir)
        results.extend(scenario_results)
        # Started only after the other servers stopped, so that the shared PostgreSQL
        # server's max_connections holds every pool.
        with timed_phase(backend, "concurrency_1000"):
            results.extend(run_concurrency_1000(backend, env, wrk_env, workdir))
        with timed_phase(backend, "bulk_insert"):
            bulk = bench_bulk(backend, url, ROUNDS, BULK_ROWS)
        results.extend(Result(**row) for row in bulk)
    finally:
        if backend == "postgresql":
            asyncio.run(drop_postgres_database("bastion_bench"))
    for variant, by_scenario in variant_lags.items():
        for scenario, measured in by_scenario.items():
            lags.setdefault(variant, {}).setdefault(backend, {})[scenario] = max(measured)


def ratios(results: list[Result]) -> dict[str, float]:
    by_key = {(r.backend, r.scenario, r.variant, r.round): r for r in results}
    out: dict[str, float] = {}
    for backend, scenario in sorted({(r.backend, r.scenario) for r in results}):
        if scenario == "concurrency_1000":
            continue
        for subject, baseline in [
            *(("bastion", base) for base in ("raw", "naive", "sync", "copy", "executemany")),
            ("bastion_cached", "bastion"),
        ]:
            if (backend, scenario, subject, 0) not in by_key:
                continue
            per_round = [
                by_key[(backend, scenario, subject, rnd)].rps
                / by_key[(backend, scenario, baseline, rnd)].rps
                for rnd in range(ROUNDS)
                if (backend, scenario, baseline, rnd) in by_key
                and by_key[(backend, scenario, baseline, rnd)].rps > 0
            ]
            if per_round:
                key = f"{backend}.{scenario}.{subject}_vs_{baseline}"
                out[key] = round(statistics.median(per_round), 3)
    return out


def aggregate(results: list[Result]) -> list[dict[str, object]]:
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.backend, result.scenario, result.variant), []).append(result)
    return [
        {
            "backend": backend,
            "scenario": scenario,
            "variant": variant,
            "rps": round(statistics.median(r.rps for r in group), 1),
            "p50_ms": round(statistics.median(r.p50_ms for r in group), 2),
            "p99_ms": round(statistics.median(r.p99_ms for r in group), 2),
            "errors": sum(r.errors for r in group),
        }
        for (backend, scenario, variant), group in groups.items()
    ]


def write_markdown(report: dict[str, object], path: Path) -> None:
    lines = [
        f"# Benchmark results ({report['mode']}: {report['rounds']} rounds of "
        f"{report['duration_s']} s, wrk -t{THREADS} -c{CONNECTIONS})",
        "",
        "Loops: `bastion` and `bastion_cached` on Bastion's uvloop (bastion.event_loop), the "
        "baselines on stock uvloop; `*_asyncio_loop` on asyncio's.",
        "",
        "| backend | scenario | variant | req/s (bulk: rows/s) | p50 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {row['backend']} | {row['scenario']} | {row['variant']} | {row['rps']} | "
            f"{row['p50_ms']} | {row['p99_ms']} | {row['errors']} |"
        )
    lines += ["", "| ratio (median of per-round ratios) | value |", "|---|---:|"]
    for key, value in report["ratios"].items():  # type: ignore[attr-defined]
        lines.append(f"| {key} | {value} |")
    lines += ["", "| loop lag p99 under load | bastion ms | raw ms |", "|---|---:|---:|"]
    raw_lags: dict[str, float] = report["loop_lag_p99_ms_raw"]  # type: ignore[assignment]
    for backend, value in report["loop_lag_p99_ms"].items():  # type: ignore[attr-defined]
        lines.append(f"| {backend} | {value} | {raw_lags.get(backend, '-')} |")
    lines += ["", "| loop lag p99 by scenario (highest round) | bastion ms | raw ms |"]
    lines += ["|---|---:|---:|"]
    by_scenario: dict[str, dict[str, dict[str, float]]] = report["loop_lag_p99_ms_by_scenario"]  # type: ignore[assignment]
    for backend, scenarios in by_scenario.get("bastion", {}).items():
        raw_scenarios = by_scenario.get("raw", {}).get(backend, {})
        for scenario, value in scenarios.items():
            lines.append(f"| {backend} {scenario} | {value} | {raw_scenarios.get(scenario, '-')} |")
    path.write_text("\n".join(lines) + "\n")


def _highest(by_backend: dict[str, dict[str, float]]) -> dict[str, float]:
    return {backend: max(by_scenario.values()) for backend, by_scenario in by_backend.items()}


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    backends = os.environ.get("BENCH_BACKENDS", "sqlite,postgresql").split(",")
    results: list[Result] = []
    lags: dict[str, dict[str, dict[str, float]]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        for backend in backends:
            workdir = Path(tmp) / backend
            workdir.mkdir()
            bench_backend(backend, workdir, results, lags)
    report = {
        "mode": "quick" if QUICK else "full",
        "rounds": ROUNDS,
        "duration_s": DURATION_S,
        "connections": CONNECTIONS,
        "elapsed_s": round(time.monotonic() - started, 1),
        "results": aggregate(results),
        "ratios": ratios(results),
        # The highest p99 over every scenario's rounds, per backend (the figure)...
        "loop_lag_p99_ms": _highest(lags.get("bastion", {})),
        "loop_lag_p99_ms_raw": _highest(lags.get("raw", {})),
        # ...and per scenario, to tell which one sets it.
        "loop_lag_p99_ms_by_scenario": lags,
        "rounds_raw": [asdict(r) for r in results],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, RESULTS / "latest.md")
    print((RESULTS / "latest.md").read_text())


if __name__ == "__main__":
    main()
