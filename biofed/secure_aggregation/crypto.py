"""Key agreement, key derivation, the mask PRG and the share channel of secure aggregation.

- PRG: the ChaCha20 keystream (``cryptography``; RFC 7539, zero nonce) under a 256-bit key
  from HKDF-SHA256 with a label unique to the session, the purpose and the pair, so no
  key/nonce pair is ever reused. ChaCha20 is a cryptographic stream cipher: its output is
  indistinguishable from uniform bytes without the key, which is what makes each masked
  input uniform in Z_{2^64}^m. (A statistical generator such as NumPy's Philox would mix
  as well but carries no such guarantee against someone holding part of the stream.)
  ChaCha20 was preferred to AES-CTR because it is fast without AES instructions, which
  the Raspberry Pi 4's Cortex-A72 lacks.
- Key agreement: X25519, two fresh key pairs per device and round (``c`` for the share
  channel, ``s`` for the pairwise masks).
- Authenticated encryption of shares: ChaCha20-Poly1305 under
  ``HKDF(X25519(c_sk_u, c_pk_v))``, random 96-bit nonce, the session and the direction as
  associated data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from biofed.secure_aggregation.errors import SecAggError, require_int

KEY_BYTES = 32
"""Bytes of an X25519 key, a PRG seed and a self-mask seed."""
NONCE_BYTES = 12
_INFO = b"biofed-secagg-v1|"
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)

RandomBytes = Callable[[int], bytes]
"""A source of n random bytes (the OS CSPRNG, ``secrets.token_bytes``, outside tests)."""


def prg_words(seed: bytes, n: int) -> np.ndarray:
    """``n`` uint64 words of the ChaCha20 keystream under the 32-byte key ``seed``.

    Examples
    --------
    >>> words = prg_words(bytes(32), 4)
    >>> words.dtype, words.shape
    (dtype('uint64'), (4,))
    >>> bool((prg_words(bytes(32), 8)[:4] == words).all())
    True
    """
    if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
        raise SecAggError(f"PRG seed must be {KEY_BYTES} bytes")
    n = require_int(n, "n", 0)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def derive(key_material: bytes, *labels: bytes) -> bytes:
    """A 32-byte key from ``key_material`` by HKDF-SHA256, bound to ``labels``."""
    info = _INFO + b"|".join(labels)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key_material)


def pair_label(a: str, b: str) -> bytes:
    """The label of the unordered pair of devices ``a`` and ``b``."""
    lo, hi = sorted((a, b))
    return f"{lo}|{hi}".encode()


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of ``private``'s public key."""
    return private.public_key().public_bytes(*_RAW)


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, session: bytes, me: str, peer: str) -> bytes:
    """The mask seed ``s_uv`` that ``me`` and ``peer`` share (either side computes it)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive(shared, session, b"mask", pair_label(me, peer))


def self_seed(b: bytes, session: bytes, owner: str) -> bytes:
    """The PRG seed of ``owner``'s self mask from its seed ``b``."""
    return derive(b, session, b"self", owner.encode())


def share_channel(
    private: X25519PrivateKey, peer_public: bytes, session: bytes, me: str, peer: str
) -> ChaCha20Poly1305:
    """The AEAD that carries the shares between ``me`` and ``peer`` (both directions)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return ChaCha20Poly1305(derive(shared, session, b"enc", pair_label(me, peer)))


__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "RandomBytes",
    "derive",
    "pair_label",
    "pairwise_seed",
    "prg_words",
    "public_bytes",
    "self_seed",
    "share_channel",
]
