"""Secure aggregation with dropouts (Bonawitz et al. 2017), for the ``distributed`` trust mode.

The coordinator learns the *sum* of the surviving devices' (clipped, noised, fixed-point
encoded) updates and nothing else about any individual update, even when devices drop
out mid-round. This package is the core both sides share: the step messages and round
rules (:mod:`~biofed.secure_aggregation.messages`), the cryptography
(:mod:`~biofed.secure_aggregation.crypto`), Shamir sharing
(:mod:`~biofed.secure_aggregation.shamir`) and the fixed-point ring
(:mod:`~biofed.secure_aggregation.fixed_point`). The device's half is
:mod:`biofed.edge.secure_aggregation` (:class:`~biofed.edge.secure_aggregation.SecAggClient`),
the coordinator's :mod:`biofed.coordinator.secure_aggregation`
(:class:`~biofed.coordinator.secure_aggregation.SecAggServer`). Pure computation, no
network: the caller moves the step messages over MQTT, signed (:mod:`biofed.signing`),
because this is the honest-but-curious variant of the protocol [1]_ (section 4,
"semi-honest"): a coordinator that lies about who dropped is stopped by the threshold rule
below, not by the consistency-check round of the actively secure variant, which is not
implemented.

Round protocol
--------------
``session`` (:func:`session_id`: fleet and round) binds every key and ciphertext to one
round. Ids order the devices (string order); ``x``-coordinates of the Shamir shares are
1 + the index of the recipient in the sorted advertised ids (:func:`shamir_xs`).

1. **Advertise keys** (``advertise`` upload): two fresh X25519 public keys per round:
   ``c_pk`` (channel key, encrypts shares) and ``s_pk`` (mask key). The coordinator waits
   for at least ``threshold`` devices (U1), then broadcasts the ``keys`` relay.
2. **Share keys** (``shares`` upload): the device draws a self-mask seed ``b_u`` (32
   random bytes), splits ``b_u`` and its mask private key ``s_sk_u`` into t-of-n Shamir
   shares over GF(2^521 - 1), one per device of U1, and encrypts each peer's pair of
   shares with ChaCha20-Poly1305 under ``HKDF(X25519(c_sk_u, c_pk_v))`` (associated data:
   session, sender, recipient), so the coordinator that relays them cannot read them. It
   also sends ``SHA-256(b_u)`` so a wrongly reconstructed self mask is detected. The
   coordinator waits for >= t senders (U2) and relays to each the ciphertexts addressed
   to it (the ``shares`` relay).
3. **Masked input** (``masked`` upload): with ``x_u`` the encoded update in Z_{2^64}, the
   device sends
   ``y_u = x_u + PRG(b_u) + sum_{v in U2, u < v} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)``
   where ``s_uv = HKDF(X25519(s_sk_u, s_pk_v))`` is shared by u and v. The pairwise masks
   cancel in the sum over U2. The coordinator waits for >= t inputs (U3), then broadcasts
   the ``unmask`` relay naming U3 (survivors) and U2 minus U3 (dropped after sharing).
4. **Unmasking** (``unmask`` upload): each device of U3 decrypts the shares it holds and
   returns, for every survivor, its share of ``b_v`` and, for every dropped device, its
   share of ``s_sk_v`` -- never both for the same device, and nothing unless U3 has at
   least t members and U3, dropped partition U2.
5. **Sum** (coordinator): with >= t responses it reconstructs the survivors' ``b_v`` and
   the dropped devices' ``s_sk_v`` (checked against ``SHA-256(b_v)`` and ``s_pk_v``),
   then ``sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) -/+ PRG(s_ud)`` for the pairwise masks
   between each survivor u and each dropped d, which equals ``sum_{u in U3} x_u`` exactly
   (mod 2^64).

A device that drops before step 3 contributes nothing and its pairwise masks are removed;
one that drops after step 3 is a survivor: its input is in the sum and its self mask is
reconstructed from the others' shares. Fewer than ``threshold`` devices at any step stop
the round with :class:`NotEnoughSurvivors` (no partial sum is ever revealed).

Threshold
---------
``n/2 < threshold <= n`` (n = devices in U1) is enforced by the devices: with a majority
threshold, a coordinator cannot collect t shares of ``b_v`` from one group and t shares
of ``s_sk_v`` from another, which would unmask ``v``'s individual input. The round
tolerates ``n - threshold`` dropouts. :func:`default_threshold` is ``n // 2 + 1``.

Distributed DP noise
--------------------
Each device adds Gaussian noise of std ``z * C / sqrt(n_min)`` to its clipped update
before encoding (:func:`biofed.edge.secure_aggregation.prepare_input`), so a sum of at
least ``n_min`` survivors carries std >= ``z * C``. Choose ``n_min = threshold``: a round
that completes has at least that many inputs. The coordinator records the noise actually
present, ``biofed.privacy_ledger.distributed_noise_multiplier(z, n_min, len(survivors))``.
The guarantee assumes devices add their share honestly. The noise is an exact discrete
Gaussian on the fixed-point grid
(:meth:`biofed.privacy_mechanism.PrivacyMechanism.release_on_grid`), accounted against the
grid sensitivity (see :mod:`biofed.privacy_mechanism`).

Cost
----
Per device and round, n devices and m parameters: 2 key pairs, 2(n-1) X25519 agreements,
(n-1) AEAD encryptions and decryptions, Shamir evaluation of 2 secrets at n points (degree
t-1), and n PRG expansions of 8m bytes; messages O(n + m). The coordinator does
O(n * dropped) PRG expansions and O(n * t) field operations to reconstruct. The ``secagg``
case of the benchmark suite (``biofed bench --only secagg``) measures both sides' CPU time
and the bytes each device sends against a plain float64 sum.

References
----------
.. [1] K. Bonawitz, V. Ivanov, B. Kreuter, A. Marcedone, H. B. McMahan, S. Patel,
   D. Ramage, A. Segal, K. Seth, "Practical Secure Aggregation for Privacy-Preserving
   Machine Learning", ACM CCS 2017, doi:10.1145/3133956.3133982.
"""

# The protocol registers this package's step messages as payload kinds: load it before
# them, so either package can be imported first.
import biofed.protocol  # noqa: F401  isort: skip
from biofed.secure_aggregation.crypto import prg_words
from biofed.secure_aggregation.errors import NotEnoughSurvivors, SecAggError
from biofed.secure_aggregation.fixed_point import FixedPoint
from biofed.secure_aggregation.messages import (
    SECAGG_RELAY_STEPS,
    SECAGG_UPLOAD_STEPS,
    SecAggRelay,
    SecAggUpload,
    advertised_keys,
    check_threshold,
    default_threshold,
    session_id,
    shamir_xs,
)
from biofed.secure_aggregation.shamir import FIELD_PRIME, shamir_combine, shamir_split

__all__ = [
    "FIELD_PRIME",
    "SECAGG_RELAY_STEPS",
    "SECAGG_UPLOAD_STEPS",
    "FixedPoint",
    "NotEnoughSurvivors",
    "SecAggError",
    "SecAggRelay",
    "SecAggUpload",
    "advertised_keys",
    "check_threshold",
    "default_threshold",
    "prg_words",
    "session_id",
    "shamir_combine",
    "shamir_split",
    "shamir_xs",
]
