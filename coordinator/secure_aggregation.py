"""The coordinator's side of a ``distributed`` trust-mode round: secure aggregation steps.

:class:`SecureAggregationRound` drives one :class:`biofed.secagg.SecAggServer` over the
wire payloads of :mod:`biofed.protocol` (``secagg`` uploads in, ``secagg_relay``
broadcasts out) with one deadline per step. It holds no network code: the round loop
feeds it decoded uploads (:meth:`~SecureAggregationRound.handle`), asks it what to publish
(:meth:`~SecureAggregationRound.poll`) and reads the result.

Timeline of a round
-------------------
The devices train first, then advertise their keys, so the ``advertise`` step closes when
every participant has advertised or at the task deadline. Each later step (``shares``,
``masked``, ``unmask``) is pure cryptography on the devices and closes when every device
still in the round has answered or ``step_timeout_s`` after it opened. Devices missing at
a step's close are dropouts (see :mod:`biofed.secagg` for what that means at each step).
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

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np

from biofed.privacy_ledger import distributed_noise_multiplier
from biofed.secagg import (
    AggregateResult,
    FixedPoint,
    SecAggError,
    SecAggServer,
    from_upload,
    relay_payload,
    session_id,
)
from biofed.secure_aggregation.messages import SecAggRelay, SecAggUpload

logger = logging.getLogger(__name__)

__all__ = ["SecureAggregationRound"]

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
        advertise keys (:class:`biofed.secagg.SecAggServer`).
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
        self, *, fleet: str, round: int, participants: Iterable[str], vector_size: int, threshold: int,
        advertise_deadline: float, step_timeout_s: float, fixed_point: FixedPoint = FixedPoint(),
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
        self._server = SecAggServer(session_id(fleet, round), vector_size=vector_size, threshold=threshold)
        self.step = "advertise"
        self.deadline = float(advertise_deadline)
        self._expected = set(self.participants)
        self._arrived: set[str] = set()
        self.result: AggregateResult | None = None
        self.failure: str | None = None

    def __repr__(self) -> str:
        return (f"SecureAggregationRound(round={self.round}, step={self.step!r}, "
                f"{len(self._arrived)}/{len(self._expected)} arrived)")

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
        message = from_upload(sender, payload)
        receive = {"advertise": self._server.receive_advertise, "shares": self._server.receive_shares,
                   "masked": self._server.receive_masked, "unmask": self._server.receive_unmask}[self.step]
        receive(message)
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
            self._expected = set(keys.devices)
            return relay_payload(self.round, keys)
        if self.step == "shares":
            forwarded = self._server.forward()
            self._expected = set(forwarded)
            return relay_payload(self.round, forwarded)
        if self.step == "masked":
            request = self._server.unmask_request()
            self._expected = set(request.survivors)
            return relay_payload(self.round, request)
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
