"""The device's half of secure aggregation (:mod:`biofed.secure_aggregation`).

:class:`SecAggClient` runs the device's steps of one round over the step messages.
:class:`SecureAggregationParticipant` is what the agent uses in a ``distributed``
trust-mode round: after local training it turns the update into the round's input (clip to
``Task.clip_norm``, add its noise share of std
``Task.noise_multiplier * clip_norm / sqrt(Task.secagg_threshold)``, fixed-point encode;
:func:`prepare_input`), publishes :meth:`~SecureAggregationParticipant.start` (its keys) and
answers each ``secagg_relay`` broadcast of the round with
:meth:`~SecureAggregationParticipant.handle`. The update itself never leaves the device
unmasked.

The participant refuses (:class:`~biofed.secure_aggregation.SecAggError`, logged and
dropped by the agent) anything that would weaken the guarantee it calibrated its noise
for: a key list whose threshold is below ``Task.secagg_threshold`` or that names devices
outside the task's participants, and every unsafe unmask request (see
:meth:`SecAggClient.unmask`).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import replace

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from biofed.privacy_mechanism import (
    Charge,
    ClippedSum,
    PrivacyMechanism,
    distributed_discrete_tau,
    grid_sensitivity,
)
from biofed.protocol import Task, validate_id
from biofed.secure_aggregation.crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    RandomBytes,
    pairwise_seed,
    prg_words,
    public_bytes,
    self_seed,
    share_channel,
)
from biofed.secure_aggregation.errors import NotEnoughSurvivors, SecAggError, require_int
from biofed.secure_aggregation.fixed_point import FixedPoint
from biofed.secure_aggregation.messages import (
    SecAggRelay,
    SecAggUpload,
    advertised_keys,
    as_bytes_array,
    session_id,
    shamir_xs,
)
from biofed.secure_aggregation.shamir import FIELD_BYTES, from_field_bytes, shamir_split, to_field_bytes

__all__ = ["SecAggClient", "SecureAggregationParticipant", "noise_share_std", "prepare_input"]


def noise_share_std(clip_norm: float, noise_multiplier: float, n_min: int) -> float:
    """Std of one device's noise share, ``z * C / sqrt(n_min)``."""
    c, z = float(clip_norm), float(noise_multiplier)
    if not (math.isfinite(c) and c > 0):
        raise SecAggError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (math.isfinite(z) and z >= 0):
        raise SecAggError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return z * c / math.sqrt(require_int(n_min, "n_min", 1))


def prepare_input(
    delta,
    *,
    clip_norm: float,
    noise_multiplier: float,
    n_min: int,
    mechanism: PrivacyMechanism,
    charge: Charge,
    fixed_point: FixedPoint = FixedPoint(),
) -> np.ndarray:
    """A device's secure-aggregation input: clipped, rounded to the fixed-point grid and
    noised with an exact discrete Gaussian share by the device's privacy mechanism (which
    charges first, durably), then encoded.

    The charge is recorded against the grid sensitivity
    (:func:`biofed.privacy_mechanism.grid_sensitivity`): its noise multiplier is scaled
    by ``C / grid_sensitivity(C, m, resolution)``.

    Parameters
    ----------
    delta : array-like, shape (m,)
        The model update.
    clip_norm, noise_multiplier : float
        C and the target z of the sum.
    n_min : int
        Survivors the noise is calibrated for (the round's threshold).
    mechanism : biofed.privacy_mechanism.PrivacyMechanism
        The device's release gate.
    charge : biofed.privacy_mechanism.Charge
        The ledger entry of this release.
    fixed_point : FixedPoint

    Returns
    -------
    ndarray, shape (m,), uint64
    """
    std = noise_share_std(clip_norm, noise_multiplier, n_min)
    vector = np.asarray(delta, dtype=np.float64)
    if vector.ndim != 1:
        raise SecAggError(f"the update must be 1-D, got shape {vector.shape}")
    if std > 0 and distributed_discrete_tau(std / fixed_point.resolution, n_min) > 1e-12:
        raise SecAggError(
            f"noise share std {std:g} is too close to the fixed-point resolution "
            f"{fixed_point.resolution:g} for the discrete Gaussian accounting; raise noise_multiplier"
        )
    scale = clip_norm / grid_sensitivity(clip_norm, vector.shape[0], fixed_point.resolution)
    counts = mechanism.release_on_grid(
        replace(charge, noise_multiplier=charge.noise_multiplier * scale),
        ClippedSum(vector, clip_norm, std),
        fixed_point.resolution,
    )
    return fixed_point.encode_counts(counts)


