"""Driver-side settings of spark_kms, read from ``spark.kms.*`` properties.

The same keys work in ``spark-defaults.conf``, ``--conf`` on ``spark-submit``,
the session builder, and the properties file the ``spark-kms`` command line
reads (``--conf-file`` or the ``SPARK_KMS_CONF`` environment variable).

A PIN never appears here: the settings name the 0600 file or the environment
variable that contains it, and :mod:`spark_kms.hsm` reads it at login.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spark_kms.errors import ConfigurationError, InvalidOptionError

__all__ = ["KmsSettings", "load_properties_file", "parse_rotation_period"]

PREFIX = "spark.kms."

MODULE = "spark.kms.hsm.module"
TOKEN = "spark.kms.hsm.token"
PIN_FILE = "spark.kms.hsm.pin.file"
PIN_ENV = "spark.kms.hsm.pin.env"
SOFTHSM2_CONF = "spark.kms.hsm.softhsm2.conf"
REGISTRY = "spark.kms.registry"
AUDIT_LOG = "spark.kms.audit.log"
POLICY_FILE = "spark.kms.policy.file"
ROTATION_PERIOD_DAYS = "spark.kms.rotation.period.days"

_KNOWN = {
    MODULE,
    TOKEN,
    PIN_FILE,
    PIN_ENV,
    SOFTHSM2_CONF,
    REGISTRY,
    AUDIT_LOG,
    POLICY_FILE,
    ROTATION_PERIOD_DAYS,
}
DEFAULT_ROTATION_PERIOD_DAYS = 365
MAX_ROTATION_PERIOD_DAYS = 3650


@dataclass(frozen=True)
class KmsSettings:
    """Locations of the HSM, the table registry and the audit log.

    :param module_path: PKCS#11 module (``spark.kms.hsm.module``), required.
    :param token_label: token label (``spark.kms.hsm.token``), required.
    :param pin_file: file holding the user PIN, mode 0600 (``spark.kms.hsm.pin.file``).
    :param pin_env: environment variable holding the user PIN (``spark.kms.hsm.pin.env``);
        exactly one of ``pin_file`` and ``pin_env`` is required.
    :param softhsm2_conf: exported as ``SOFTHSM2_CONF`` before the module loads
        (``spark.kms.hsm.softhsm2.conf``), optional; only SoftHSM2 reads it.
    :param registry_dir: folder of the table registry, which maps table names to
        locations and keeps erasure tombstones (``spark.kms.registry``), required.
    :param audit_log: JSON-lines audit log (``spark.kms.audit.log``), required.
    :param policy_file: access policy (``spark.kms.policy.file``); without it
        every principal may do every operation.
    :param rotation_period_days: master-key rotation period of new tables, in
        days (``spark.kms.rotation.period.days``, default 365, 0 turns
        automatic rotation off, at most 3650).
    """

    module_path: str
    token_label: str
    registry_dir: str
    audit_log: str
    pin_file: str | None = None
    pin_env: str | None = None
    softhsm2_conf: str | None = None
    policy_file: str | None = None
    rotation_period_days: int = DEFAULT_ROTATION_PERIOD_DAYS

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> KmsSettings:
        """Build settings from ``spark.kms.*`` properties.

        :raises ConfigurationError: if a required key is missing, a key under
            ``spark.kms.`` is unknown, or both or neither PIN sources are set.
        """
        ours = {k: v.strip() for k, v in properties.items() if k.startswith(PREFIX)}
        unknown = sorted(k for k in ours if k not in _KNOWN)
        if unknown:
            raise ConfigurationError(
                f"unknown spark_kms setting(s): {', '.join(unknown)}; "
                f"valid keys are {', '.join(sorted(_KNOWN))}"
            )
        missing = [k for k in (MODULE, TOKEN, REGISTRY, AUDIT_LOG) if not ours.get(k)]
        if missing:
            raise ConfigurationError(
                f"missing spark_kms setting(s): {', '.join(missing)}; set them with --conf, "
                "in spark-defaults.conf or in the properties file (make bootstrap writes "
                ".state/spark-kms.conf)"
            )
        pin_file = ours.get(PIN_FILE) or None
        pin_env = ours.get(PIN_ENV) or None
        if (pin_file is None) == (pin_env is None):
            raise ConfigurationError(
                f"set exactly one PIN source: {PIN_FILE} (a file of mode 0600) "
                f"or {PIN_ENV} (the name of an environment variable)"
            )
        return cls(
            module_path=ours[MODULE],
            token_label=ours[TOKEN],
            registry_dir=ours[REGISTRY],
            audit_log=ours[AUDIT_LOG],
            pin_file=pin_file,
            pin_env=pin_env,
            softhsm2_conf=ours.get(SOFTHSM2_CONF) or None,
            policy_file=ours.get(POLICY_FILE) or None,
            rotation_period_days=parse_rotation_period(
                ours.get(ROTATION_PERIOD_DAYS) or str(DEFAULT_ROTATION_PERIOD_DAYS),
                ROTATION_PERIOD_DAYS,
            ),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KmsSettings:
        """Build settings from a ``spark-defaults.conf``-style properties file.

        :raises ConfigurationError: if the file cannot be read or lacks a required key.
        """
        return cls.from_properties(load_properties_file(path))

    @classmethod
    def from_environment(cls) -> KmsSettings:
        """Build settings from the file named by ``SPARK_KMS_CONF``.

        :raises ConfigurationError: if ``SPARK_KMS_CONF`` is not set.
        """
        path = os.environ.get("SPARK_KMS_CONF")
        if not path:
            raise ConfigurationError(
                "no spark_kms settings: pass --conf-file or set SPARK_KMS_CONF to a "
                "properties file with spark.kms.* keys (for example .state/spark-kms.conf)"
            )
        return cls.from_file(path)

    def to_properties(self) -> dict[str, str]:
        """Return the settings as ``spark.kms.*`` properties, leaving out unset ones."""
        pairs = {
            MODULE: self.module_path,
            TOKEN: self.token_label,
            PIN_FILE: self.pin_file,
            PIN_ENV: self.pin_env,
            SOFTHSM2_CONF: self.softhsm2_conf,
            REGISTRY: self.registry_dir,
            AUDIT_LOG: self.audit_log,
            POLICY_FILE: self.policy_file,
            ROTATION_PERIOD_DAYS: str(self.rotation_period_days),
        }
        return {k: v for k, v in pairs.items() if v is not None}


def parse_rotation_period(text: str, source: str) -> int:
    """Parse a rotation period in whole days: 0 (automatic rotation off) to 3650.

    :raises InvalidOptionError: naming ``source`` if the text is not such a number.
    """
    try:
        days = int(text.strip())
    except ValueError:
        days = -1
    if not 0 <= days <= MAX_ROTATION_PERIOD_DAYS:
        raise InvalidOptionError(
            f"invalid rotation period {text!r} ({source}): give whole days from 1 to "
            f"{MAX_ROTATION_PERIOD_DAYS}, or 0 to turn automatic rotation off"
        )
    return days


def load_properties_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a Java-style properties file of ``key value`` or ``key=value`` lines.

    :raises ConfigurationError: if the file cannot be read or is not UTF-8.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"cannot read properties file {path}: {error.strerror}") from error
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"properties file {path} is not UTF-8 text; save it as UTF-8"
        ) from None
    properties: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.replace("=", " ", 1).partition(" ")
        properties[key.strip()] = value.strip()
    return properties
