"""HSM access through PKCS#11 (python-pkcs11), on the driver only.

This module does not depend on Spark or on tables. It loads one PKCS#11 module,
logs in to one token with a PIN read from a file or an environment variable,
and keeps a pool of logged-in sessions. Several driver threads may call it at
once: calls into the module are serialized by one process-wide lock, which
costs nothing that matters because the HSM is called a few times per job.

Master keys are AES-256 secret keys created with ``CKA_SENSITIVE`` and without
``CKA_EXTRACTABLE``, so their value never leaves the token. Wrapping uses
``CKM_AES_GCM`` inside the token (PKCS#11 v2.40 section 2.10.5) with a random
96-bit nonce and a 128-bit tag.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as pkcs11_errors
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from spark_kms.errors import (
    AmbiguousKeyError,
    ConfigurationError,
    HsmUnavailableError,
    IntegrityError,
    KeyNotFoundError,
    SparkKmsError,
)

__all__ = ["GCM_NONCE_LENGTH", "Hsm", "HsmBatch", "HsmStats", "read_pin"]

log = logging.getLogger(__name__)

GCM_NONCE_LENGTH = 12
GCM_TAG_BITS = 128
MASTER_KEY_BITS = 256
REQUIRED_MECHANISMS = (Mechanism.AES_KEY_GEN, Mechanism.AES_GCM)

# python-pkcs11 can load only one PKCS#11 module per process.
_LIBRARIES: dict[str, Any] = {}
_LIBRARY_LOCK = threading.Lock()

# python-pkcs11 0.10 calls C_Initialize(NULL), which tells the module that the
# application does its own locking (PKCS#11 v2.40 section 5.4), and SoftHSM2
# then crashes under concurrent calls. Every call into the module holds this lock.
_CALL_LOCK = threading.RLock()

# Bumped each time the module is re-initialized, which ends every session of
# the process; each Hsm then drops its pooled sessions and finds its token again.
_GENERATION = [0]


@dataclass
class HsmStats:
    """Counters of PKCS#11 operations made through one :class:`Hsm`."""

    encrypt: int = 0
    decrypt: int = 0
    generate: int = 0
    destroy: int = 0

    @property
    def key_operations(self) -> int:
        """Number of cryptographic and key-management calls."""
        return self.encrypt + self.decrypt + self.generate + self.destroy


def read_pin(*, pin_file: str | None, pin_env: str | None) -> str:
    """Read the user PIN from a 0600 file or an environment variable.

    :raises ConfigurationError: if the source is missing, empty, or a file that
        the group or others can read.
    """
    if pin_file:
        try:
            info = os.stat(pin_file)
        except OSError as error:
            raise ConfigurationError(
                f"cannot read the PIN file {pin_file}: {error.strerror}"
            ) from error
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"the PIN file {pin_file} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):o}); run 'chmod 600 {pin_file}'"
            )
        with open(pin_file, encoding="utf-8") as handle:
            pin = handle.read().strip()
        source = f"file {pin_file}"
    elif pin_env:
        pin = os.environ.get(pin_env, "").strip()
        source = f"environment variable {pin_env}"
    else:
        raise ConfigurationError(
            "no PIN source: set spark.kms.hsm.pin.file or spark.kms.hsm.pin.env"
        )
    if not pin:
        raise ConfigurationError(f"the PIN {source} is empty or not set")
    return pin


