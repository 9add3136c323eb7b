"""``@cached``: a read-through cache around an async function, keyed by its named arguments.

>>> @cached("conversation:{owner_id}:{conversation_id}", ttl=60,
...         tags=["conversation:{owner_id}:{conversation_id}"])
... async def load_conversation(
...     connection: AsyncConnection, owner_id: UUID, conversation_id: UUID
... ) -> ConversationOut: ...

The key is built only from the parameters the template names — never from the others, which
are typically injected (a connection, a request) and differ on every call. Naming a parameter
the function does not have fails at decoration time. Each value is percent-encoded, so ``:``
in one argument cannot make two different calls share a key. The return annotation decides
how values are stored and read back (a pydantic ``TypeAdapter``: models, UUIDs and datetimes
round-trip through JSON).

The cache comes from ``cache=`` (a :class:`~bastion.cache.Cache`, or a callable returning one)
or, when omitted, from :func:`use_cache` — set by the app's lifespan; until then (and in a
process without Redis) calls go straight to the function.
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, ParamSpec, TypeVar, get_type_hints
from urllib.parse import quote

from pydantic import TypeAdapter

from bastion.cache.base import Cache, NullCache

__all__ = ["cache_key", "cached", "current_cache", "use_cache"]

P = ParamSpec("P")
T = TypeVar("T")

_NULL = NullCache()
_current: list[Cache] = [_NULL]


def use_cache(cache: Cache | None) -> None:
    """Make ``cache`` the one ``@cached`` functions use when given none (``None``: no cache)."""
    _current[0] = cache if cache is not None else _NULL


def current_cache() -> Cache:
    """The cache :func:`use_cache` set (a :class:`NullCache` before that)."""
    return _current[0]


def cache_key(template: str, **values: Any) -> str:
    """``template`` filled with ``values``, each percent-encoded (``:`` and ``%`` included).

    Use it to name the keys a write invalidates, exactly as ``@cached`` builds them:

    >>> cache_key("conversation:{owner_id}:{conversation_id}", owner_id="u1", conversation_id="a:b")
    'conversation:u1:a%3Ab'

    ``None`` is encoded as ``!none``, apart from the string ``"None"``.

    Raises:
        KeyError: a name of the template is missing from ``values``.
    """
    return template.format_map({name: _encode(values[name]) for name in _fields(template)})


# ``!`` is never left as it is by quote(safe=""): no argument's encoding can look like None's.
_NONE: Final = "!none"


def _encode(value: Any) -> str:
    return _NONE if value is None else quote(str(value), safe="")


def cached(
    key: str,
    *,
    ttl: float | None = None,
    tags: Sequence[str] = (),
    cache: Cache | Callable[[], Cache] | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Cache the decorated async function's result under ``key`` for ``ttl`` seconds.

    ``key`` and each of ``tags`` are ``str.format`` templates over the function's parameter
    names; ``ttl`` defaults to ``CACHE_DEFAULT_TTL_S``.

    Raises (at decoration):
        TypeError: a template names something that is not a parameter, or uses attribute
            or index access (``{user.id}``), which could reach into injected objects.
    """
    templates = [key, *tags]

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        signature = inspect.signature(function)
        for template in templates:
            for name in _fields(template):
                if name not in signature.parameters:
                    raise TypeError(
                        f"cache key {template!r} names {name!r}, which is not a parameter of "
                        f"{function.__qualname__}"
                    )
        try:
            returned = get_type_hints(function).get("return", Any)
        except Exception:  # an annotation that does not resolve: store the value as it is
            returned = Any
        adapter: TypeAdapter[Any] = TypeAdapter(returned)

        def dump(value: Any) -> Any:
            return adapter.dump_python(value, mode="json")

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            chosen = cache() if callable(cache) else cache
            target = chosen if chosen is not None else _current[0]
            if isinstance(target, NullCache):  # no cache: no key to build, straight to the source
                return await function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            return await target.get_or_load(
                cache_key(key, **arguments),
                lambda: function(*args, **kwargs),
                ttl_s=ttl,
                tags=[cache_key(tag, **arguments) for tag in tags],
                dump=dump,
                parse=adapter.validate_python,
            )

        return wrapper

    return decorate


@functools.lru_cache(maxsize=1024)
def _fields(template: str) -> tuple[str, ...]:
    """The parameter names ``template`` uses, in order (cached: a service has few templates,
    and :func:`cache_key` runs on every cached read and every write's invalidation).

    Raises:
        TypeError: a field that is not a plain name (``{a.b}``, ``{0}``, ``{a[0]}``).
    """
    names = []
    for _literal, name, _spec, _conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise TypeError(f"cache key {template!r}: use plain parameter names, not {name!r}")
        names.append(name)
    return tuple(names)
