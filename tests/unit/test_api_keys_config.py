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


def test_a_key_removed_from_the_file_stops_working_without_a_restart(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The file is read again when it changes (a rotated Kubernetes Secret): a revoked key is refused, a new one
    accepted, the environment's keys stay; a change that leaves it empty or unreadable keeps what it held."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-old\n")
    checker = ApiKeys(["sk-env"], keys_file, recheck_s=0.0)
    old = checker.owner("Bearer sk-old")
    keys_file.write_text("sk-new\n# sk-old revoked\n")
    with pytest.raises(AuthenticationError):
        checker.owner("Bearer sk-old")
    assert checker.owner("Bearer sk-new") not in (None, old) and checker.owner("Bearer sk-env")
    keys_file.write_text("# being rewritten\n")
    assert checker.owner("Bearer sk-new") and "holds no key" in caplog.text
    keys_file.unlink()
    assert checker.owner("Bearer sk-new")
    keys_file.write_text("sk-third\n")
    assert checker.owner("Bearer sk-third")
    with pytest.raises(AuthenticationError):
        checker.owner("Bearer sk-new")


def test_the_file_is_looked_at_no_more_often_than_asked(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-a\n")
    checker = ApiKeys(None, keys_file, recheck_s=3600)
    keys_file.write_text("sk-b\n")
    assert checker.owner("Bearer sk-a")  # not looked at again yet: an hour between looks
    with pytest.raises(AuthenticationError):
        checker.owner("Bearer sk-b")


def test_the_gateway_watches_the_file_it_was_given(tmp_path: Path) -> None:
    from services.cli.compose import _keys_and_signer

    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-a\n")
    checker, _ = _keys_and_signer(Settings(api_keys="sk-env", api_keys_file=keys_file))
    checker.recheck_s, checker._next_check = 0.0, 0.0  # the five seconds between looks, elapsed
    keys_file.write_text("sk-b\n")
    with pytest.raises(AuthenticationError):
        checker.owner("Bearer sk-a")
    assert checker.owner("Bearer sk-b") and checker.owner("Bearer sk-env")
