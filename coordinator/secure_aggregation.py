"""The coordinator's half of secure aggregation (:mod:`biofed.secure_aggregation`).

:class:`SecAggServer` runs the coordinator's steps of one round over the step messages
and unmasks the sum. :class:`SecureAggregationRound` drives one :class:`SecAggServer` in a
``distributed`` trust-mode round (``secagg`` uploads in, ``secagg_relay`` broadcasts out)
with one deadline per step. It holds no network code: the round loop
feeds it decoded uploads (:meth:`~SecureAggregationRound.handle`), asks it what to publish
(:meth:`~SecureAggregationRound.poll`) and reads the result.

Timeline of a round
-------------------
The devices train first, then advertise their keys, so the ``advertise`` step closes when
every participant has advertised or at the task deadline. Each later step (``shares``,
``masked``, ``unmask``) is pure cryptography on the devices and closes when every device
still in the round has answered or ``step_timeout_s`` after it opened. Devices missing at
a step's close are dropouts (see :mod:`biofed.secure_aggregation` for what that means at each step).
Fewer than the threshold at any close abandons the round: nothing is released. The
coordinator charges the round before it publishes the unmask request (the step from which
the sum can be revealed), so an abort at the unmasking is still accounted.

Privacy accounting
------------------
Each survivor's input carries a noise share of std ``z C / sqrt(n_min)`` with
``n_min = Task.secagg_threshold``; the revealed sum carries
``z C sqrt(n_survivors / n_min)``, recorded as
:func:`biofed.privacy_ledger.distributed_noise_multiplier` (:meth:`noise_multiplier`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from biofed.privacy_ledger import distributed_noise_multiplier
from biofed.secure_aggregation.crypto import KEY_BYTES, pairwise_seed, prg_words, public_bytes, self_seed
from biofed.secure_aggregation.errors import NotEnoughSurvivors, SecAggError, require_int
from biofed.secure_aggregation.fixed_point import FixedPoint
from biofed.secure_aggregation.messages import (
    SecAggRelay,
    SecAggUpload,
    advertised_keys,
    default_threshold,
    public_key_pair,
    session_id,
    shamir_xs,
)
from biofed.secure_aggregation.shamir import FIELD_BYTES, FIELD_PRIME, from_field_bytes, lagrange_at_zero

logger = logging.getLogger(__name__)

__all__ = ["AggregateResult", "SecAggServer", "SecureAggregationRound"]


@dataclass(frozen=True)
class AggregateResult:
    """The sum (mod 2^64) of the survivors' encoded inputs, and who was in it."""

    total: np.ndarray = field(repr=False)
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


