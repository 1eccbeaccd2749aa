"""The plaintext KEKs of one job, as they travel from the driver to the tasks.

A :class:`JobKeys` lives in driver and executor memory for the length of one
job. It pickles with its keys (Spark ships it inside task payloads, which is why
clusters must run with ``spark.network.crypto.enabled``), but its ``repr`` and
``str`` show only the key ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from spark_kms.errors import InvalidOptionError, KeyNotFoundError

__all__ = ["KEY_ID_PATTERN", "JobKeys", "check_name"]

# Parquet's column-key option syntax reserves ':' ';' and ',', so key ids use
# only these characters.
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid table or key group name.

    Names become part of key ids and HSM labels, so they are limited to
    letters, digits, ``_`` and ``-`` (1 to 64 characters).

    :raises InvalidOptionError: naming ``kind`` and the value otherwise.
    """
    if not _NAME_PATTERN.match(value):
        raise InvalidOptionError(
            f"invalid {kind} name {value!r}: use 1 to 64 letters, digits, '_' or '-' "
            "(':', ',', ';' and '.' are reserved by the key id syntax)"
        )
    return value


class JobKeys:
    """KEKs by key id, for wrapping and unwrapping DEKs in one job.

    :param keys: mapping of KEK id to KEK bytes (16, 24 or 32 bytes).
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for key_id in keys:
            if not KEY_ID_PATTERN.match(key_id):
                raise InvalidOptionError(f"invalid key id {key_id!r}")
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"JobKeys(key_ids={sorted(self._keys)!r})"

    __str__ = __repr__

    def __getstate__(self) -> dict[str, bytes]:
        return self._keys

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self._keys = state

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        """The KEK ids, sorted."""
        return sorted(self._keys)

    def kek(self, key_id: str) -> bytes:
        """Return the KEK with id ``key_id``.

        :raises KeyNotFoundError: if this job was not given that KEK.
        """
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyNotFoundError(
                f"KEK '{key_id}' is not among the keys given to this job; the file was "
                "written under a KEK the driver did not unwrap"
            ) from None

    def subset(self, key_ids: Iterable[str]) -> JobKeys:
        """Return the keys whose ids are in ``key_ids``."""
        wanted = set(key_ids)
        return JobKeys({k: v for k, v in self._keys.items() if k in wanted})

    def merged(self, other: JobKeys) -> JobKeys:
        """Return the keys of both sets."""
        return JobKeys({**self._keys, **other._keys})
