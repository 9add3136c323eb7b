"""Reusable validators: they reject what the database cannot or must not hold, unchanged."""

import sys
import unicodedata

import pytest

from bastion import check_http_url, check_json_object, check_safe_text
from bastion.validation import (
    _LONE_SURROGATE,
    _URL_UNSAFE,
    ALLOWED_CONTROL_CHARACTERS,
)

EVERY_CHARACTER = [chr(code) for code in range(sys.maxunicode + 1)]


@pytest.mark.parametrize(
    "text", ["plain", "tab\tnew\nline\r", "<b>&amp;</b> 'quotes'", "emoji 🙂 ünïcödé", ""]
)
def test_safe_text_passes_unchanged(text: str) -> None:
    assert check_safe_text(text) is text


@pytest.mark.parametrize(
    "bad", ["nul\x00byte", "bell\x07", "esc\x1b[31m", "del\x7f", "c1\x85", "\ud800"]
)
def test_safe_text_refuses_control_characters_and_lone_surrogates(bad: str) -> None:
    with pytest.raises(ValueError, match=r"position|surrogate"):
        check_safe_text(bad)


def test_safe_text_refuses_exactly_the_control_characters_and_surrogates_unicode_names() -> None:
    # The check is a character class of fixed ranges: it must agree with unicodedata's
    # categories on every code point, not only on the samples above.
    refused = []
    for character in EVERY_CHARACTER:
        try:
            check_safe_text(character)
        except ValueError:
            refused.append(character)
    expected = [
        character
        for character in EVERY_CHARACTER
        if unicodedata.category(character) == "Cs"
        or (unicodedata.category(character) == "Cc" and character not in ALLOWED_CONTROL_CHARACTERS)
    ]
    assert refused == expected
    assert len(refused) == 62 + 2048


def test_the_url_and_json_classes_match_unicodedata_on_every_code_point() -> None:
    everything = "".join(EVERY_CHARACTER)
    url_refused = [found.group() for found in _URL_UNSAFE.finditer(everything)]
    assert url_refused == [
        character
        for character in EVERY_CHARACTER
        if character.isspace() or unicodedata.category(character) in ("Cc", "Cs")
    ]
    surrogates = [found.group() for found in _LONE_SURROGATE.finditer(everything)]
    assert surrogates == [c for c in EVERY_CHARACTER if unicodedata.category(c) == "Cs"]


def test_a_refusal_names_the_first_bad_character_and_its_position() -> None:
    with pytest.raises(ValueError, match=r"control character U\+001B at position 3 "):
        check_safe_text("abc\x1bdef\x00")
    with pytest.raises(ValueError, match=r"lone surrogate U\+DC00 at position 1$"):
        check_safe_text("a\udc00\x00")


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_json_object_depth_limit_is_eight() -> None:
    assert check_json_object(nested(8)) == nested(8)
    with pytest.raises(ValueError, match="deeper than 8"):
        check_json_object(nested(9))


def test_json_object_counts_arrays_as_levels() -> None:
    with pytest.raises(ValueError, match="deeper than 2"):
        check_json_object({"a": [[1]]}, max_depth=2)


def test_json_object_size_limit_is_16_kib_of_utf8() -> None:
    overhead = len('{"k":""}')
    assert check_json_object({"k": "x" * (16 * 1024 - overhead)})
    with pytest.raises(ValueError, match="bytes"):
        check_json_object({"k": "x" * (16 * 1024 - overhead + 1)})
    with pytest.raises(ValueError, match="bytes"):
        check_json_object({"k": "é" * (8 * 1024)})  # 2 bytes each in UTF-8


@pytest.mark.parametrize(
    "bad",
    [{"k": "a\x00b"}, {"a\x00": 1}, {"k": float("nan")}, {"k": [float("inf")]}, {"k": "\udfff"}],
)
def test_json_object_refuses_what_jsonb_cannot_store(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"NUL|non-finite|surrogate"):
        check_json_object(bad)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "https://example.com/a?b=c#d",
        "HTTPS://EXAMPLE.COM",
        "http://[::1]:8080/",
    ],
)
def test_http_urls_pass_unchanged(url: str) -> None:
    assert check_http_url(url) is url


@pytest.mark.parametrize(
    "bad",
    [
        "javascript:alert(1)",
        "file:///etc/passwd",
        "ftp://example.com",
        "data:text/html,hi",
        "/relative/path",
        "https://",
        "http://exa mple.com",
        "http://example.com:99999999/",
        "https://example.com/\x00",
        "https://example.com/" + "a" * 2030,
    ],
)
def test_other_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        check_http_url(bad)


def test_url_length_limit_is_2048() -> None:
    base = "https://example.com/"
    assert check_http_url(base + "a" * (2048 - len(base)))
    with pytest.raises(ValueError, match="2048"):
        check_http_url(base + "a" * (2049 - len(base)))
