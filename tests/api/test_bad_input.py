"""Bad input to the reference service: refused with the right status, nothing stored.

Every refusal is checked the same way (:func:`assert_refused`): every row of every table is
read before and after the request and must not have changed; a 422 must have the shape
``{"detail": [{loc, msg, type}, …], "code": "validation_error"}``; and no error body may echo
what was sent — bad values carry :data:`PROBE`, which must not appear in the response.

The limits at their edge (200 characters, 100,000 characters, 16 KiB, depth 8, 2,048-character
URLs, 1 MiB bodies) are shown to be accepted and stored exactly as sent.

Each test is one scenario, run on SQLite and on PostgreSQL (through ``app_client``); its
variants run as subtests, so they share one app and database and each failing variant is
reported by name. Tests marked ``xfail(strict=True)`` pin known defects of the service.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from bastion import Database, DatabaseSettings
from tests.conftest import Users

TABLES = ("users", "api_keys", "conversations", "messages", "message_sources")
PROBE = "zq9-probe"
"""A marker put in bad values; an error body that contains it echoed the input."""
RAW = "@@raw-json@@"
"""A placeholder in a body, replaced by :attr:`Call.raw` — JSON text ``json`` cannot write."""
MIB = 1024 * 1024

CONVERSATIONS = "/v1/conversations"
CONVERSATION = "/v1/conversations/{cid}"
MESSAGES = "/v1/conversations/{cid}/messages"
NO_BODY: Any = object()


# -- helpers ---------------------------------------------------------------------------------


async def snapshot(settings: DatabaseSettings) -> dict[str, list[str]]:
    """Every row of every table, as sorted strings, read in one read unit."""
    async with Database(settings) as database, database.read() as session:
        return {
            table: sorted(
                str(tuple(row))
                for row in await session.execute(text(f"SELECT * FROM {table}"))  # noqa: S608
            )
            for table in TABLES
        }


@dataclass(frozen=True)
class Call:
    """One request; ``{cid}`` in ``path`` becomes the id of the seeded conversation."""

    method: str
    path: str
    body: Any = NO_BODY
    raw: str | None = None  # JSON text put where ``body`` holds RAW
    content: bytes | None = None  # the exact body, sent as application/json
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str | bytes] = field(default_factory=dict)


def encode(body: Any, raw: str | None = None) -> bytes:
    """``body`` as JSON (UTF-8, not ASCII-escaped), with RAW replaced by ``raw``."""
    document = json.dumps(body, ensure_ascii=False)
    if raw is not None:
        assert json.dumps(RAW) in document
        document = document.replace(json.dumps(RAW), raw)
    return document.encode()


async def send(
    client: httpx.AsyncClient, call: Call, cid: str, auth: Mapping[str, str | bytes]
) -> httpx.Response:
    headers: dict[str, str | bytes] = {**auth, **call.headers}
    content = call.content
    if content is None and call.body is not NO_BODY:
        content = encode(call.body, call.raw)
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return await client.request(
        call.method,
        call.path.replace("{cid}", cid),
        content=content,
        params=call.params,
        # As bytes, so a header can carry bytes that are not ASCII (sent as they are).
        headers=[
            (name.encode(), value if isinstance(value, bytes) else value.encode())
            for name, value in headers.items()
        ],
    )


def assert_validation_shape(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == "validation_error"
    assert isinstance(body["detail"], list), body
    assert body["detail"], body
    for error in body["detail"]:
        # No "input" or "ctx": they would carry what the client sent.
        assert set(error) == {"loc", "msg", "type"}, error
        assert isinstance(error["loc"], list)
        assert isinstance(error["msg"], str)
        assert isinstance(error["type"], str)


def assert_not_echoed(response: httpx.Response, probe: str = PROBE) -> None:
    assert probe not in response.text
    assert json.dumps(probe)[1:-1] not in response.text


async def assert_refused(
    client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    call: Call,
    status: int,
    *,
    auth: Mapping[str, str | bytes] | None = None,
) -> httpx.Response:
    """Send ``call`` as alice (or with ``auth``): ``status``, no row changed, nothing echoed."""
    before = await snapshot(settings)
    response = await send(client, call, cid, users.alice if auth is None else auth)
    after = await snapshot(settings)
    assert response.status_code == status, response.text[:2000]
    assert after == before, "a refused request changed the database"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    if status == 422:
        assert_validation_shape(response)
    assert_not_echoed(response)
    return response


def created_status(call: Call) -> int:
    return 200 if call.method == "PATCH" else 201


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def cid(app_client: httpx.AsyncClient, users: Users) -> str:
    """The id of alice's conversation, which has one message with one source."""
    response = await app_client.post(
        CONVERSATIONS, json={"title": "seed", "metadata": {"seed": [1, 2]}}, headers=users.alice
    )
    assert response.status_code == 201, response.text
    conversation_id = str(response.json()["id"])
    response = await app_client.post(
        MESSAGES.format(cid=conversation_id),
        json={
            "role": "user",
            "content": "hello",
            "metadata": {"n": 1},
            "sources": [{"url": "https://example.com/seed", "title": "seed source"}],
        },
        headers=users.alice,
    )
    assert response.status_code == 201, response.text
    return conversation_id


