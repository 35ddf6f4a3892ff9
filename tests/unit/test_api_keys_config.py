from __future__ import annotations

from pathlib import Path

import pytest

from gateway.security import ApiKeys
from services.cli.compose import api_keys
from services.contracts.errors import AuthenticationError, ConfigurationError
from services.contracts.settings import Settings


def test_keys_from_env_and_file_together(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team a\nsk-file-1\n\n  sk-file-2  \n")
    keys = api_keys(Settings(api_keys="sk-env", api_keys_file=keys_file))
    assert keys == ["sk-env", "sk-file-1", "sk-file-2"]
    checker = ApiKeys(keys)
    assert checker.owner("Bearer sk-file-2") != checker.owner("Bearer sk-env")
    with pytest.raises(AuthenticationError):
        checker.owner("Bearer # team a")


def test_no_keys_means_auth_off() -> None:
    assert api_keys(Settings()) is None


def test_unreadable_or_empty_file_stops_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="NEXTGPT_API_KEYS_FILE: cannot read"):
        api_keys(Settings(api_keys_file=tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    with pytest.raises(ConfigurationError, match="holds no key"):
        api_keys(Settings(api_keys_file=empty))