class SecAggServer:
    """The coordinator's side of one secure-aggregation round.

    Feed each step's uploads (:meth:`receive`), then close the step (the methods returning
    the next relay); devices that have not answered when a step is closed are dropouts.
    :meth:`receive` raises :class:`~biofed.secure_aggregation.SecAggError` for a message
    that does not fit the round (the caller logs and drops it).

    Parameters
    ----------
    fleet : str
    round : int
        With ``fleet``, the session every key is bound to.
    vector_size : int
        m, the length of every masked input.
    threshold : int or None
        Minimum t. The threshold used is ``max(threshold, default_threshold(n))`` for the
        n devices that advertise keys (devices refuse a non-majority threshold). Set it
        to the ``n_min`` the devices calibrated their noise for, so a completed round
        always carries at least the planned noise.
    """

    def __init__(self, fleet: str, round: int, *, vector_size: int, threshold: int | None = None) -> None:
        self.session = session_id(fleet, round)
        self.round = int(round)
        self.vector_size = require_int(vector_size, "vector_size", 1)
        self.threshold = None if threshold is None else require_int(threshold, "threshold", 1)
        self._advertised: dict[str, np.ndarray] = {}
        self._key_list: SecAggRelay | None = None
        self._keys: dict[str, tuple[bytes, bytes]] | None = None
        self._xs: dict[str, int] = {}
        self._shares: dict[str, SecAggUpload] = {}
        self._u2: tuple[str, ...] | None = None
        self._masked: dict[str, np.ndarray] = {}
        self._request: SecAggRelay | None = None
        self._responses: dict[str, SecAggUpload] = {}

    def _need(self, at_least: int, have: int, what: str) -> None:
        if have < at_least:
            raise NotEnoughSurvivors(f"{have} devices {what}, threshold is {at_least}: the round is abandoned")

    def receive(self, sender: str, message: SecAggUpload) -> None:
        """Accept ``sender``'s upload (``sender`` = the verified envelope sender)."""
        if message.round != self.round:
            raise SecAggError(
                f"secagg {message.step} of {sender!r} is for round {message.round}, this round is {self.round}"
            )
        {
            "advertise": self._receive_advertise,
            "shares": self._receive_shares,
            "masked": self._receive_masked,
            "unmask": self._receive_unmask,
        }[message.step](sender, message)

    def _receive_advertise(self, sender: str, message: SecAggUpload) -> None:
        if self._keys is not None:
            raise SecAggError(f"keys of {sender!r} arrived after the key list was sent")
        if sender in self._advertised:
            raise SecAggError(f"{sender!r} advertised keys twice")
        try:
            public_key_pair(message.public_keys)
        except SecAggError as exc:
            raise SecAggError(f"keys of {sender!r}: {exc}") from None
        self._advertised[sender] = message.public_keys

    def key_list(self) -> SecAggRelay:
        """Close step 1: U1 = devices that advertised keys; the ``keys`` relay."""
        if self._keys is None:
            n = len(self._advertised)
            threshold = max(self.threshold or 1, default_threshold(max(n, 1)))
            self._need(threshold, n, "advertised keys")
            self._key_list = SecAggRelay(self.round, "keys", threshold=threshold, public_keys=self._advertised)
            self._keys = advertised_keys(self._key_list)
            self._xs = shamir_xs(self._keys)
            self.threshold = threshold
        return self._key_list

    def _receive_shares(self, sender: str, message: SecAggUpload) -> None:
        if self._keys is None or self._u2 is not None:
            raise SecAggError(f"shares of {sender!r} arrived outside the share-keys step")
        if sender not in self._keys:
            raise SecAggError(f"{sender!r} sent shares but did not advertise keys")
        expected = set(self._keys) - {sender}
        if set(message.ciphertexts) != expected:
            raise SecAggError(f"shares of {sender!r} must be addressed to exactly the other {len(expected)} devices")
        if sender in self._shares:
            raise SecAggError(f"{sender!r} sent shares twice")
        self._shares[sender] = message

    def forward(self) -> SecAggRelay:
        """Close step 2: U2 = devices that sent shares; the ``shares`` relay holds, per
        device of U2, the ciphertexts addressed to it."""
        if self._keys is None:
            raise SecAggError("forward() before key_list()")
        if self._u2 is None:
            self._need(self.threshold, len(self._shares), "shared keys")
            self._u2 = tuple(sorted(self._shares))
        return SecAggRelay(
            self.round,
            "shares",
            ciphertexts={v: {u: self._shares[u].ciphertexts[v] for u in self._u2 if u != v} for v in self._u2},
        )

    def _receive_masked(self, sender: str, message: SecAggUpload) -> None:
        if self._u2 is None or self._request is not None:
            raise SecAggError(f"masked input of {sender!r} arrived outside the masked-input step")
        if sender not in self._u2:
            raise SecAggError(f"{sender!r} sent a masked input but did not share keys")
        if message.masked.shape != (self.vector_size,):
            raise SecAggError(
                f"masked input of {sender!r} has shape {message.masked.shape}, expected ({self.vector_size},)"
            )
        if sender in self._masked:
            raise SecAggError(f"{sender!r} sent its masked input twice")
        self._masked[sender] = message.masked.view(np.uint64)

    def unmask_request(self) -> SecAggRelay:
        """Close step 3: U3 = devices whose masked input arrived; the ``unmask`` relay names
        U3 (survivors) and U2 minus U3 (dropped)."""
        if self._u2 is None:
            raise SecAggError("unmask_request() before forward()")
        if self._request is None:
            self._need(self.threshold, len(self._masked), "sent masked inputs")
            self._request = SecAggRelay(
                self.round,
                "unmask",
                survivors=tuple(sorted(self._masked)),
                dropped=tuple(d for d in self._u2 if d not in self._masked),
            )
        return self._request

    def _receive_unmask(self, sender: str, message: SecAggUpload) -> None:
        if self._request is None:
            raise SecAggError(f"unmask response of {sender!r} arrived before the unmask request")
        if sender not in self._request.survivors:
            raise SecAggError(f"{sender!r} sent an unmask response but is not a survivor")
        if set(message.b_shares) != set(self._request.survivors) or set(message.key_shares) != set(
            self._request.dropped
        ):
            raise SecAggError(f"unmask response of {sender!r} does not match the request")
        if sender in self._responses:
            raise SecAggError(f"{sender!r} sent its unmask response twice")
        self._responses[sender] = message

    def aggregate(self) -> AggregateResult:
        """Close step 4 and unmask: the exact sum (mod 2^64) of the survivors' inputs.

        Raises
        ------
        NotEnoughSurvivors
            Fewer than ``threshold`` unmask responses.
        SecAggError
            A reconstructed secret does not match its commitment (a corrupted share).
        """
        request = self.unmask_request()
        self._need(self.threshold, len(self._responses), "answered the unmask request")
        responders = sorted(self._responses, key=self._xs.__getitem__)[: self.threshold]
        weights = lagrange_at_zero([self._xs[r] for r in responders])

        def reconstruct(owner: str, kind: str) -> int:
            shares = (getattr(self._responses[r], kind)[owner].tobytes() for r in responders)
            return sum(w * from_field_bytes(s, f"share of {owner!r}") for w, s in zip(weights, shares)) % FIELD_PRIME

        m = self.vector_size
        total = np.zeros(m, dtype=np.uint64)
        for u in request.survivors:
            total += self._masked[u]
        for u in request.survivors:
            b_value = reconstruct(u, "b_shares")
            b = b_value.to_bytes(FIELD_BYTES, "big")[-KEY_BYTES:]
            if b_value >= 1 << 256 or hashlib.sha256(b).digest() != self._shares[u].commitment.tobytes():
                raise SecAggError(f"reconstructed self-mask seed of {u!r} does not match its commitment")
            total -= prg_words(self_seed(b, self.session, u), m)
        for d in request.dropped:
            key_value = reconstruct(d, "key_shares")
            if key_value >= 1 << 256:
                raise SecAggError(f"reconstructed mask key of {d!r} is out of range")
            s_sk = X25519PrivateKey.from_private_bytes(key_value.to_bytes(KEY_BYTES, "big"))
            if public_bytes(s_sk) != self._keys[d][1]:
                raise SecAggError(f"reconstructed mask key of {d!r} does not match its advertised public key")
            for u in request.survivors:
                mask = prg_words(pairwise_seed(s_sk, self._keys[u][1], self.session, d, u), m)
                # u added +mask when u < d and -mask when d < u: remove it.
                total = total - mask if u < d else total + mask
        return AggregateResult(total, request.survivors, request.dropped)