# -- the text fields: title, content, source title -------------------------------------------


def _create_title(value: Any) -> Call:
    return Call("POST", CONVERSATIONS, {"title": value})


def _patch_title(value: Any) -> Call:
    return Call("PATCH", CONVERSATION, {"title": value})


def _message_content(value: Any) -> Call:
    return Call("POST", MESSAGES, {"role": "user", "content": value})


def _source_title(value: Any) -> Call:
    source = {"url": "https://example.com/a", "title": value}
    return Call("POST", MESSAGES, {"role": "user", "content": "ok", "sources": [source]})


TEXT_FIELDS: dict[str, Callable[[Any], Call]] = {
    "create_title": _create_title,
    "patch_title": _patch_title,
    "message_content": _message_content,
    "source_title": _source_title,
}


async def read_back(
    client: httpx.AsyncClient, users: Users, cid: str, field_name: str, response: httpx.Response
) -> Any:
    """What the service now returns for ``field_name`` after the accepted ``response``."""
    if field_name in ("create_title", "patch_title"):
        conversation_id = response.json()["id"]
        got = await client.get(CONVERSATION.format(cid=conversation_id), headers=users.alice)
        assert got.status_code == 200, got.text
        return got.json()["title"]
    got = await client.get(MESSAGES.format(cid=cid), params={"limit": 100}, headers=users.alice)
    assert got.status_code == 200, got.text
    last = got.json()["items"][-1]
    assert last["id"] == response.json()["id"]
    if field_name == "message_content":
        return last["content"]
    return last["sources"][0]["title"]


CONTROL_CHARACTERS = {
    "NUL": "\x00",
    "SOH": "\x01",
    "vertical_tab": "\x0b",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "C1_NEL": "\x85",
}


@pytest.mark.parametrize("field_name", TEXT_FIELDS)
async def test_control_characters_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    field_name: str,
) -> None:
    for name, character in CONTROL_CHARACTERS.items():
        with subtests.test(name):
            call = TEXT_FIELDS[field_name](f"{PROBE}{character}{PROBE}")
            response = await assert_refused(app_client, settings, users, cid, call, 422)
            assert character not in response.text
            assert json.dumps(character)[1:-1] not in response.text


LONE_SURROGATES = {
    "lone_high": '"\\ud800"',
    "lone_low": '"zq9-probe\\udfff"',
    "reversed_pair": '"\\ude00\\ud83d"',
    "high_at_end": '"zq9-probe\\ud83d"',
}


@pytest.mark.parametrize("field_name", TEXT_FIELDS)
async def test_lone_surrogates_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    field_name: str,
) -> None:
    for name, raw in LONE_SURROGATES.items():
        with subtests.test(name):
            call = replace(TEXT_FIELDS[field_name](RAW), raw=raw)
            await assert_refused(app_client, settings, users, cid, call, 422)


VERBATIM = "\t<script>alert('x')</script> &amp; & \"q\" é 😀 \u2028 line\r\nnext\n"


@pytest.mark.parametrize("field_name", TEXT_FIELDS)
async def test_tab_newline_cr_and_markup_are_stored_exactly_as_sent(
    app_client: httpx.AsyncClient, users: Users, cid: str, field_name: str
) -> None:
    call = TEXT_FIELDS[field_name](VERBATIM)
    response = await send(app_client, call, cid, users.alice)
    assert response.status_code == created_status(call), response.text
    assert await read_back(app_client, users, cid, field_name, response) == VERBATIM


