"""database_lifespan's garbage-collector options: the start-up heap frozen once per process
(garbage first), and the young collections' threshold; neither by default.

Each case runs in a fresh interpreter: the freeze is per process, and this test process has
started many applications already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion import DatabaseSettings
from bastion.fastapi import database_lifespan

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, sys, weakref

    from asgi_lifespan import LifespanManager
    from fastapi import FastAPI

    from bastion import DatabaseSettings
    from bastion.fastapi import database_lifespan

    class Node:
        pass

    async def main(url, freeze):
        # The option when asked for, the default otherwise.
        options = {"freeze_heap": True, "gc_young_threshold": 10_000} if freeze else {}
        # Start-up's garbage: a reference cycle nothing points to any more.
        cycle = Node()
        cycle.self = cycle
        cycle_is_alive = weakref.ref(cycle)
        del cycle
        gc.disable()  # so that only the lifespan's own collection can free it
        settings = DatabaseSettings(DATABASE_URL=url)
        counts = [gc.get_freeze_count()]
        app = FastAPI(lifespan=database_lifespan(settings, **options))
        async with LifespanManager(app):
            counts.append(gc.get_freeze_count())
            thresholds = gc.get_threshold()
        # Alive across a second start-up in the same process, which must not freeze it.
        marker = Node()
        app = FastAPI(lifespan=database_lifespan(settings, **options))
        async with LifespanManager(app):
            # get_objects() lists what the collector still walks, the frozen objects aside.
            marker_frozen = not any(o is marker for o in gc.get_objects())
        print(json.dumps({
            "counts": counts,
            "garbage_freed": cycle_is_alive() is None,
            "marker_frozen": marker_frozen,
            "thresholds": thresholds,
        }))

    asyncio.run(main(sys.argv[1], sys.argv[2] == "on"))
    """
)


def run_script(tmp_path: Path, freeze: str) -> dict[str, object]:
    url = f"sqlite:///{tmp_path}/heap.db"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url, freeze],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_first_start_up_frees_its_garbage_and_freezes_the_rest_once(tmp_path: Path) -> None:
    result = run_script(tmp_path, "on")

    before, after_first_start_up = result["counts"]  # type: ignore[misc]
    assert before == 0
    assert after_first_start_up > 10_000  # modules, classes, SQLAlchemy and FastAPI objects
    assert result["garbage_freed"] is True
    assert result["marker_frozen"] is False  # the second start-up froze nothing
    assert result["thresholds"] == [10_000, 10, 10]


def test_by_default_the_collector_is_left_alone(tmp_path: Path) -> None:
    result = run_script(tmp_path, "off")

    assert result["counts"] == [0, 0]
    assert result["garbage_freed"] is False
    assert result["marker_frozen"] is False
    assert result["thresholds"] == [700, 10, 10]


@pytest.mark.parametrize("threshold", [0, -1])
def test_a_young_threshold_below_one_is_refused_when_the_app_is_built(threshold: int) -> None:
    settings = DatabaseSettings(DATABASE_URL="sqlite:///unused.db")
    with pytest.raises(ValueError, match="gc_young_threshold must be at least 1"):
        database_lifespan(settings, gc_young_threshold=threshold)
