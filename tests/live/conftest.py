"""Fixtures of the live-update tests (see tests/cache/redis_server.py)."""

from tests.cache.redis_server import cache_settings, redis_server, shared_redis_url  # noqa: F401
