"""Reusable validators: they reject what the database cannot or must not hold, unchanged."""

import pytest

from bastion import check_http_url, check_json_object, check_safe_text


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
