"""Writer options and settings of the key lifecycle: partition column and rotation period."""

from __future__ import annotations

import pytest

from spark_kms.errors import InvalidOptionError
from spark_kms.options import parse_write_options
from spark_kms.settings import KmsSettings

BASE = {
    "spark.kms.hsm.module": "/usr/lib/softhsm/libsofthsm2.so",
    "spark.kms.hsm.token": "spark-kms",
    "spark.kms.hsm.pin.file": "/tmp/pin",
    "spark.kms.registry": "/tmp/registry",
    "spark.kms.audit.log": "/tmp/audit.log",
}


def test_lifecycle_writer_options() -> None:
    options = parse_write_options(
        {"kms.table": "orders", "kms.partition_by": " customer_id ", "kms.rotation_period_days": "90"}
    )
    assert options.partition_by == "customer_id"
    assert options.rotation_period_days == 90
    plain = parse_write_options({"kms.table": "orders"})
    assert plain.partition_by is None
    assert plain.rotation_period_days is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"kms.partition_by": "_hidden"}, "folders that start with '_' or '.' are not read", id="underscore"),
        pytest.param({"kms.rotation_period_days": "-1"}, "invalid rotation period '-1' \\(kms.rotation_period_days\\)", id="negative"),
        pytest.param({"kms.rotation_period_days": "weekly"}, "give whole days from 1 to 3650, or 0", id="not-a-number"),
        pytest.param({"kms.rotation_period_days": "3651"}, "invalid rotation period '3651'", id="too-long"),
    ],
)
def test_lifecycle_option_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        parse_write_options({"kms.table": "orders", **options})


def test_rotation_period_setting() -> None:
    assert KmsSettings.from_properties(BASE).rotation_period_days == 365
    settings = KmsSettings.from_properties({**BASE, "spark.kms.rotation.period.days": "0"})
    assert settings.rotation_period_days == 0
    assert KmsSettings.from_properties(settings.to_properties()) == settings
    with pytest.raises(InvalidOptionError, match="spark.kms.rotation.period.days"):
        KmsSettings.from_properties({**BASE, "spark.kms.rotation.period.days": "1y"})