async def test_an_escaped_surrogate_pair_is_one_character_and_accepted(
    app_client: httpx.AsyncClient, users: Users, cid: str
) -> None:
    call = Call("POST", CONVERSATIONS, {"title": RAW}, raw='"\\ud83d\\ude00"')
    response = await send(app_client, call, cid, users.alice)
    assert response.status_code == 201, response.text
    assert await read_back(app_client, users, cid, "create_title", response) == "😀"


def _sized(length: int, unit: str = "a") -> str:
    """``length`` characters starting with PROBE (so an echo would be seen)."""
    return (PROBE + unit * length)[:length]


# field -> variant -> value; "too long" is counted in characters, multi-byte ones included.
TOO_LONG_OR_EMPTY: dict[str, dict[str, str]] = {
    "create_title": {
        "empty": "",
        "201": _sized(201),
        "201_accented": _sized(201, "é"),
        "201_emoji": _sized(201, "😀"),
    },
    "patch_title": {"empty": "", "201": _sized(201), "201_emoji": _sized(201, "😀")},
    "message_content": {
        "empty": "",
        "100001": _sized(100_001),
        "100001_emoji": _sized(100_001, "😀"),
    },
    "source_title": {"501": _sized(501), "501_emoji": _sized(501, "😀")},
}


@pytest.mark.parametrize("field_name", TOO_LONG_OR_EMPTY)
async def test_text_too_long_or_empty_is_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    field_name: str,
) -> None:
    for name, value in TOO_LONG_OR_EMPTY[field_name].items():
        with subtests.test(name):
            call = TEXT_FIELDS[field_name](value)
            response = await assert_refused(app_client, settings, users, cid, call, 422)
            assert len(response.content) < 1000


LONGEST: dict[str, dict[str, str]] = {
    "create_title": {"200": _sized(200), "200_emoji": _sized(200, "😀")},
    "patch_title": {"200_accented": _sized(200, "é"), "200_emoji": _sized(200, "😀")},
    "message_content": {"100000": _sized(100_000), "100000_emoji": _sized(100_000, "😀")},
    "source_title": {"500": _sized(500), "500_emoji": _sized(500, "😀")},
}


@pytest.mark.parametrize("field_name", LONGEST)
async def test_text_at_its_limit_is_stored_whole(
    app_client: httpx.AsyncClient,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    field_name: str,
) -> None:
    for name, value in LONGEST[field_name].items():
        with subtests.test(name):
            call = TEXT_FIELDS[field_name](value)
            response = await send(app_client, call, cid, users.alice)
            assert response.status_code == created_status(call), response.text[:500]
            assert await read_back(app_client, users, cid, field_name, response) == value


# -- metadata --------------------------------------------------------------------------------