class Hsm:
    """A logged-in connection to one PKCS#11 token.

    :param module_path: path of the PKCS#11 module (``.so``).
    :param token_label: label of the token to use.
    :param pin_file: file that contains the user PIN (mode 0600).
    :param pin_env: environment variable that contains the user PIN.
    :param softhsm2_conf: when given, exported as ``SOFTHSM2_CONF`` before the
        module loads (SoftHSM2 reads its token folder from it).
    :raises ConfigurationError: if the module cannot be loaded or the PIN source is invalid.
    :raises HsmUnavailableError: if the token is missing, the login fails or a
        required mechanism is not offered.
    """

    def __init__(
        self,
        *,
        module_path: str,
        token_label: str,
        pin_file: str | None = None,
        pin_env: str | None = None,
        softhsm2_conf: str | None = None,
    ) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self.stats = HsmStats()
        self._pin_file = pin_file
        self._pin_env = pin_env
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._closed = False

        if softhsm2_conf:
            os.environ["SOFTHSM2_CONF"] = softhsm2_conf
        with _CALL_LOCK:
            self._lib = _load_library(module_path)
            self._generation = _GENERATION[0]
            self._token = self._find_token()
            self._check_mechanisms()
            # Log in once now, so that a wrong PIN fails at start-up and not in a job.
            self._pool.put(self._open_session())

    def __repr__(self) -> str:
        return f"Hsm(module_path={self.module_path!r}, token_label={self.token_label!r})"

    def close(self) -> None:
        """Close every pooled session."""
        self._closed = True
        with _CALL_LOCK:
            self._drain_pool()

    def _drain_pool(self) -> None:
        while True:
            try:
                session = self._pool.get_nowait()
            except queue.Empty:
                break
            _close_quietly(session)

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _find_token(self) -> Any:
        try:
            tokens = list(self._lib.get_tokens(token_label=self.token_label))
        except pkcs11_errors.PKCS11Error as error:
            raise HsmUnavailableError(
                f"cannot list the tokens of PKCS#11 module {self.module_path}: "
                f"{type(error).__name__}"
            ) from error
        if not tokens:
            raise HsmUnavailableError(
                f"no token labelled '{self.token_label}' in PKCS#11 module {self.module_path}; "
                "check spark.kms.hsm.token, or initialize the token (make bootstrap does it "
                "for SoftHSM2)"
            )
        if len(tokens) > 1:
            raise HsmUnavailableError(
                f"{len(tokens)} tokens are labelled '{self.token_label}'; give each token a "
                "unique label"
            )
        return tokens[0]

    def _check_mechanisms(self) -> None:
        try:
            offered = set(self._token.slot.get_mechanisms())
        except pkcs11_errors.PKCS11Error as error:
            raise HsmUnavailableError(
                f"cannot list the mechanisms of token '{self.token_label}': {type(error).__name__}"
            ) from error
        missing = [m.name for m in REQUIRED_MECHANISMS if m not in offered]
        if missing:
            raise HsmUnavailableError(
                f"token '{self.token_label}' does not offer mechanism(s) {', '.join(missing)}; "
                "spark_kms needs AES key generation and AES-GCM inside the token"
            )

    def _open_session(self, *, reconnect: bool = True) -> Any:
        pin = read_pin(pin_file=self._pin_file, pin_env=self._pin_env)
        try:
            session = self._open_logged_in(pin)
        except (pkcs11_errors.GeneralError, *_SESSION_LOST) as error:
            if not reconnect:
                raise HsmUnavailableError(
                    f"cannot open a session on token '{self.token_label}': {type(error).__name__}"
                ) from error
            # SoftHSM2 2.6 refuses new sessions with CKR_GENERAL_ERROR after its
            # token folder was unwritable, until the module is re-initialized;
            # a hardware token that was reinserted needs the same.
            log.warning(
                "opening a session on token %s failed (%s); re-initializing the module once",
                self.token_label,
                type(error).__name__,
            )
            self._reinitialize()
            return self._open_session(reconnect=False)
        except pkcs11_errors.PinIncorrect:
            raise HsmUnavailableError(
                f"login to token '{self.token_label}' failed: the PIN is incorrect; "
                "check the PIN source (spark.kms.hsm.pin.file or spark.kms.hsm.pin.env)"
            ) from None
        except pkcs11_errors.PinLocked:
            raise HsmUnavailableError(
                f"login to token '{self.token_label}' failed: the user PIN is locked; "
                "the token's security officer must reset it"
            ) from None
        except pkcs11_errors.PKCS11Error as error:
            raise HsmUnavailableError(
                f"cannot open a session on token '{self.token_label}': {type(error).__name__}"
            ) from error
        finally:
            del pin
        with self._lock:
            self._opened += 1
        return session

    def _open_logged_in(self, pin: str) -> Any:
        # A PKCS#11 login belongs to the application, not to one session: while
        # any session is logged in, a new one is too, and logging in again fails.
        try:
            return self._token.open(rw=True, user_pin=pin)
        except pkcs11_errors.UserAlreadyLoggedIn:
            return self._token.open(rw=True)

    @contextmanager
    def session(self) -> Iterator[Any]:
        """Lend a logged-in session from the pool for one operation.

        :raises HsmUnavailableError: if a new session cannot be opened.
        """
        if self._closed:
            raise HsmUnavailableError(f"the connection to token '{self.token_label}' is closed")
        with _CALL_LOCK:
            self._follow_reinitialization()
            try:
                session = self._pool.get_nowait()
            except queue.Empty:
                session = self._open_session()
            generation = _GENERATION[0]
            healthy = True
            try:
                yield session
            except pkcs11_errors.PKCS11Error as error:
                healthy = not isinstance(error, _SESSION_LOST)
                raise _translate(error, self.token_label) from error
            finally:
                if generation != _GENERATION[0]:
                    # A re-initialization while the session was lent ended it.
                    # Closing it would send a handle that may now belong to a new
                    # session, and _follow_reinitialization resets the count.
                    pass
                elif healthy:
                    self._pool.put(session)
                else:
                    _close_quietly(session)
                    with self._lock:
                        self._opened -= 1

    def _follow_reinitialization(self) -> None:
        # Called with _CALL_LOCK held.
        if self._generation == _GENERATION[0]:
            return
        # C_Finalize closed these sessions. Closing them again would send
        # C_Logout with a handle that may now belong to a new session.
        while not self._pool.empty():
            self._pool.get_nowait()
        with self._lock:
            self._opened = 0
        self._token = self._find_token()
        self._generation = _GENERATION[0]

    def _reinitialize(self) -> None:
        # SoftHSM2 2.6 keeps a per-process view of the token's objects, and a
        # C_DestroyObject that fails to delete the object's file (for example
        # in a read-only token folder) still removes the object from that view:
        # every session of this process, new ones included, then misses a key
        # that other processes still find. C_Finalize and C_Initialize make the
        # module read the token again.
        with _CALL_LOCK:
            self._lib.reinitialize()
            _GENERATION[0] += 1
            self._follow_reinitialization()
        log.info(
            "re-initialized PKCS#11 module %s to reread token %s",
            self.module_path,
            self.token_label,
        )

    def find_key(self, label: str) -> Any:
        """Return the one secret key object labelled ``label``.

        Call it inside :meth:`session` and pass that session's key objects only
        to the same session.

        :raises KeyNotFoundError: if no secret key has this label.
        :raises AmbiguousKeyError: if several secret keys have this label.
        """
        with self.session() as session:
            return self._find_key_in(session, label)

    def _find_key_in(self, session: Any, label: str) -> Any:
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        )
        if not found:
            self._check_token_reachable()
            raise KeyNotFoundError(f"no key labelled '{label}' in token '{self.token_label}'")
        if len(found) > 1:
            raise AmbiguousKeyError(
                f"{len(found)} keys are labelled '{label}' in token '{self.token_label}'; "
                "a master key label must be unique, so remove the extra objects"
            )
        return found[0]

    def _check_token_reachable(self) -> None:
        # SoftHSM2 2.6 lists no objects, without an error, once its token
        # folder is gone; only C_GetTokenInfo fails. An empty result is
        # trusted only while the token still answers, so that an unreachable
        # token is never taken for a destroyed key.
        try:
            self._token.slot.get_token()
        except pkcs11_errors.PKCS11Error as error:
            raise HsmUnavailableError(
                f"token '{self.token_label}' is not reachable ({type(error).__name__}); "
                "check that the HSM is up (for SoftHSM2, that its token folder exists) and retry"
            ) from None

    def key_exists(self, label: str) -> bool:
        """Tell whether exactly one secret key is labelled ``label``.

        :raises AmbiguousKeyError: if several secret keys have this label.
        """
        try:
            self.find_key(label)
        except KeyNotFoundError:
            return False
        return True

    def count_keys(self, label: str, *, fresh_session: bool = False) -> int:
        """Count the secret keys labelled ``label``.

        :param fresh_session: re-initialize the module and count in a new
            session, so that the count is what the token stores and not what
            this process's view of it holds; this ends every other session of
            the process, which the pools reopen on their next use.
        """
        query = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        if not fresh_session:
            with self.session() as session:
                count = len(list(session.get_objects(query)))
                if not count:
                    self._check_token_reachable()
                return count
        with _CALL_LOCK:
            self._reinitialize()
            session = self._open_session()
            try:
                count = len(list(session.get_objects(query)))
                if not count:
                    self._check_token_reachable()
                return count
            except pkcs11_errors.PKCS11Error as error:
                raise _translate(error, self.token_label) from error
            finally:
                _close_quietly(session)
                with self._lock:
                    self._opened -= 1

    def list_key_labels(self, prefix: str = "") -> list[str]:
        """Return the labels of every secret key whose label starts with ``prefix``."""
        with self.session() as session:
            labels = [
                obj[Attribute.LABEL]
                for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
            ]
            if not labels:
                self._check_token_reachable()
        return sorted(label for label in labels if label.startswith(prefix))

    def generate_master_key(self, label: str) -> None:
        """Create a non-extractable, sensitive AES-256 key labelled ``label``.

        :raises AmbiguousKeyError: if a key with this label already exists.
        """
        with self.session() as session:
            existing = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                )
            )
            if existing:
                raise AmbiguousKeyError(
                    f"a key labelled '{label}' already exists in token '{self.token_label}'"
                )
            self.stats.generate += 1
            session.generate_key(
                KeyType.AES,
                MASTER_KEY_BITS,
                label=label,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                },
            )
        log.info("generated master key %s in token %s", label, self.token_label)

    @contextmanager
    def batch(self) -> Iterator[HsmBatch]:
        """Lend one session for a run of encrypt and decrypt calls that looks each label up once.

        The process-wide PKCS#11 call lock is held until the block ends, so
        other threads' HSM calls wait for the whole batch. Keep file I/O out of the block.

        :raises HsmUnavailableError: if a new session cannot be opened.
        """
        with self.session() as session:
            batch = HsmBatch(self, session, self._generation)
            try:
                yield batch
            finally:
                batch._close()

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with the key ``label`` using AES-GCM inside the token.

        :returns: ``nonce || ciphertext || tag``.
        :raises KeyNotFoundError: if the key does not exist.
        """
        with self.batch() as batch:
            return batch.encrypt(label, plaintext, aad)

    def decrypt(self, label: str, blob: bytes, aad: bytes) -> bytes:
        """Decrypt ``nonce || ciphertext || tag`` with the key ``label`` inside the token.

        :raises KeyNotFoundError: if the key does not exist.
        :raises IntegrityError: if authentication fails.
        """
        with self.batch() as batch:
            return batch.decrypt(label, blob, aad)

    def destroy_keys(self, label: str) -> int:
        """Destroy every secret key labelled ``label``.

        :returns: the number of objects destroyed.
        """
        try:
            with self.session() as session:
                found = list(
                    session.get_objects(
                        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                    )
                )
                for obj in found:
                    self.stats.destroy += 1
                    obj.destroy()
        except SparkKmsError:
            # The failed object may now be missing from this process's view
            # only; reread the token so that a retry finds it.
            self._reinitialize()
            raise
        log.info(
            "destroyed %d key object(s) labelled %s in token %s",
            len(found),
            label,
            self.token_label,
        )
        return len(found)


class HsmBatch:
    """Encrypt and decrypt calls in one session of an :class:`Hsm`, each key label looked up once.

    Made by :meth:`Hsm.batch` and usable only inside its ``with`` block. The key
    objects it finds are dropped when the block ends, so no key handle outlives
    its session.
    """

    def __init__(self, hsm: Hsm, session: Any, generation: int) -> None:
        self._hsm = hsm
        self._session: Any = session
        self._generation = generation
        self._keys: dict[str, Any] = {}

    def _close(self) -> None:
        self._session = None
        self._keys.clear()

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with the key ``label`` using AES-GCM inside the token.

        :returns: ``nonce || ciphertext || tag``.
        :raises KeyNotFoundError: if the key does not exist.
        """

        def seal(key: Any) -> bytes:
            # Each call, the retry in _with_key included, gets a new nonce.
            nonce = os.urandom(GCM_NONCE_LENGTH)
            self._hsm.stats.encrypt += 1
            sealed = key.encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS),
            )
            return nonce + bytes(sealed)

        return self._with_key(label, seal)

    def decrypt(self, label: str, blob: bytes, aad: bytes) -> bytes:
        """Decrypt ``nonce || ciphertext || tag`` with the key ``label`` inside the token.

        :raises KeyNotFoundError: if the key does not exist.
        :raises IntegrityError: if authentication fails.
        """
        if len(blob) < GCM_NONCE_LENGTH + GCM_TAG_BITS // 8:
            raise IntegrityError(
                f"wrapped value for key '{label}' is too short ({len(blob)} bytes)"
            )
        nonce, sealed = blob[:GCM_NONCE_LENGTH], blob[GCM_NONCE_LENGTH:]

        def unseal(key: Any) -> bytes:
            self._hsm.stats.decrypt += 1
            try:
                return bytes(
                    key.decrypt(
                        sealed,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS),
                    )
                )
            except (
                pkcs11_errors.EncryptedDataInvalid,
                pkcs11_errors.EncryptedDataLenRange,
                pkcs11_errors.FunctionFailed,
                # SoftHSM2 2.6 reports a failed GCM tag check as CKR_GENERAL_ERROR.
                pkcs11_errors.GeneralError,
            ):
                raise IntegrityError(
                    f"a value wrapped by master key '{label}' failed authentication: "
                    "the key record was changed or belongs to another key"
                ) from None

        return self._with_key(label, unseal)

    def _with_key(self, label: str, operation: Callable[[Any], bytes]) -> bytes:
        if self._session is None:
            raise RuntimeError("an HsmBatch is usable only inside its 'with' block")
        if self._generation != _GENERATION[0]:
            # C_Finalize ended the session and every handle found in it.
            raise HsmUnavailableError(
                f"the PKCS#11 module was re-initialized during a batch on token "
                f"'{self._hsm.token_label}', which ended the batch's session; retry"
            )
        key = self._keys.get(label)
        if key is None:
            key = self._keys[label] = self._hsm._find_key_in(self._session, label)
        try:
            return operation(key)
        except (pkcs11_errors.ObjectHandleInvalid, pkcs11_errors.KeyHandleInvalid):
            # The key was destroyed, in another session or process, after this
            # batch found it, so SoftHSM2 2.6 rejects its handle. Looking the label
            # up again raises KeyNotFoundError, or finds the key that now has it.
            del self._keys[label]
            key = self._keys[label] = self._hsm._find_key_in(self._session, label)
            return operation(key)


