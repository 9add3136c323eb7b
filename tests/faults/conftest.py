"""Fixtures of the fault tests, re-exported from the modules that define them."""

from tests.faults.pg_server import fresh_postgres_server, postgres_server  # noqa: F401
from tests.faults.stack import fault_stack  # noqa: F401