def _nested_objects(depth: int) -> dict[str, Any]:
    """An object nested ``depth`` deep: ``{}`` is 1, ``{"a": {}}`` is 2."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _nested_lists(depth: int) -> dict[str, Any]:
    """``{"a": [[…]]}``: the object is level 1, each list one more."""
    value: list[Any] = [PROBE]
    for _ in range(depth - 2):
        value = [value]
    return {"a": value}


def _utf8_sized(size: int) -> str:
    """A string of ``size`` UTF-8 bytes, mostly 2-byte characters, starting with PROBE."""
    pairs, odd = divmod(size - len(PROBE), 2)
    value = PROBE + "é" * pairs + "a" * odd
    assert len(value.encode()) == size
    return value


# '{"x":"…"}' is 8 bytes around the string (compact JSON, as the limit measures it).
AT_16_KIB = 16 * 1024 - 8

METADATA_TARGETS: dict[str, Callable[[Any], Call]] = {
    "create": lambda metadata: Call("POST", CONVERSATIONS, {"title": "t", "metadata": metadata}),
    "patch": lambda metadata: Call("PATCH", CONVERSATION, {"metadata": metadata}),
    "message": lambda metadata: Call(
        "POST", MESSAGES, {"role": "user", "content": "c", "metadata": metadata}
    ),
}

# scenario -> variant -> (metadata, raw JSON text put in its place or None)
BAD_METADATA: dict[str, dict[str, tuple[Any, str | None]]] = {
    "not_an_object": {
        "list": ([PROBE], None),
        "string": (PROBE, None),
        "number": (42, None),
        "boolean": (True, None),
        "null": (None, None),
    },
    "over_16KiB": {
        "ascii": ({"x": _sized(AT_16_KIB + 1)}, None),
        "utf8_bytes": ({"x": _utf8_sized(AT_16_KIB + 1)}, None),
    },
    "deeper_than_8": {
        "objects_9": (_nested_objects(9), None),
        "lists_9": (_nested_lists(9), None),
        "under_a_long_key": ({PROBE * 100: _nested_objects(8)}, None),
    },
    "not_finite": {
        "NaN": (RAW, '{"x": NaN}'),
        "Infinity": (RAW, '{"x": Infinity}'),
        "minus_Infinity": (RAW, '{"x": [-Infinity]}'),
        "overflows_to_infinity": (RAW, '{"x": 1e400}'),
        "under_a_long_key": (RAW, '{"zq9-probe-zq9-probe": {"zq9-probe": [NaN]}}'),
    },
    "NUL": {
        "in_value": ({"x": f"{PROBE}\x00"}, None),
        "in_key": ({"x\x00": PROBE}, None),
        "nested": ({"x": {"y": [f"{PROBE}\x00"]}}, None),
        "under_a_long_key": ({PROBE * 500: {PROBE: "\x00"}}, None),
    },
    "lone_surrogate": {
        "in_value": (RAW, '{"x": "zq9-probe\\ud800"}'),
        "in_key": (RAW, '{"\\udc00": 1}'),
        "under_a_long_key": (RAW, '{"zq9-probe-zq9-probe": ["\\ud800"]}'),
    },
}


@pytest.mark.parametrize("scenario", BAD_METADATA)
@pytest.mark.parametrize("target", METADATA_TARGETS)
async def test_bad_metadata_is_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    target: str,
    scenario: str,
) -> None:
    for name, (metadata, raw) in BAD_METADATA[scenario].items():
        with subtests.test(name):
            call = replace(METADATA_TARGETS[target](metadata), raw=raw)
            await assert_refused(app_client, settings, users, cid, call, 422)


GOOD_METADATA: dict[str, Any] = {
    "empty": {},
    "objects_depth_8": _nested_objects(8),
    "lists_depth_8": _nested_lists(8),
    "exactly_16KiB": {"x": _sized(AT_16_KIB)},
    "exactly_16KiB_in_utf8_bytes": {"x": _utf8_sized(AT_16_KIB)},
    "markup": {"<b>": "<script>&amp;</script>", "n": [1, 2.5, None, True]},
}


@pytest.mark.parametrize("target", METADATA_TARGETS)
async def test_metadata_within_limits_is_stored_exactly(
    app_client: httpx.AsyncClient,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    target: str,
) -> None:
    for name, metadata in GOOD_METADATA.items():
        with subtests.test(name):
            call = METADATA_TARGETS[target](metadata)
            response = await send(app_client, call, cid, users.alice)
            assert response.status_code == created_status(call), response.text[:500]
            if target == "message":
                got = await app_client.get(MESSAGES.format(cid=cid), headers=users.alice)
                stored = got.json()["items"][-1]["metadata"]
            else:
                conversation = CONVERSATION.format(cid=response.json()["id"])
                stored = (await app_client.get(conversation, headers=users.alice)).json()
                stored = stored["metadata"]
            assert stored == metadata


# -- source URLs -----------------------------------------------------------------------------


def _with_url(url: Any) -> Call:
    source = {"url": url, "title": "t"}
    return Call("POST", MESSAGES, {"role": "user", "content": "c", "sources": [source]})


URL_2048 = "https://example.com/" + _sized(2048 - len("https://example.com/"))

BAD_URLS: dict[str, dict[str, Any]] = {
    "not_http": {
        "javascript": f"javascript:alert('{PROBE}')",
        "javascript_mixed_case": f"JavaScript:alert('{PROBE}')",
        "file": f"file:///etc/{PROBE}",
        "ftp": f"ftp://example.com/{PROBE}",
        "data": f"data:text/html,<script>{PROBE}</script>",
        "mailto": f"mailto:{PROBE}@example.com",
    },
    "not_absolute": {
        "relative": f"/relative/{PROBE}",
        "no_scheme": f"example.com/{PROBE}",
        "scheme_relative": f"//example.com/{PROBE}",
        "no_host": "http://",
        "empty_host": f"https:///{PROBE}",
        "empty": "",
        "null": None,
    },
    "malformed": {
        "space": f"https://exa mple.com/{PROBE}",
        "NUL": f"https://example.com/{PROBE}\x00",
        "port_out_of_range": f"https://example.com:99999/{PROBE}",
        "broken_ipv6": f"http://[::1/{PROBE}",
    },
    "too_long": {"2049_characters": URL_2048 + "a"},
}


@pytest.mark.parametrize("scenario", BAD_URLS)
async def test_bad_source_url_is_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    scenario: str,
) -> None:
    for name, url in BAD_URLS[scenario].items():
        with subtests.test(name):
            await assert_refused(app_client, settings, users, cid, _with_url(url), 422)


GOOD_URLS = {
    "2048_characters": URL_2048,
    "http": "http://example.com",
    "kept_as_sent": "HTTPS://Example.COM/a?b=<c>&d=e#f",
    "unicode": "https://例え.jp/パス",
}


async def test_good_source_url_is_stored_exactly(
    app_client: httpx.AsyncClient, users: Users, cid: str, subtests: pytest.Subtests
) -> None:
    for name, url in GOOD_URLS.items():
        with subtests.test(name):
            response = await send(app_client, _with_url(url), cid, users.alice)
            assert response.status_code == 201, response.text[:500]
            got = await app_client.get(MESSAGES.format(cid=cid), headers=users.alice)
            assert got.json()["items"][-1]["sources"] == [{"url": url, "title": "t"}]


# -- unknown fields and invalid values -------------------------------------------------------


def _message(**fields: Any) -> Call:
    return Call("POST", MESSAGES, {"role": "user", "content": "c", **fields})


def _source(**fields: Any) -> Call:
    return _message(sources=[{"url": "https://example.com/", **fields}])


# request body -> variant -> call
UNKNOWN_FIELDS: dict[str, dict[str, Call]] = {
    "create_conversation": {
        "owner_id": Call("POST", CONVERSATIONS, {"title": "t", "owner_id": PROBE}),
        "id": Call("POST", CONVERSATIONS, {"title": "t", "id": PROBE}),
        "status": Call("POST", CONVERSATIONS, {"title": "t", "status": "archived"}),
        "version": Call("POST", CONVERSATIONS, {"title": "t", "version": 7}),
        "Title": Call("POST", CONVERSATIONS, {"title": "t", "Title": PROBE}),
    },
    "patch_conversation": {
        "owner_id": Call("PATCH", CONVERSATION, {"title": "t", "owner_id": PROBE}),
        "deleted_at": Call("PATCH", CONVERSATION, {"deleted_at": None}),
        "version": Call("PATCH", CONVERSATION, {"title": "t", "version": 99}),
        "message_count": Call("PATCH", CONVERSATION, {"message_count": 0}),
    },
    "create_message": {
        "conversation_id": _message(conversation_id=PROBE),
        "id": _message(id=1),
        "created_at": _message(created_at=PROBE),
    },
    "source": {
        "position": _source(position=3),
        "message_id": _source(message_id=1),
        "href": _source(href=PROBE),
    },
}


@pytest.mark.parametrize("body", UNKNOWN_FIELDS)
async def test_unknown_fields_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    body: str,
) -> None:
    for name, call in UNKNOWN_FIELDS[body].items():
        with subtests.test(name):
            response = await assert_refused(app_client, settings, users, cid, call, 422)
            errors = response.json()["detail"]
            assert [error["type"] for error in errors] == ["extra_forbidden"]


async def test_an_unknown_field_error_names_it_but_never_echoes_a_long_one(
    app_client: httpx.AsyncClient, users: Users
) -> None:
    """The name of an unknown field helps the client (a typo); a huge one is cut short."""
    long_key = "k" * 9000
    short = await app_client.post(
        CONVERSATIONS, json={"title": "t", "titel": "x"}, headers=users.alice
    )
    long = await app_client.post(
        CONVERSATIONS, json={"title": "t", long_key: 1}, headers=users.alice
    )

    assert short.status_code == long.status_code == 422
    assert short.json()["detail"][0]["loc"] == ["body", "titel"]
    echoed = long.json()["detail"][0]["loc"][1]
    assert len(echoed) == 64
    assert echoed.endswith("…")
    assert len(long.content) < 1000


INVALID_VALUES: dict[str, dict[str, Call]] = {
    "role": {
        "admin": _message(role="admin"),
        "wrong_case": _message(role="USER"),
        "empty": _message(role=""),
        "null": _message(role=None),
        "number": _message(role=1),
        "list": _message(role=["user"]),
        "missing": Call("POST", MESSAGES, {"content": PROBE}),
    },
    "message_body": {
        "content_null": _message(content=None),
        "content_number": _message(content=123),
        "sources_not_a_list": _message(sources=f"https://example.com/{PROBE}"),
        "51_sources": _message(sources=[{"url": "https://example.com/"}] * 51),
        "source_without_url": _message(sources=[{"title": PROBE}]),
        "source_not_an_object": _message(sources=[PROBE]),
    },
    "patch_status": {
        "deleted": Call("PATCH", CONVERSATION, {"status": "deleted"}),
        "wrong_case": Call("PATCH", CONVERSATION, {"status": "ACTIVE"}),
        "empty": Call("PATCH", CONVERSATION, {"status": ""}),
        "null": Call("PATCH", CONVERSATION, {"status": None}),
    },
    "patch_nothing_or_null": {
        "empty_body": Call("PATCH", CONVERSATION, {}),
        "null_title": Call("PATCH", CONVERSATION, {"title": None}),
        "null_metadata": Call("PATCH", CONVERSATION, {"metadata": None}),
        "null_title_and_valid_status": Call(
            "PATCH", CONVERSATION, {"title": None, "status": "archived"}
        ),
    },
    "create_title": {
        "missing": Call("POST", CONVERSATIONS, {"metadata": {"x": PROBE}}),
        "null": Call("POST", CONVERSATIONS, {"title": None}),
        "number": Call("POST", CONVERSATIONS, {"title": 42}),
    },
}


@pytest.mark.parametrize("scenario", INVALID_VALUES)
async def test_invalid_values_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    scenario: str,
) -> None:
    for name, call in INVALID_VALUES[scenario].items():
        with subtests.test(name):
            await assert_refused(app_client, settings, users, cid, call, 422)


# -- malformed and oversized bodies ----------------------------------------------------------


BODY_ENDPOINTS = {
    "create_conversation": ("POST", CONVERSATIONS),
    "patch_conversation": ("PATCH", CONVERSATION),
    "create_message": ("POST", MESSAGES),
}

MALFORMED_JSON = {
    "truncated": b'{"title": "zq9-probe"',
    "trailing_comma": b'{"title": "zq9-probe",}',
    "single_quotes": b"{'title': 'zq9-probe'}",
    "trailing_garbage": b'{"title": "zq9-probe"} zq9-probe',
    "form_encoded": b"title=zq9-probe",
    "bare_word": b'{"title": zq9-probe}',
    "empty": b"",
    "array": b"[]",
    "null": b"null",
    "string": b'"zq9-probe"',
}


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_malformed_json_is_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    endpoint: str,
) -> None:
    method, path = BODY_ENDPOINTS[endpoint]
    for name, content in MALFORMED_JSON.items():
        with subtests.test(name):
            call = Call(method, path, content=content)
            await assert_refused(app_client, settings, users, cid, call, 422)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"title": "\xff\xfe"}', id="invalid_utf8"),
        pytest.param(b'{"title": "t", "metadata": {"x": 1' + b"0" * 5000 + b"}}", id="huge_int"),
    ],
)
async def test_undecodable_json_is_refused_with_422(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    content: bytes,
) -> None:
    call = Call("POST", CONVERSATIONS, content=content)
    await assert_refused(app_client, settings, users, cid, call, 422)


def _padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON followed by spaces, ``size`` bytes in all (still valid JSON)."""
    encoded = encode(body)
    assert len(encoded) <= size
    return encoded + b" " * (size - len(encoded))