_SESSION_LOST = (
    pkcs11_errors.SessionClosed,
    pkcs11_errors.SessionHandleInvalid,
    pkcs11_errors.DeviceRemoved,
    pkcs11_errors.TokenNotPresent,
    pkcs11_errors.DeviceError,
    pkcs11_errors.UserNotLoggedIn,
)


def _translate(error: Exception, token_label: str) -> SparkKmsError:
    """Map a PKCS#11 error to the spark_kms error a caller can act on."""
    name = type(error).__name__
    if isinstance(error, _SESSION_LOST):
        return HsmUnavailableError(
            f"token '{token_label}' is not reachable ({name}); check that the HSM is up and retry"
        )
    if isinstance(error, pkcs11_errors.MechanismInvalid | pkcs11_errors.MechanismParamInvalid):
        return HsmUnavailableError(f"token '{token_label}' rejected the mechanism ({name})")
    if isinstance(error, pkcs11_errors.TokenWriteProtected):
        return HsmUnavailableError(
            f"token '{token_label}' is write-protected ({name}); make the token writable and retry"
        )
    return HsmUnavailableError(f"PKCS#11 operation on token '{token_label}' failed ({name})")


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except pkcs11_errors.PKCS11Error:
        log.debug("closing a PKCS#11 session failed", exc_info=True)


