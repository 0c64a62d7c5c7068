"""DP-FTRL with tree aggregation: private federated training without secret sampling.

Kairouz et al. 2021, "Practical and private (deep) learning without sampling or
shuffling" (arXiv:2103.00039), the algorithm behind Gboard's DP language models. Every
round a *public, fixed* group of devices sends its pseudo-gradients (the global model minus
each locally trained model), each clipped to ``C``. The coordinator does not noise each
round's sum independently: the privacy mechanism releases the *prefix sums*
``g_1 + ... + g_t`` of the epoch through a binary tree
(:meth:`biofed.privacy_mechanism.PrivacyMechanism.open_tree`), so each round's sum sits in
only ``log2(T) + 1`` noisy nodes, and sets

    theta_t = theta_start - lr * (momentum-filtered noisy prefix) / group size.

Accounting (dp-accounting's ``SingleEpochTreeAggregationDpEvent``, RDP under the
``REPLACE_SPECIAL`` relation; see :mod:`biofed.privacy_ledger`) requires every device to
contribute **at most once per tree**. So one tree covers one *epoch* — a pass in which each
device is in at most one round — and a new tree starts every epoch (from the current
model); ``E`` epochs of ``T`` rounds cost ``E`` composed ``SingleEpochTreeAggregationDpEvent(z, T)``,
each charged when its epoch starts. The mechanism refuses a device that already contributed
to the current tree, since that would make the charged event wrong. No sampling has to stay
secret: the schedule may be public.
"""

from __future__ import annotations

from collections.abc import Mapping

import dp_accounting
import numpy as np

from biofed.privacy_ledger import tree_event
from biofed.privacy_mechanism import Charge, PrivacyMechanism, TreeAggregation

__all__ = ["DPFTRL", "dp_ftrl_event"]


def dp_ftrl_event(noise_multiplier: float, rounds_per_epoch: int, epochs: int) -> dp_accounting.DpEvent:
    """Every release of a DP-FTRL run: one tree per epoch, each device at most once per tree."""
    tree = tree_event(noise_multiplier, rounds_per_epoch)
    return tree if epochs == 1 else dp_accounting.SelfComposedDpEvent(tree, int(epochs))


class DPFTRL:
    """Coordinator state of one DP-FTRL run: ``epochs`` trees of ``rounds_per_epoch`` rounds.

    Parameters
    ----------
    initial : array-like, shape (P,)
        ``theta_0``.
    rounds_per_epoch : int
        Rounds per tree; each device may contribute to at most one of them.
    epochs : int
        Trees; each is charged through ``mechanism`` when it starts, before its first release.
    clip : float
        L2 bound of a device's pseudo-gradient.
    noise_multiplier : float
        Tree-node noise std over ``clip``.
    lr : float
        Server learning rate.
    momentum : float
        Heavy-ball momentum on the noisy per-round gradient recovered from the prefix sums
        (DP-FTRLM in the paper); 0 disables it.
    mechanism : PrivacyMechanism
        The gate that charges each tree and draws its noise.
    first_round : int
        Ledger round of the first round; epoch ``e``'s tree is charged as round
        ``first_round + e * rounds_per_epoch`` (of ``kind``) and covers its rounds.
    kind : str
        Ledger kind of the trees.
    """

    def __init__(
        self,
        initial,
        rounds_per_epoch: int,
        epochs: int = 1,
        *,
        clip: float,
        noise_multiplier: float,
        lr: float,
        momentum: float = 0.0,
        mechanism: PrivacyMechanism,
        first_round: int = 0,
        kind: str = "train",
    ) -> None:
        for value, name in ((rounds_per_epoch, "rounds_per_epoch"), (epochs, "epochs")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(mechanism, PrivacyMechanism):
            raise TypeError(f"mechanism must be a PrivacyMechanism, got {type(mechanism).__name__}.")
        self.theta = np.asarray(initial, dtype=np.float64).copy()
        self.rounds_per_epoch = int(rounds_per_epoch)
        self.epochs = int(epochs)
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.first_round = int(first_round)
        self.kind = kind
        self._mechanism = mechanism
        self._epoch = 0
        self._tree: TreeAggregation | None = None

    def _start_epoch(self) -> None:
        if self._epoch >= self.epochs:
            raise RuntimeError(f"all {self.epochs} epoch(s) of {self.rounds_per_epoch} rounds were run")
        charge = Charge(
            self.first_round + self._epoch * self.rounds_per_epoch,
            self.kind,
            1.0,
            self.noise_multiplier,
            tree_steps=self.rounds_per_epoch,
        )
        self._tree = self._mechanism.open_tree(charge, self.clip)
        self._epoch += 1
        self._start = self.theta.copy()
        self._previous_prefix = np.zeros_like(self.theta)
        self._velocity = np.zeros_like(self.theta)
        self._update_sum = np.zeros_like(self.theta)

    def step(self, pseudo_gradients: Mapping[str, np.ndarray]) -> np.ndarray:
        """One round: ``{device_id: theta - theta_local}``, clipped, released, applied; returns theta."""
        if not pseudo_gradients:
            raise ValueError("a DP-FTRL round needs at least one device's pseudo-gradient")
        if self._tree is None or self._tree.released == self.rounds_per_epoch:
            self._start_epoch()
        rows = np.stack([np.asarray(g, dtype=np.float64) for g in pseudo_gradients.values()])
        prefix = self._tree.release_prefix(rows, pseudo_gradients.keys()) / len(pseudo_gradients)
        noisy_gradient = prefix - self._previous_prefix
        self._previous_prefix = prefix
        self._velocity = self.momentum * self._velocity + noisy_gradient
        self._update_sum += self._velocity
        self.theta = self._start - self.lr * self._update_sum
        return self.theta.copy()
