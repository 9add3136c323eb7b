"""What the middlewares that hold requests back (pacing, the in-flight limit) share: which
requests go straight to the app, and handing their counters to the ``/metrics`` route."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from starlette.types import Scope

from bastion.fastapi._exempt_paths import exempt_prefixes_of, is_exempt
from bastion.fastapi._metrics import serve_metrics_of

__all__ = ["HeldRequests"]


class HeldRequests:
    """The exempt paths and the counters' registry of one middleware.

    Raises:
        TypeError: ``exempt_prefixes`` is a single string (it would exempt every path that
            starts with any one of its characters).
    """

    __slots__ = ("_metrics_served", "exempt_prefixes", "registry")

    def __init__(self, exempt_prefixes: Iterable[str], collector: Collector) -> None:
        self.exempt_prefixes = exempt_prefixes_of(exempt_prefixes)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(collector)
        self._metrics_served = False

    def pass_straight(self, scope: Scope) -> bool:
        """Whether the request goes to the app untouched: not HTTP, or an exempt path.

        The first HTTP request that carries the app (Starlette puts it in the scope) has the
        app's metrics route serve this registry from then on.
        """
        if scope["type"] != "http":
            return True
        if not self._metrics_served and "app" in scope:
            serve_metrics_of(scope["app"], self.registry)
            self._metrics_served = True
        return is_exempt(scope, self.exempt_prefixes)