def _load_library(module_path: str) -> Any:
    with _LIBRARY_LOCK:
        if module_path in _LIBRARIES:
            return _LIBRARIES[module_path]
        if not os.path.isfile(module_path):
            raise ConfigurationError(
                f"PKCS#11 module {module_path} does not exist; set spark.kms.hsm.module to the "
                "module's path (for SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
            )
        if _LIBRARIES:
            loaded = next(iter(_LIBRARIES))
            raise ConfigurationError(
                f"PKCS#11 module {loaded} is already loaded in this process; "
                f"python-pkcs11 cannot load a second module ({module_path})"
            )
        try:
            lib = pkcs11.lib(module_path)
        except pkcs11_errors.PKCS11Error as error:
            # The module loaded, but C_Initialize failed: the HSM, not the path, is the problem.
            raise HsmUnavailableError(
                f"PKCS#11 module {module_path} failed to initialize ({type(error).__name__}); "
                "check that the HSM is up (for SoftHSM2, that directories.tokendir in the file "
                f"SOFTHSM2_CONF names, {os.environ.get('SOFTHSM2_CONF', 'unset')}, exists)"
            ) from error
        except (RuntimeError, OSError) as error:
            raise ConfigurationError(
                f"cannot load PKCS#11 module {module_path}: {type(error).__name__}: {error}"
            ) from error
        _LIBRARIES[module_path] = lib
        return lib
