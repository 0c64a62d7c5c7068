"""Ed25519 signed envelopes: signing keys, the fleet's key ring and replay protection.

Every biofed message can carry an Ed25519 signature over its whole envelope (fleet,
kind, round, sender, message id, created time and payload; see "Signed messages" in
:mod:`biofed.protocol`). A receiver configured with a key directory verifies the
signature *before* parsing the envelope and refuses unsigned messages, so a device
cannot post as another device, nobody without the coordinator's key can publish tasks
or models, and a captured message cannot be re-targeted to another round, fleet, topic
or sender (those are inside the signed bytes).

Key files
---------
Written by ``biofed.apps.provision`` (one directory per fleet)::

    DIR/keys/{id}.pub.pem                 public keys, one per device, plus coordinator.pub.pem
    DIR/keys/revoked.txt                  optional: revoked ids, one per line ('#' starts a comment)
    DIR/devices/{id}/signing.key.pem      a device's private key (PKCS#8, unencrypted)
    DIR/coordinator/signing.key.pem       the coordinator's private key

:meth:`KeyRing.from_dir` loads ``DIR/keys``; :func:`load_signer` one private key.

Replay protection
-----------------
A valid signature proves who wrote the bytes, not that they are fresh. :class:`Verifier`
adds, after the signature and the envelope check:

- clock skew: ``created`` more than ``max_skew_s`` in the future is refused; more than
  ``max_skew_s`` in the past is refused except for the retained kinds (task, model,
  basis, status), which a broker legitimately delivers long after they were published and
  which newer retained messages supersede (:class:`~biofed.protocol.StaleMessage`);
- duplicates: a message id accepted once is refused again
  (:class:`~biofed.protocol.ReplayedMessage`; this also drops QoS 1 redeliveries).
  Size ``capacity`` above the number of messages a receiver accepts within
  ``2 * max_skew_s``: an id forgotten by the LRU is older than the skew window, so its
  replay is refused as stale;
- rounds: the round is signed, so it cannot be changed; receivers keep checking it
  against their current round as before (the coordinator drops updates of other rounds,
  the agent drops tasks it already answered).

Cost
----
Ed25519 signing and verification cost tens of microseconds each, independent of the
message size apart from hashing it once (SHA-512). A signature adds 64 bytes and the
outer map's framing to every message. ``biofed bench --only signing`` measures the
encode + decode time of one update signed and unsigned, and the size difference.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from biofed.protocol import (
    SIGNATURE_BYTES,
    BadSignature,
    Message,
    ReplayedMessage,
    SeenMessageIds,
    StaleMessage,
    UnknownSender,
    UnsignedMessage,
    validate_id,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PUBLIC_KEY_SUFFIX",
    "RETAINED_KINDS",
    "REVOKED_FILE",
    "BadSignature",
    "KeyRing",
    "ReplayedMessage",
    "Signer",
    "StaleMessage",
    "UnknownSender",
    "UnsignedMessage",
    "Verifier",
    "load_signer",
    "signing_from_config",
]

PUBLIC_KEY_SUFFIX = ".pub.pem"
REVOKED_FILE = "revoked.txt"
RETAINED_KINDS = ("task", "model", "basis", "status")
"""Kinds published retained: exempt from the maximum age (not from the future limit)."""


class Signer:
    """An Ed25519 private key and the id (device id or ``"coordinator"``) it signs as.

    Parameters
    ----------
    private_key : Ed25519PrivateKey
    key_id : str
        The sender id the key belongs to; :func:`biofed.protocol.encode_message` refuses to
        sign a message of another sender with it.
    """

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self.key_id = validate_id(key_id, "key id")

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r})"

    @classmethod
    def generate(cls, key_id: str) -> Signer:
        """A fresh key pair (tests and provisioning)."""
        return cls(Ed25519PrivateKey.generate(), key_id)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature of ``data``."""
        return self._key.sign(data)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (the ``signing.key.pem`` format; keep it 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (the ``{id}.pub.pem`` format)."""
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signer(path: str | Path, key_id: str) -> Signer:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key as the signer of ``key_id``.

    Raises
    ------
    ValueError
        The file is missing, unreadable, not PEM or not an Ed25519 key; the message names it.
    """
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: signing key file not found (run biofed provision, or fix signing_key_file)"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: holds a {type(key).__name__}, biofed signs with Ed25519 keys")
    return Signer(key, key_id)


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: holds a {type(key).__name__}, biofed verifies Ed25519 keys only")
    return key


