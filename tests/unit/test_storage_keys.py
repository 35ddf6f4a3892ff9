from __future__ import annotations

import re

import pytest

from services.contracts.errors import InvalidRequestError
from services.contracts.storage import check_key, new_key


def test_generated_keys_are_unique_and_valid() -> None:
    keys = {new_key("image", ".png") for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert re.fullmatch(r"image/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.png", key)
        assert check_key(key) == key


@pytest.mark.parametrize("kind", ["../x", "Image", "a/b", ""])
def test_kind_is_checked(kind: str) -> None:
    with pytest.raises(InvalidRequestError):
        new_key(kind)


def test_uid_must_be_hex() -> None:
    with pytest.raises(InvalidRequestError):
        new_key("image", uid="../../x")


def test_a_final_newline_is_no_part_of_a_key_or_a_metadata_name() -> None:
    # re's "$" also matches before a final newline: with match(), both passed.
    from services.contracts.storage import check_metadata

    key = new_key("image", ".png")
    with pytest.raises(InvalidRequestError):
        check_key(key + "\n")
    assert check_metadata({"batch": "2"}) == {"batch": "2"}
    with pytest.raises(InvalidRequestError):
        check_metadata({"batch\n": "2"})
