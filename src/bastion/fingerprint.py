"""Statement fingerprints: the shape of a SQL statement, with every value taken out.

Two executions of "the same query" with different values share a fingerprint, so metrics,
the slow-query log and the N+1 detector can count them together — and a fingerprint never
carries a value, so it is safe in logs and metrics.

>>> fingerprint("SELECT * FROM t WHERE id = 42 AND name = 'bob'")
'SELECT * FROM t WHERE id = ? AND name = ?'
>>> fingerprint("select a from t where id in ($1, $2, $3)")
'select a from t where id in (?)'
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

__all__ = ["MAX_FINGERPRINT_LENGTH", "fingerprint"]

MAX_FINGERPRINT_LENGTH: Final = 300

_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"(?<![\w$])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_PLACEHOLDER = re.compile(r"\$\d+|%\([^)]*\)s|%s|(?<![:\w]):\w+|\?")  # not a ::cast
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
# A VALUES list of many rows (an executemany rendered inline) is one row's shape.
_ROWS = re.compile(r"(\(\?\))(?:\s*,\s*\(\?\))+")
_SPACE = re.compile(r"\s+")


@lru_cache(maxsize=4096)
def fingerprint(statement: str) -> str:
    """The statement with literals, numbers and parameters replaced by ``?``.

    Lists of values collapse to one ``?``, whitespace to one space, and the result is cut
    at :data:`MAX_FINGERPRINT_LENGTH` characters. Cached: a service runs few distinct
    statement texts, many times each.
    """
    shape = _STRING.sub("?", statement)
    shape = _PLACEHOLDER.sub("?", shape)
    shape = _NUMBER.sub("?", shape)
    shape = _SPACE.sub(" ", shape).strip()
    shape = _LIST.sub("(?)", shape)
    shape = _ROWS.sub(r"\1", shape)
    if len(shape) > MAX_FINGERPRINT_LENGTH:
        shape = shape[: MAX_FINGERPRINT_LENGTH - 1] + "…"
    return shape