class SecAggClient:
    """One device's side of one secure-aggregation round (steps in order, once each).

    Each step takes the coordinator's relay (:class:`~biofed.secure_aggregation.SecAggRelay`)
    and returns the device's upload (:class:`~biofed.secure_aggregation.SecAggUpload`).

    Parameters
    ----------
    device_id, fleet : str
    round : int
        The task's round; with ``fleet`` it is the session every key is bound to.
    random_bytes : callable
        Randomness for keys, seeds, Shamir coefficients and nonces (OS CSPRNG by
        default; tests inject a seeded source for reproducibility).
    """

    def __init__(
        self, device_id: str, fleet: str, round: int, *, random_bytes: RandomBytes = secrets.token_bytes
    ) -> None:
        self.device_id = validate_id(device_id)
        self.session = session_id(fleet, round)
        self.round = int(round)
        self._random_bytes = random_bytes
        self._c_sk = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._s_sk = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._b = random_bytes(KEY_BYTES)
        self._public = (public_bytes(self._c_sk), public_bytes(self._s_sk))
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._threshold = 0
        self._own_shares: tuple[int, int] | None = None
        self._u2: tuple[str, ...] = ()
        self._received: dict[str, tuple[int, int]] = {}
        self._channels: dict[str, ChaCha20Poly1305] = {}
        self._step = "advertise"

    def _advance(self, expected: str, following: str) -> None:
        if self._step != expected:
            raise SecAggError(f"{self.device_id}: step {expected!r} called while the round expects {self._step!r}")
        self._step = following

    def _relay(self, relay: SecAggRelay, step: str) -> SecAggRelay:
        if relay.round != self.round:
            raise SecAggError(
                f"{self.device_id}: {relay.step!r} relay of round {relay.round}, this device is in round {self.round}"
            )
        if relay.step != step:
            raise SecAggError(f"{self.device_id}: expected the {step!r} relay, got the {relay.step!r} relay")
        return relay

    def advertise(self) -> SecAggUpload:
        """Step 1: the round's public keys."""
        self._advance("advertise", "share_keys")
        return SecAggUpload(self.round, "advertise", public_keys=as_bytes_array(b"".join(self._public)))

    def _channel(self, peer: str) -> ChaCha20Poly1305:
        """The AEAD keyed for the pair (one X25519 agreement per peer and round)."""
        if peer not in self._channels:
            self._channels[peer] = share_channel(self._c_sk, self._keys[peer][0], self.session, self.device_id, peer)
        return self._channels[peer]

    def _aad(self, sender: str, recipient: str) -> bytes:
        return self.session + f"|{sender}->{recipient}".encode()

    def share_keys(self, relay: SecAggRelay) -> SecAggUpload:
        """Step 2: Shamir-share ``b_u`` and ``s_sk_u`` to U1 (the ``keys`` relay), encrypted
        per recipient."""
        keys = advertised_keys(self._relay(relay, "keys"))  # a malformed relay leaves the step open
        self._advance("share_keys", "masked_input")
        if keys.get(self.device_id) != self._public:
            raise SecAggError(f"{self.device_id}: the key list lacks this device's advertised keys")
        self._keys, self._threshold = keys, relay.threshold
        xs = shamir_xs(keys)
        s_sk = int.from_bytes(self._s_sk.private_bytes_raw(), "big")
        points = list(xs.values())
        b_shares = shamir_split(
            int.from_bytes(self._b, "big"), self._threshold, points, random_bytes=self._random_bytes
        )
        k_shares = shamir_split(s_sk, self._threshold, points, random_bytes=self._random_bytes)
        ciphertexts = {}
        for peer, x in xs.items():
            if peer == self.device_id:
                self._own_shares = (b_shares[x], k_shares[x])
                continue
            nonce = self._random_bytes(NONCE_BYTES)
            plain = to_field_bytes(b_shares[x]) + to_field_bytes(k_shares[x])
            ciphertexts[peer] = as_bytes_array(
                nonce + self._channel(peer).encrypt(nonce, plain, self._aad(self.device_id, peer))
            )
        return SecAggUpload(
            self.round, "shares", ciphertexts=ciphertexts, commitment=as_bytes_array(hashlib.sha256(self._b).digest())
        )

    def masked_input(self, relay: SecAggRelay, encoded: np.ndarray) -> SecAggUpload:
        """Step 3: decrypt and keep the shares received, then mask ``encoded``.

        Parameters
        ----------
        relay : SecAggRelay
            The ``shares`` relay; its ciphertexts for this device come from U2.
        encoded : ndarray, shape (m,), uint64
            :func:`prepare_input` (or :meth:`FixedPoint.encode`) of the update.
        """
        forwarded = self._relay(relay, "shares").ciphertexts.get(self.device_id)
        if forwarded is None:
            raise SecAggError(
                f"{self.device_id}: the shares relay has nothing for this device (dropped from the round)"
            )
        self._advance("masked_input", "unmask")
        encoded = np.asarray(encoded)
        if encoded.dtype != np.uint64 or encoded.ndim != 1:
            raise SecAggError(f"encoded input must be a 1-D uint64 array, got {encoded.dtype} of shape {encoded.shape}")
        u2 = set(forwarded) | {self.device_id}
        unknown = u2 - set(self._keys)
        if unknown:
            raise SecAggError(
                f"{self.device_id}: forwarded shares from devices outside the key list: {sorted(unknown)}"
            )
        if len(u2) < self._threshold:
            raise NotEnoughSurvivors(f"only {len(u2)} devices shared keys, threshold is {self._threshold}")
        for peer, array in forwarded.items():
            ct = array.tobytes()
            if len(ct) < NONCE_BYTES:
                raise SecAggError(f"{self.device_id}: ciphertext from {peer!r} is truncated")
            try:
                plain = self._channel(peer).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], self._aad(peer, self.device_id))
            except InvalidTag:
                raise SecAggError(f"{self.device_id}: shares from {peer!r} fail authentication") from None
            if len(plain) != 2 * FIELD_BYTES:
                raise SecAggError(f"{self.device_id}: shares from {peer!r} have the wrong length")
            self._received[peer] = (
                from_field_bytes(plain[:FIELD_BYTES], "b share"),
                from_field_bytes(plain[FIELD_BYTES:], "key share"),
            )
        self._u2 = tuple(sorted(u2))
        masked = encoded + prg_words(self_seed(self._b, self.session, self.device_id), encoded.size)
        for peer in self._u2:
            if peer == self.device_id:
                continue
            seed = pairwise_seed(self._s_sk, self._keys[peer][1], self.session, self.device_id, peer)
            mask = prg_words(seed, encoded.size)
            masked = masked + mask if self.device_id < peer else masked - mask
        return SecAggUpload(self.round, "masked", masked=masked.view(np.int64))

    def unmask(self, relay: SecAggRelay) -> SecAggUpload:
        """Step 4: shares of the survivors' ``b`` and the dropped devices' mask keys (the
        ``unmask`` relay names both)."""
        self._relay(relay, "unmask")
        self._advance("unmask", "done")
        survivors, dropped = set(relay.survivors), set(relay.dropped)
        if self.device_id not in survivors:
            raise SecAggError(f"{self.device_id}: unmask request does not list this device as a survivor")
        if survivors | dropped != set(self._u2):
            raise SecAggError(
                f"{self.device_id}: survivors and dropped devices must partition the {len(self._u2)} devices "
                "that shared keys; refusing to unmask"
            )
        if len(survivors) < self._threshold:
            raise NotEnoughSurvivors(
                f"{self.device_id}: {len(survivors)} survivors < threshold {self._threshold}; refusing to unmask"
            )
        held = {**self._received, self.device_id: self._own_shares}
        return SecAggUpload(
            self.round,
            "unmask",
            b_shares={v: as_bytes_array(to_field_bytes(held[v][0])) for v in sorted(survivors)},
            key_shares={v: as_bytes_array(to_field_bytes(held[v][1])) for v in sorted(dropped)},
        )