class KeyRing:
    """Public keys by sender id, with revocation. Verifies signatures (no replay checks).

    Thread-safe. Pass it as ``verifier`` to :func:`biofed.protocol.decode_message` to
    check signatures only, or wrap it in a :class:`Verifier` for replay protection too.

    Parameters
    ----------
    keys : mapping of str to Ed25519PublicKey
    revoked : iterable of str
        Ids whose messages are refused even though their key is known.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None, *, revoked: Iterable[str] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._revoked: set[str] = set()
        self._lock = threading.Lock()
        for key_id, key in (keys or {}).items():
            self.add(key_id, key)
        for key_id in revoked:
            self.revoke(key_id)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._keys)} keys, {len(self._revoked)} revoked)"

    @classmethod
    def from_dir(cls, path: str | Path, *, revoked: Iterable[str] = ()) -> KeyRing:
        """Load every ``{id}.pub.pem`` of ``path`` (and ``revoked.txt`` when present).

        Raises
        ------
        ValueError
            The directory is missing or holds no public key, or a key file is not an
            Ed25519 public key with a valid id as its name.
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path}: key directory not found (run biofed provision, or fix keys_dir)")
        ring = cls()
        for file in sorted(path.glob(f"*{PUBLIC_KEY_SUFFIX}")):
            key_id = file.name[: -len(PUBLIC_KEY_SUFFIX)]
            try:
                validate_id(key_id, "key id")
            except ValueError as exc:
                raise ValueError(f"{file}: the file name must be <id>{PUBLIC_KEY_SUFFIX}: {exc}") from None
            ring.add(key_id, _load_public(file))
        if not ring._keys:
            raise ValueError(f"{path}: no *{PUBLIC_KEY_SUFFIX} public keys in the key directory")
        revoked_file = path / REVOKED_FILE
        if revoked_file.is_file():
            for number, line in enumerate(revoked_file.read_text().splitlines(), 1):
                entry = line.split("#", 1)[0].strip()
                if entry:
                    try:
                        ring.revoke(entry)
                    except ValueError as exc:
                        raise ValueError(f"{revoked_file}:{number}: {exc}") from None
        for key_id in revoked:
            ring.revoke(key_id)
        logger.info("key ring %s: %d keys, %d revoked", path, len(ring._keys), len(ring._revoked))
        return ring

    def add(self, key_id: str, key: Ed25519PublicKey) -> None:
        """Trust ``key`` for messages of ``key_id`` (replacing an older key)."""
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"key of {key_id!r} must be an Ed25519PublicKey, got {type(key).__name__}")
        with self._lock:
            self._keys[validate_id(key_id, "key id")] = key

    def revoke(self, key_id: str) -> None:
        """Refuse every later message of ``key_id``."""
        with self._lock:
            self._revoked.add(validate_id(key_id, "key id"))

    @property
    def ids(self) -> frozenset[str]:
        """Ids with a key that is not revoked."""
        with self._lock:
            return frozenset(self._keys.keys() - self._revoked)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.ids

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The key stored for ``key_id`` (revoked or not), or None."""
        with self._lock:
            return self._keys.get(key_id)

    def verify(self, sender: str, data: bytes, signature: bytes) -> None:
        """Raise unless ``signature`` is ``sender``'s Ed25519 signature of ``data``.

        Raises
        ------
        UnknownSender
            No key for ``sender``, or ``sender`` was revoked.
        BadSignature
            The signature does not verify.
        """
        with self._lock:
            revoked = sender in self._revoked
            key = self._keys.get(sender)
        if revoked:
            raise UnknownSender(f"sender {sender!r} is revoked; its messages are refused")
        if key is None:
            raise UnknownSender(
                f"sender {sender!r} has no public key in the key ring (provision it, or check keys_dir)"
            )
        if len(signature) != SIGNATURE_BYTES:
            raise BadSignature(f"signature of {sender!r} is {len(signature)} bytes, expected {SIGNATURE_BYTES}")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise BadSignature(
                f"signature of {sender!r} does not verify: forged, modified in transit, or re-targeted"
            ) from None


class Verifier:
    """Signature verification (a :class:`KeyRing`) plus replay protection.

    Pass it as ``verifier`` to :func:`biofed.protocol.decode_message` or
    :func:`~biofed.protocol.decode_topic_message`. One instance per receiving process: it
    remembers the message ids it accepted.

    Parameters
    ----------
    keyring : KeyRing
    max_skew_s : float
        Largest accepted distance between a message's ``created`` time and the receiver's
        clock (default 300 s). Messages from further in the future are always refused;
        older ones unless their kind is in ``retained_kinds``.
    retained_kinds : sequence of str
        Kinds exempt from the age limit (delivered late by the broker by design).
    capacity : int
        Message ids remembered (LRU); see the module docstring for sizing.
    clock : callable
        Current unix time (injectable for tests).
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        max_skew_s: float = 300.0,
        retained_kinds: Iterable[str] = RETAINED_KINDS,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError(f"keyring must be a KeyRing, got {type(keyring).__name__}")
        if isinstance(max_skew_s, bool) or not isinstance(max_skew_s, (int, float)) or not max_skew_s > 0:
            raise ValueError(f"max_skew_s must be a number of seconds > 0, got {max_skew_s!r}")
        self.keyring = keyring
        self.max_skew_s = float(max_skew_s)
        self.retained_kinds = frozenset(retained_kinds)
        self._seen = SeenMessageIds(capacity)
        self._clock = clock

    def __repr__(self) -> str:
        return f"Verifier({self.keyring!r}, max_skew_s={self.max_skew_s:g})"

    def verify(self, sender: str, data: bytes, signature: bytes) -> None:
        """Signature check, see :meth:`KeyRing.verify`."""
        self.keyring.verify(sender, data, signature)

    def admit(self, message: Message) -> None:
        """Replay checks on a verified, validated message; raise or remember its id.

        Raises
        ------
        StaleMessage
            ``created`` is outside the allowed skew.
        ReplayedMessage
            The message id was accepted before.
        """
        now = self._clock()
        age = now - message.created
        if -age > self.max_skew_s:
            raise StaleMessage(
                f"{message.kind} from {message.sender!r} is dated {-age:.0f} s in the future "
                f"(max skew {self.max_skew_s:g} s); check the sender's clock"
            )
        if age > self.max_skew_s and message.kind not in self.retained_kinds:
            raise StaleMessage(
                f"{message.kind} from {message.sender!r} was created {age:.0f} s ago "
                f"(max skew {self.max_skew_s:g} s): replayed or delayed"
            )
        if not self._seen.add(message.message_id):
            raise ReplayedMessage(f"{message.kind} {message.message_id} from {message.sender!r} was already accepted")