async def _chunks(content: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


PADDED_BODIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "create_conversation": ("POST", CONVERSATIONS, {"title": PROBE}),
    "create_message": ("POST", MESSAGES, {"role": "user", "content": PROBE * 1000}),
}


def _build(
    client: httpx.AsyncClient, users: Users, cid: str, endpoint: str, size: int, streamed: bool
) -> httpx.Request:
    method, path, body = PADDED_BODIES[endpoint]
    content = _padded(body, size)
    request = client.build_request(
        method,
        path.replace("{cid}", cid),
        content=_chunks(content) if streamed else content,
        headers={**users.alice, "Content-Type": "application/json"},
    )
    # Streamed: no Content-Length, so the middleware must count what it reads.
    assert ("content-length" in request.headers) is not streamed
    return request


@pytest.mark.parametrize("streamed", [False, True], ids=["content_length", "streamed"])
async def test_body_over_1_mib_is_refused_with_413(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    streamed: bool,
) -> None:
    for endpoint in PADDED_BODIES:
        with subtests.test(endpoint):
            before = await snapshot(settings)
            request = _build(app_client, users, cid, endpoint, MIB + 1, streamed)
            response = await app_client.send(request)
            assert response.status_code == 413, response.text[:500]
            assert await snapshot(settings) == before
            assert response.json() == {
                "detail": f"request body larger than {MIB} bytes",
                "code": "request_too_large",
            }
            assert_not_echoed(response)


