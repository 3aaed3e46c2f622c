"""Where the shared auth token comes from (``chainfed.proto.auth_token``): a file only its
owner reads, the environment, or the flag; and what a bad source says."""

import pytest

from chainfed.proto.auth_token import (
    TOKEN_ENV,
    read_token_file,
    resolve_token,
    write_token_file,
)
from chainfed.proto.errors import ChainFedError


def test_written_token_file_is_owner_only_and_reads_back(tmp_path):
    path = tmp_path / "token"
    path.write_text("old")
    path.chmod(0o644)

    write_token_file(path, "-starts-with-a-dash")

    assert path.stat().st_mode & 0o777 == 0o600
    assert read_token_file(path) == "-starts-with-a-dash"


def test_sources_in_order_flag_file_environment(tmp_path):
    path = write_token_file(tmp_path / "token", "from-file")
    env = {TOKEN_ENV: "from-env"}

    assert resolve_token(None, path, env) == "from-file"
    assert resolve_token("from-flag", None, env) == "from-flag"
    assert resolve_token(None, None, env) == "from-env"
    assert resolve_token(None, None, {}) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the token file"), ("  \n", "the token file is empty")],
)
def test_a_bad_token_file_names_itself(tmp_path, content, message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ChainFedError, match=message) as caught:
        read_token_file(path)

    assert str(path) in str(caught.value)


def test_both_flags_at_once_is_an_error(tmp_path):
    path = write_token_file(tmp_path / "token", "t")

    with pytest.raises(ChainFedError, match="not both"):
        resolve_token("t", path, {})
