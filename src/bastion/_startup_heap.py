"""Keep the objects made at start-up out of the cyclic garbage collector's way.

A FastAPI service on SQLAlchemy, pydantic and their kin holds over 100,000 objects that the
collector tracks once it has started (the reference service: 135,558): modules, classes,
compiled statements, route and model definitions. Most live as long as the process, yet every
full (generation 2) collection walks them all. In the reference service under load
(PostgreSQL point reads, 64 connections, asyncio's loop) one full collection held the event
loop for about 80 ms, every few seconds. With the heap frozen, the loop-lag maximum on uvloop
at 64 connections fell from 64 to 85 ms to 8 to 18 ms (bench/README.md, finding 32).

:func:`freeze_startup_heap` runs a full collection, so that start-up's garbage is freed, then
moves every object still alive into the collector's permanent generation
(:func:`gc.freeze`), which later collections skip. Reference counting still frees a frozen
object once nothing refers to it. What is never reclaimed is a frozen object that later dies
inside a reference cycle, with its finalizer: a connection made at start-up and replaced
later, say, if it sits in a cycle. That is bounded by what existed at start-up.

It acts once per process: the objects alive at the first application's start-up are the
ones most likely to live as long as the process. A later start-up in the same process (tests
start many applications) would freeze that run's leftovers too.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["freeze_startup_heap"]

_lock = threading.Lock()
_frozen = False


def freeze_startup_heap() -> bool:
    """Collect garbage, then freeze every object still tracked; once per process.

    Returns ``True`` when this call froze the heap, ``False`` when an earlier call had (or,
    on another thread, is doing so). Raises nothing.
    """
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
        gc.collect()
        gc.freeze()
    return True