@pytest.mark.parametrize("streamed", [False, True], ids=["content_length", "streamed"])
async def test_body_of_exactly_1_mib_is_accepted(
    app_client: httpx.AsyncClient,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    streamed: bool,
) -> None:
    for endpoint in PADDED_BODIES:
        with subtests.test(endpoint):
            request = _build(app_client, users, cid, endpoint, MIB, streamed)
            response = await app_client.send(request)
            assert response.status_code == 201, response.text[:500]


# -- malformed ids in the path ---------------------------------------------------------------


MALFORMED_IDS = {
    "not_a_uuid": f"not-a-uuid-{PROBE}",
    "very_long": PROBE * 1200,
    "sql_injection": f"1' OR '1'='1 {PROBE}",
    "drop_table": f"x'; DROP TABLE conversations; -- {PROBE}",
    "unicode": f"会話-ünïcødé-✓-{PROBE}",
    "percent_encoded_NUL": "%00",
    "almost_a_uuid": "12345678-1234-1234-1234-12345678901g",
    "negative_number": "-1",
    "nil_uuid": str(uuid.UUID(int=0)),
    "unknown_uuid": str(uuid.uuid4()),
}

ID_OPERATIONS = {
    "GET": Call("GET", CONVERSATION),
    "PATCH": Call("PATCH", CONVERSATION, {"title": "new"}),
    "DELETE": Call("DELETE", CONVERSATION),
    "restore": Call("POST", CONVERSATION + "/restore"),
    "POST_messages": Call("POST", MESSAGES, {"role": "user", "content": "c"}),
    "GET_messages": Call("GET", MESSAGES),
}