class SecureAggregationParticipant:
    """One device's part in one secure-aggregation round.

    Parameters
    ----------
    device_id, fleet : str
    task : Task
        The round's training task (``trust_mode == "distributed"``, ``secagg_threshold >= 1``).
    delta : ndarray, shape (P,)
        The local update (unclipped or clipped; it is clipped again to ``task.clip_norm``).
    mechanism : PrivacyMechanism
        The device's release gate: it clips, adds the noise share and charges ``charge``
        before the input is encoded.
    charge : Charge
        The device ledger's entry: noise multiplier ``task.noise_multiplier``, the
        guarantee of a sum of at least ``secagg_threshold`` honest shares, which is all this
        device ever lets be unmasked.
    fixed_point : FixedPoint
        Must match the coordinator's.
    """

    def __init__(
        self,
        device_id: str,
        fleet: str,
        task: Task,
        delta: np.ndarray,
        *,
        mechanism: PrivacyMechanism,
        charge: Charge,
        fixed_point: FixedPoint = FixedPoint(),
    ) -> None:
        if task.trust_mode != "distributed" or task.secagg_threshold < 1:
            raise SecAggError(
                f"round {task.round}: secure aggregation needs a distributed-mode task with secagg_threshold >= 1, "
                f"got trust_mode={task.trust_mode!r}, secagg_threshold={task.secagg_threshold}"
            )
        self.task = task
        self.encoded = prepare_input(
            delta,
            clip_norm=task.clip_norm,
            noise_multiplier=task.noise_multiplier,
            n_min=task.secagg_threshold,
            fixed_point=fixed_point,
            mechanism=mechanism,
            charge=charge,
        )
        self._client = SecAggClient(device_id, fleet, task.round)
        self.step = "start"

    @property
    def round(self) -> int:
        return self.task.round

    @property
    def finished(self) -> bool:
        return self.step == "done"

    def start(self) -> SecAggUpload:
        """The ``advertise`` upload (the round's public keys)."""
        if self.step != "start":
            raise SecAggError(f"round {self.round}: start() called twice")
        self.step = "keys"
        return self._client.advertise()

    def handle(self, relay: SecAggRelay) -> SecAggUpload:
        """The answer to the coordinator's broadcast of the next step.

        Raises
        ------
        SecAggError
            Another round, an out-of-order step, or an unsafe request; nothing is sent.
        """
        if relay.round != self.round:
            raise SecAggError(f"secagg relay for round {relay.round}, this device is in round {self.round}")
        if relay.step != self.step:
            raise SecAggError(f"round {self.round}: got the {relay.step!r} relay while expecting {self.step!r}")
        if relay.step == "keys":
            self._check_keys(relay)
            answer, self.step = self._client.share_keys(relay), "shares"
        elif relay.step == "shares":
            answer, self.step = self._client.masked_input(relay, self.encoded), "unmask"
        else:
            answer, self.step = self._client.unmask(relay), "done"
        return answer

    def _check_keys(self, keys: SecAggRelay) -> None:
        if keys.threshold < self.task.secagg_threshold:
            raise SecAggError(
                f"round {self.round}: key list threshold {keys.threshold} is below the task's secagg_threshold "
                f"{self.task.secagg_threshold} this device calibrated its noise share for; refusing"
            )
        if self.task.participants:
            strangers = set(keys.public_keys) - set(self.task.participants)
            if strangers:
                raise SecAggError(f"round {self.round}: key list names devices outside the task: {sorted(strangers)}")