def signing_from_config(config: Any, sender: str) -> tuple[Signer | None, Verifier | None]:
    """The signer and verifier a process configures from its ``DeviceConfig`` or
    ``CoordinatorConfig`` (fields ``signing_key_file``, ``keys_dir``, ``max_clock_skew_s``).

    Parameters
    ----------
    config : biofed.config.DeviceConfig or biofed.config.CoordinatorConfig
    sender : str
        The id this process sends as (device id, or the coordinator's sender id).

    Returns
    -------
    signer : Signer or None
        None when ``signing_key_file`` is not set (unsigned messages).
    verifier : Verifier or None
        None when ``keys_dir`` is not set (signatures not checked).

    Raises
    ------
    ValueError
        A key file or the key directory cannot be loaded, or the key directory's public key
        of ``sender`` does not match the private key (a mixed-up provisioning directory).
    """
    signer = None if config.signing_key_file is None else load_signer(config.signing_key_file, sender)
    if config.keys_dir is None:
        return signer, None
    ring = KeyRing.from_dir(config.keys_dir)
    own = ring.public_key(sender)
    if signer is not None and own is not None and own.public_bytes_raw() != signer.public_key.public_bytes_raw():
        raise ValueError(
            f"{config.signing_key_file}: this private key does not match "
            f"{config.keys_dir}/{sender}{PUBLIC_KEY_SUFFIX}; "
            "receivers would reject every message of this process"
        )
    return signer, Verifier(ring, max_skew_s=config.max_clock_skew_s)
