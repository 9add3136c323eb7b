"""What the lean path works out once per statement object: its SQL, where each driver argument
comes from, and its result metadata.

Every lean statement used to ask SQLAlchemy for its compiled form (``_compile_w_cache``: the
statement's cache key looked up in the engine's compiled cache) and for its parameters
(``construct_params``: a dictionary of every bind's value, then the positional list). For a
statement object run again and again (a module-level ``select``, a repository's cached
statement), both answers are the same every time except for the values the caller passes.
A :class:`Plan` keeps them: the SQL text, and per positional argument either the name of the
caller's parameter or the bind's own value in the statement, each with its bind processor,
which runs on every run as SQLAlchemy runs it (a processor may depend on more than its value,
and a value fixed in the statement may be a mutable object). Made the first time the lean path
runs a statement, after SQLAlchemy has answered, it replaces those two steps on the next runs
(``bench/README.md``, finding 51).

A plan is made only for a statement object whose compiled form SQLAlchemy made from that very
object (``compiled.statement is statement``): one built anew for each call (``select(...)
.where(col == value)``) finds an equal statement's compiled form in the cache instead, so it
gets no plan, and costs nothing here. Nor where a bind's value is asked for on every run or the
SQL depends on the values: a bind with a ``callable_``, expanding ``IN`` parameters or literal
rendering (:func:`bastion._lean._bind` handles those), escaped bind names, parameters
SQLAlchemy collected elsewhere. A plan is used only on the engine it was made on (so with its
dialect), while the engine has the compiled cache it had, and with the same parameter names.

Plans are kept per statement object, weakly (:data:`_PLANS`), up to :data:`_PLANS_PER_STATEMENT`
of them (one per engine and set of names: SQLite's read and write engines are two). A plan
refers to its engine weakly and to no compiled form or cache (the cache holds the compiled form,
which holds the statement): it goes when its statement goes, and it keeps no engine alive.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Plan", "make_plan", "plan_of"]

_PLANS_PER_STATEMENT: Final = 4
"""Plans kept per statement object; a fifth replaces the oldest."""


class Plan(NamedTuple):
    """A statement's SQL, argument sources and result metadata (see the module docstring)."""

    engine: weakref.ReferenceType[Any]
    """The (sync) engine the plan was made on."""
    compiled_cache: int
    """The ``id`` of that engine's compiled cache then (alive as long as the engine is)."""
    names: frozenset[str]
    """The caller's parameter names it was made for."""
    sql: str
    slots: tuple[tuple[str | None, Any, Any], ...]
    """Per positional argument: the caller's parameter name (or ``None``: the bind's own
    value), the bind processor (or ``None``), and the bind's own value."""
    metadata: Any
    """SQLAlchemy's cached result metadata for the compiled statement."""

    def arguments(self, parameters: Mapping[str, Any] | None) -> list[Any]:
        """The driver's positional arguments for ``parameters``.

        Raises:
            Whatever a bind processor raises for a value it cannot take.
        """
        arguments = []
        for name, processor, own in self.slots:
            value = own if name is None else parameters[name]  # type: ignore[index]
            arguments.append(value if processor is None else processor(value))
        return arguments


_PLANS: Final[weakref.WeakKeyDictionary[Any, list[Plan]]] = weakref.WeakKeyDictionary()


def plan_of(
    statement: Any, engine: Any, compiled_cache: Any, parameters: dict[str, Any] | None
) -> Plan | None:
    """``statement``'s plan for this engine, its compiled cache and these names, if made."""
    for plan in _PLANS.get(statement, ()):
        if (
            plan.engine() is engine
            and plan.compiled_cache == id(compiled_cache)
            and (plan.names == parameters.keys() if parameters else not plan.names)
        ):
            return plan
    return None


def make_plan(
    statement: Any,
    compiled: Any,
    extracted: Any,
    collected: Any,
    values: Mapping[str, Any],
    engine: Any,
    compiled_cache: Any,
    parameters: dict[str, Any] | None,
) -> None:
    """Keep a plan for ``statement`` on ``engine``, if it may have one (module docstring).

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
    slots = tuple(
        (key if key in names else None, processors.get(key), None if key in names else values[key])
        for key in compiled.positiontup
    )
    plan = Plan(
        weakref.ref(engine),
        id(compiled_cache),
        names,
        compiled.string,
        slots,
        compiled._cached_metadata,
    )
    plans = [
        kept
        for kept in _PLANS.get(statement, ())
        if kept.engine() is not None and (kept.engine(), kept.names) != (engine, names)
    ]
    plans.append(plan)
    _PLANS[statement] = plans[-_PLANS_PER_STATEMENT:]
