"""The validation pieces the repository's callers use: ids, normalised text."""

from __future__ import annotations

import unicodedata
import uuid
from typing import Annotated

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from bastion import IntId, NormalizedText, UUIDText, check_int_id, check_uuid


class Named(BaseModel):
    name: Annotated[NormalizedText, Field(max_length=10)]
    ref: UUIDText | None = None
    id: IntId | None = None


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=10))
def test_normalized_text_is_stored_in_nfc(text: str) -> None:
    assert Named(name=text).name == unicodedata.normalize("NFC", text)


def test_composed_and_decomposed_spellings_become_one_name() -> None:
    assert Named(name="Cafe\u0301").name == Named(name="Caf\u00e9").name == "Caf\u00e9"
    with pytest.raises(ValidationError, match="control character U\\+0000"):
        Named(name="a\x00b")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-uuid",
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678-1234-5678-1234-56781234567g",
        "\uff11" * 8 + "-1234-5678-1234-567812345678",  # fullwidth digits
    ],
)
def test_only_canonical_uuid_text_is_an_id(bad: str) -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        check_uuid(bad)
    with pytest.raises(ValidationError):
        Named(name="x", ref=bad)  # type: ignore[arg-type]


def test_uuid_text_in_both_forms_is_accepted() -> None:
    value = uuid.uuid4()
    assert check_uuid(str(value)) == check_uuid(value.hex) == value
    assert Named(name="x", ref=str(value)).ref == value  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2**63])
def test_int_ids_fit_a_64_bit_key(bad: int) -> None:
    with pytest.raises(ValueError, match="an id is a whole number"):
        check_int_id(bad)
    assert check_int_id(2**63 - 1) == 2**63 - 1