@pytest.mark.parametrize("operation", ID_OPERATIONS)
async def test_malformed_ids_are_not_found(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    operation: str,
) -> None:
    for name, bad_id in MALFORMED_IDS.items():
        with subtests.test(name):
            call = ID_OPERATIONS[operation]
            response = await assert_refused(app_client, settings, users, bad_id, call, 404)
            assert response.json() == {"detail": "conversation not found", "code": "not_found"}


# -- query parameters and headers ------------------------------------------------------------


def _cursor(text_: str) -> str:
    return base64.urlsafe_b64encode(text_.encode()).decode()


# scenario -> variant -> (path, query parameters)
BAD_QUERIES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "messages_paging": {
        "limit_0": (MESSAGES, {"limit": 0}),
        "limit_101": (MESSAGES, {"limit": 101}),
        "limit_not_a_number": (MESSAGES, {"limit": PROBE}),
        "cursor_over_64": (MESSAGES, {"cursor": PROBE * 8}),
    },
    "list_paging": {
        "limit_0": (CONVERSATIONS, {"limit": 0}),
        "limit_101": (CONVERSATIONS, {"limit": 101}),
        "offset_negative": (CONVERSATIONS, {"offset": -1}),
        "offset_over_1000000": (CONVERSATIONS, {"offset": 1_000_001}),
        "offset_not_a_number": (CONVERSATIONS, {"offset": PROBE}),
    },
    "list_sort": {
        "owner_id": (CONVERSATIONS, {"sort": "owner_id"}),
        "desc_owner_id": (CONVERSATIONS, {"sort": "-owner_id"}),
        "password": (CONVERSATIONS, {"sort": "password"}),
        "id": (CONVERSATIONS, {"sort": "id"}),
        "sql": (CONVERSATIONS, {"sort": f"title; DROP TABLE users -- {PROBE}"}),
    },
    "list_dates": {
        "after_naive": (CONVERSATIONS, {"created_after": "2024-01-01T00:00:00"}),
        "before_naive": (CONVERSATIONS, {"created_before": "2024-01-01T00:00:00"}),
        "after_not_a_date": (CONVERSATIONS, {"created_after": PROBE}),
    },
    "list_filters": {
        "status_deleted": (CONVERSATIONS, {"status": "deleted"}),
        "q_with_NUL": (CONVERSATIONS, {"q": f"{PROBE}\x00"}),
        "q_over_200": (CONVERSATIONS, {"q": _sized(201)}),
        "include_deleted_not_bool": (CONVERSATIONS, {"include_deleted": PROBE}),
    },
}


