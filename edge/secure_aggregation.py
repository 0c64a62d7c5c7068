"""The device's side of a ``distributed`` trust-mode round: secure aggregation steps.

After local training the agent turns its update into a :class:`SecureAggregationParticipant`
(clip to ``Task.clip_norm``, add its noise share of std
``Task.noise_multiplier * clip_norm / sqrt(Task.secagg_threshold)``, fixed-point encode;
:func:`biofed.secagg.prepare_input`), publishes :meth:`~SecureAggregationParticipant.start`
(its keys) and answers each ``secagg_relay`` broadcast of the round with
:meth:`~SecureAggregationParticipant.handle`. The update itself never leaves the device
unmasked.

The participant refuses (:class:`biofed.secagg.SecAggError`, logged and dropped by the
agent) anything that would weaken the guarantee it calibrated its noise for: a key list
whose threshold is below ``Task.secagg_threshold`` or that names devices outside the
task's participants, and every unsafe unmask request (see :class:`biofed.secagg.SecAggClient`).
"""

from __future__ import annotations

import logging

import numpy as np

from biofed.privacy_mechanism import Charge, PrivacyMechanism
from biofed.protocol import Task
from biofed.secagg import (
    FixedPoint,
    KeyList,
    SecAggClient,
    SecAggError,
    from_relay,
    prepare_input,
    session_id,
    upload_payload,
)
from biofed.secure_aggregation.messages import SecAggRelay, SecAggUpload

logger = logging.getLogger(__name__)

__all__ = ["SecureAggregationParticipant"]


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

    def __init__(self, device_id: str, fleet: str, task: Task, delta: np.ndarray, *, mechanism: PrivacyMechanism,
                 charge: Charge, fixed_point: FixedPoint = FixedPoint()) -> None:
        if task.trust_mode != "distributed" or task.secagg_threshold < 1:
            raise SecAggError(
                f"round {task.round}: secure aggregation needs a distributed-mode task with secagg_threshold >= 1, "
                f"got trust_mode={task.trust_mode!r}, secagg_threshold={task.secagg_threshold}"
            )
        self.task = task
        self.encoded = prepare_input(delta, clip_norm=task.clip_norm, noise_multiplier=task.noise_multiplier,
                                     n_min=task.secagg_threshold, fixed_point=fixed_point, mechanism=mechanism,
                                     charge=charge)
        self._client = SecAggClient(device_id, session_id(fleet, task.round))
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
        return upload_payload(self.round, self._client.advertise())

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
        message = from_relay(relay, self._client.device_id)
        if relay.step == "keys":
            self._check_keys(message)
            answer, self.step = self._client.share_keys(message), "shares"
        elif relay.step == "shares":
            answer, self.step = self._client.masked_input(message, self.encoded), "unmask"
        else:
            answer, self.step = self._client.unmask(message), "done"
        return upload_payload(self.round, answer)

    def _check_keys(self, keys: KeyList) -> None:
        if keys.threshold < self.task.secagg_threshold:
            raise SecAggError(
                f"round {self.round}: key list threshold {keys.threshold} is below the task's secagg_threshold "
                f"{self.task.secagg_threshold} this device calibrated its noise share for; refusing"
            )
        if self.task.participants:
            strangers = set(keys.devices) - set(self.task.participants)
            if strangers:
                raise SecAggError(f"round {self.round}: key list names devices outside the task: {sorted(strangers)}")