_NEXT = {"advertise": "shares", "shares": "masked", "masked": "unmask", "unmask": "done"}


class SecureAggregationRound:
    """One secure-aggregation round as seen by the coordinator.

    Parameters
    ----------
    fleet : str
    round : int
        The task's round number (part of the session every key is bound to).
    participants : iterable of str
        Devices selected for the round.
    vector_size : int
        Model parameter count (length of every masked input).
    threshold : int
        ``Task.secagg_threshold`` (n_min); raised to a majority of the devices that
        advertise keys (:class:`SecAggServer`).
    advertise_deadline : float
        Unix time the ``advertise`` step closes at the latest (the task deadline).
    step_timeout_s : float
        Duration of each later step.
    fixed_point : FixedPoint
        The devices' encoding (decodes the sum).
    clock : callable
        Unix time now (injectable for tests).
    """

    def __init__(
        self,
        *,
        fleet: str,
        round: int,
        participants: Iterable[str],
        vector_size: int,
        threshold: int,
        advertise_deadline: float,
        step_timeout_s: float,
        fixed_point: FixedPoint = FixedPoint(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s!r}")
        self.round = round
        self.participants = frozenset(participants)
        self.threshold = int(threshold)
        self.fixed_point = fixed_point
        self.step_timeout_s = float(step_timeout_s)
        self._clock = clock
        self._server = SecAggServer(fleet, round, vector_size=vector_size, threshold=threshold)
        self.step = "advertise"
        self.deadline = float(advertise_deadline)
        self._expected = set(self.participants)
        self._arrived: set[str] = set()
        self.result: AggregateResult | None = None
        self.failure: str | None = None

    def __repr__(self) -> str:
        return (
            f"SecureAggregationRound(round={self.round}, step={self.step!r}, "
            f"{len(self._arrived)}/{len(self._expected)} arrived)"
        )

    @property
    def expected(self) -> frozenset[str]:
        """Devices whose message the current step waits for."""
        return frozenset(self._expected)

    @property
    def finished(self) -> bool:
        """True once the sum is known or the round failed."""
        return self.step in ("done", "failed")

    def handle(self, sender: str, payload: SecAggUpload) -> None:
        """Accept one device's step message (sender = the verified envelope sender).

        Raises
        ------
        SecAggError
            The message does not fit the round (other round or step, not expected from
            this device, duplicate, malformed for the protocol); the caller logs and drops it.
        """
        if payload.round != self.round:
            raise SecAggError(f"secagg {payload.step} for round {payload.round}, the open round is {self.round}")
        if payload.step != self.step:
            raise SecAggError(f"secagg {payload.step} from {sender!r} while the round is at step {self.step!r}")
        if sender not in self._expected:
            raise SecAggError(f"{sender!r} is not expected at step {self.step!r} of round {self.round}")
        if sender in self._arrived:
            raise SecAggError(f"{sender!r} already answered step {self.step!r}")
        self._server.receive(sender, payload)
        self._arrived.add(sender)

    def poll(self) -> SecAggRelay | None:
        """Close the current step if everybody expected answered or its deadline passed.

        Returns
        -------
        SecAggRelay or None
            The broadcast opening the next step, or None (step still open, or the round
            just finished: check :attr:`finished`, :attr:`result`, :attr:`failure`).
        """
        if self.finished:
            return None
        now = self._clock()
        if self._arrived != self._expected and now < self.deadline:
            return None
        missing = sorted(self._expected - self._arrived)
        if missing:
            logger.info("round %d secagg step %s closes without %s", self.round, self.step, ", ".join(missing))
        try:
            relay = self._close()
        except SecAggError as exc:  # too few survivors, or a corrupted share at the unmasking
            self.failure = f"step {self.step}: {exc}"
            logger.warning("round %d secure aggregation abandoned at %s", self.round, self.failure)
            self.step = "failed"
            return None
        self.step = _NEXT[self.step]
        self.deadline = now + self.step_timeout_s
        self._arrived = set()
        return relay

    def _close(self) -> SecAggRelay | None:
        if self.step == "advertise":
            keys = self._server.key_list()
            self._expected = set(keys.public_keys)
            return keys
        if self.step == "shares":
            forwarded = self._server.forward()
            self._expected = set(forwarded.ciphertexts)
            return forwarded
        if self.step == "masked":
            request = self._server.unmask_request()
            self._expected = set(request.survivors)
            return request
        self.result = self._server.aggregate()
        return None

    def mean_update(self) -> np.ndarray:
        """The uniform mean of the survivors' noised, clipped updates, (P,) float64."""
        if self.result is None:
            raise SecAggError(f"round {self.round} has no aggregate (step {self.step!r}, failure {self.failure!r})")
        return self.fixed_point.decode(self.result.total) / len(self.result.survivors)

    def noise_multiplier(self, z_target: float) -> float:
        """The effective z of the revealed sum (what the ledger records)."""
        if self.result is None:
            raise SecAggError(f"round {self.round} has no aggregate to account")
        return distributed_noise_multiplier(z_target, self.threshold, len(self.result.survivors))