@pytest.mark.parametrize("scenario", BAD_QUERIES)
async def test_bad_query_parameters_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
    scenario: str,
) -> None:
    for name, (path, params) in BAD_QUERIES[scenario].items():
        with subtests.test(name):
            call = Call("GET", path, params=params)
            await assert_refused(app_client, settings, users, cid, call, 422)


MALFORMED_CURSORS = {
    "garbage": PROBE,
    "not_base64": "!!!!",
    "non_ascii": "é",
    "not_digits": _cursor("m:abc"),
    "wrong_prefix": _cursor("x:5"),
    "negative": _cursor("m:-1"),
    "too_many_digits": _cursor("m:" + "9" * 19),
    "bad_padding": _cursor("m:1")[:-1],
}


async def test_malformed_cursors_are_refused(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
) -> None:
    for name, cursor in MALFORMED_CURSORS.items():
        with subtests.test(name):
            call = Call("GET", MESSAGES, params={"cursor": cursor})
            await assert_refused(app_client, settings, users, cid, call, 422)


BAD_IF_MATCH: dict[str, str | bytes] = {
    "word": PROBE,
    "quoted_word": '"abc"',
    "decimal": "1.5",
    "negative": "-1",
    "empty": "",
    "list": '"1", "2"',
    "weak_word": 'W/"x"',
    "too_many_digits": "9" * 19,
    # Latin-1 "²" and "¹": str.isdigit() says yes, int() says no.
    "superscript_two": b"\xb2",
    "weak_superscript_one": b'W/"\xb9"',
}


async def test_if_match_that_is_not_a_version_is_refused_with_400(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
) -> None:
    for name, if_match in BAD_IF_MATCH.items():
        with subtests.test(name):
            call = replace(_patch_title("new"), headers={"If-Match": if_match})
            response = await assert_refused(app_client, settings, users, cid, call, 400)
            assert response.json()["code"] == "bad_request"


# -- authorization ---------------------------------------------------------------------------


BAD_AUTHORIZATION: dict[str, dict[str, str | bytes]] = {
    "missing": {},
    "empty": {"Authorization": ""},
    "bearer_without_key": {"Authorization": "Bearer"},
    "bearer_blank_key": {"Authorization": "Bearer    "},
    "basic": {"Authorization": f"Basic {PROBE}"},
    "no_scheme": {"Authorization": PROBE},
    "unknown_key": {"Authorization": f"Bearer {PROBE}"},
    "unknown_key_with_prefix": {"Authorization": f"Bearer cv_{PROBE * 5}"},
    "key_over_100": {"Authorization": f"Bearer {PROBE * 12}"},
    "sql_injection": {"Authorization": f"Bearer {PROBE}' OR '1'='1"},
    "non_ascii": {"Authorization": "Bearer ключ".encode()},
}


async def test_bad_authorization_is_refused_with_401(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
) -> None:
    variants: dict[str, Mapping[str, str | bytes]] = {
        **BAD_AUTHORIZATION,
        "real_key_with_suffix": {"Authorization": users.alice["Authorization"] + "x"},
        "real_key_without_scheme": {"Authorization": users.alice["Authorization"][7:]},
    }
    for name, auth in variants.items():
        with subtests.test(name):
            call = Call("POST", CONVERSATIONS, {"title": PROBE})
            response = await assert_refused(app_client, settings, users, cid, call, 401, auth=auth)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


AUTHENTICATED_OPERATIONS = {
    "create": Call("POST", CONVERSATIONS, {"title": "t"}),
    "list": Call("GET", CONVERSATIONS),
    **ID_OPERATIONS,
}


async def test_every_endpoint_refuses_a_missing_authorization(
    app_client: httpx.AsyncClient,
    settings: DatabaseSettings,
    users: Users,
    cid: str,
    subtests: pytest.Subtests,
) -> None:
    for name, call in AUTHENTICATED_OPERATIONS.items():
        with subtests.test(name):
            response = await assert_refused(app_client, settings, users, cid, call, 401, auth={})
            assert response.json()["code"] == "unauthorized"
