"""What the lean path works out once per statement object: its SQL, where each driver argument
comes from, and its result metadata.

Every lean statement used to ask SQLAlchemy for its compiled form (``_compile_w_cache``: the
statement's cache key looked up in the engine's compiled cache) and for its parameters
(``construct_params``: a dictionary of every bind's value, then the positional list). For a
statement object run again and again (a module-level ``select``, a repository's cached
statement), both answers are the same every time except for the values the caller passes.
A :class:`Plan` keeps them: the SQL text, and per positional argument either the name of the
caller's parameter and its bind processor or a value fixed in the statement, processed once.
Made the first time the lean path runs a statement, after SQLAlchemy has answered, it replaces
those two steps on the next runs (``python -m bench.layers``; ``bench/README.md``, finding 51).

A plan is made only for a statement object whose compiled form SQLAlchemy made from that very
object (``compiled.statement is statement``): one built anew for each call (``select(...)
.where(col == value)``) finds an equal statement's compiled form in the cache instead, so it
gets no plan, and costs nothing here. Nor where a value could change between runs or the SQL
depends on the values: a bind with a ``callable_``, expanding ``IN`` parameters or literal
rendering (:func:`bastion._lean._bind` handles those), parameters SQLAlchemy collected
elsewhere. A plan is used only with the same engine compiled cache and dialect it was made
with, and the same parameter names; the caller's values go through the same bind processors
SQLAlchemy's path applies.

Plans are kept per statement object, weakly (:data:`_PLANS`), and hold no reference to it or to
its compiled form, so they go when the statement goes.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import Dialect

__all__ = ["Plan", "make_plan", "plan_of"]


class Plan(NamedTuple):
    """A statement's SQL, argument sources and result metadata (see the module docstring)."""

    compiled_cache: Any
    """The engine's compiled cache the plan was made against (compared by identity)."""
    dialect: Dialect
    names: frozenset[str]
    """The caller's parameter names it was made for."""
    sql: str
    slots: tuple[tuple[str | None, Any, Any], ...]
    """Per positional argument: the caller's parameter name and its bind processor (or
    ``None``), or ``None`` and the fixed value, already processed."""
    metadata: Any
    """SQLAlchemy's cached result metadata for the compiled statement."""

    def arguments(self, parameters: Mapping[str, Any] | None) -> list[Any]:
        """The driver's positional arguments for ``parameters``.

        Raises:
            Whatever a bind processor raises for a value it cannot take.
        """
        if parameters is None:
            return [fixed for _name, _processor, fixed in self.slots]
        return [
            fixed
            if name is None
            else (parameters[name] if processor is None else processor(parameters[name]))
            for name, processor, fixed in self.slots
        ]


_PLANS: Final[weakref.WeakKeyDictionary[Any, Plan]] = weakref.WeakKeyDictionary()


def plan_of(
    statement: Any, compiled_cache: Any, dialect: Dialect, parameters: Mapping[str, Any] | None
) -> Plan | None:
    """``statement``'s plan, if it has one made for this cache, dialect and these names."""
    plan = _PLANS.get(statement)
    if (
        plan is None
        or plan.compiled_cache is not compiled_cache
        or plan.dialect is not dialect
        or (plan.names != parameters.keys() if parameters else bool(plan.names))
    ):
        return None
    return plan


def make_plan(
    statement: Any,
    compiled: Any,
    extracted: Any,
    collected: Any,
    values: Mapping[str, Any],
    compiled_cache: Any,
    parameters: Mapping[str, Any] | None,
) -> None:
    """Keep a plan for ``statement``, if it may have one (see the module docstring).

    ``compiled`` is SQLAlchemy's compiled form made from ``statement`` itself
    (``compiled.statement is statement``), ``extracted`` and ``collected`` what its
    ``_compile_w_cache`` returned with it, and ``values`` what ``compiled.construct_params``
    made of ``parameters`` for this run.
    """
    if (
        collected
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or compiled._cached_metadata is None
        # construct_params asks these for their value on every run.
        or any(
            getattr(bind, "callable", None) is not None
            for bind in (*compiled.binds.values(), *(extracted or ()))
        )
    ):
        return
    names = frozenset(parameters or ())
    processors = compiled._bind_processors
    slots: list[tuple[str | None, Any, Any]] = []
    for key in compiled.positiontup:
        processor = processors.get(key)
        if key in names:
            slots.append((key, processor, None))
        else:
            value = values[key]
            slots.append((None, None, value if processor is None else processor(value)))
    _PLANS[statement] = Plan(
        compiled_cache,
        compiled.dialect,
        names,
        compiled.string,
        tuple(slots),
        compiled._cached_metadata,
    )
