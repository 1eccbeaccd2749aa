"""Writer option parsing."""

from __future__ import annotations

import pytest

from spark_kms.errors import InvalidOptionError, SparkKmsError
from spark_kms.options import append_column_keys, parse_column_keys, parse_write_options


def test_column_keys_two_groups() -> None:
    groups = parse_column_keys("pii: tailnum, flight; geo: origin")
    assert groups == {"pii": ["tailnum", "flight"], "geo": ["origin"]}


def test_column_keys_empty_text() -> None:
    assert parse_column_keys("") == {}


def test_write_options_defaults() -> None:
    options = parse_write_options({"kms.table": "flights", "path": "/x"})
    assert options.table == "flights"
    assert options.column_keys == {}


def test_write_options_case_insensitive_keys() -> None:
    options = parse_write_options({"KMS.Table": "flights", "kms.COLUMN_KEYS": "pii: a"})
    assert options.column_keys == {"pii": ["a"]}


def test_missing_table_option() -> None:
    with pytest.raises(InvalidOptionError, match="missing option kms.table"):
        parse_write_options({"path": "/x"})


@pytest.mark.parametrize("name", ["a:b", "a,b", "a;b", "a.b", "x" * 65, "spaced name", "naïve"])
def test_invalid_table_name(name: str) -> None:
    with pytest.raises(InvalidOptionError, match="invalid table name"):
        parse_write_options({"kms.table": name})


def test_blank_table_option() -> None:
    with pytest.raises(InvalidOptionError, match="missing option kms.table"):
        parse_write_options({"kms.table": "  "})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("pii tailnum", "expected 'group: column, column'", id="no-colon"),
        pytest.param("p,ii: tailnum", "invalid key group name", id="comma-in-group"),
        pytest.param("p.ii: tailnum", "invalid key group name", id="dot-in-group"),
        pytest.param("table: tailnum", "reserved", id="reserved-group"),
        pytest.param("pii: a; pii: b", "appears twice", id="group-twice"),
        pytest.param("pii: a; geo: a", "listed under key groups 'pii' and 'geo'", id="column-twice"),
        pytest.param("pii: a,, b", "empty column name", id="empty-column"),
        pytest.param(": a", "invalid key group name", id="empty-group"),
        pytest.param("pii: a: b", "a column name cannot contain ':'", id="colon-in-column"),
    ],
)
def test_invalid_column_keys(text: str, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        parse_column_keys(text)


def test_unknown_kms_option() -> None:
    with pytest.raises(InvalidOptionError, match="unknown option"):
        parse_write_options({"kms.table": "t", "kms.colum_keys": "pii: a"})


def test_option_errors_share_root() -> None:
    assert issubclass(InvalidOptionError, SparkKmsError)


def test_append_column_keys_cases() -> None:
    stored = {"pii": ["tailnum", "flight"]}
    keep = {"option": "kms.column_keys", "overwrite": "mode('overwrite')"}
    assert append_column_keys("t", None, {"geo": ["origin"]}, **keep) == {"geo": ["origin"]}
    assert append_column_keys("t", stored, None, **keep) == stored
    assert append_column_keys("t", stored, {}, **keep) == stored
    assert append_column_keys("t", stored, {"pii": ["flight", "tailnum"]}, **keep) == {
        "pii": ["flight", "tailnum"]
    }
    with pytest.raises(InvalidOptionError, match="its files keep kms.column_keys 'pii: tailnum, flight'"):
        append_column_keys("t", stored, {"geo": ["origin"]}, **keep)
