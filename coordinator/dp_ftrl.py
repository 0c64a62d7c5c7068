"""DP-FTRL with tree aggregation: private federated training without secret sampling.

Kairouz et al. 2021, "Practical and private (deep) learning without sampling or
shuffling" (arXiv:2103.00039), the algorithm behind Gboard's DP language models. Every
round each device sends its pseudo-gradient (the global model minus its locally trained
model), clipped to ``C``. The coordinator does not noise each round's sum independently:
it releases the *prefix sums* ``g_1 + ... + g_t`` through a binary tree
(:class:`biofed.coordinator.release.TreePrefixRelease`), so each device's contribution
sits in only ``log2(T) + 1`` noisy nodes, and sets

    theta_t = theta_0 - lr * (momentum-filtered noisy prefix) / n.

The privacy of all ``T`` rounds is one ``SingleEpochTreeAggregationDpEvent(z, T)`` (every
device in every round, no sampling to keep secret), charged before the first release.
"""

from __future__ import annotations

import dp_accounting
import numpy as np

from biofed.coordinator.release import ReleaseLedger, TreePrefixRelease
from biofed.kernels.training import clip_l2

__all__ = ["DPFTRL"]


class DPFTRL:
    """Coordinator state of one DP-FTRL run over ``steps`` rounds.

    Parameters
    ----------
    initial : array-like, shape (P,)
        ``theta_0``.
    steps : int
        Rounds planned (all charged up front).
    clip : float
        L2 bound of a device's pseudo-gradient.
    noise_multiplier : float
        Tree-node noise std over ``clip``.
    lr : float
        Server learning rate.
    momentum : float
        Heavy-ball momentum on the noisy per-round gradient recovered from the prefix sums
        (DP-FTRLM in the paper); 0 disables it.
    ledger : ReleaseLedger
    """

    def __init__(self, initial, steps: int, *, clip: float, noise_multiplier: float, lr: float,
                 momentum: float = 0.0, ledger: ReleaseLedger) -> None:
        self.theta0 = np.asarray(initial, dtype=np.float64).copy()
        self.theta = self.theta0.copy()
        self.clip = float(clip)
        self.lr = float(lr)
        self.momentum = float(momentum)
        z = float(noise_multiplier)
        event = dp_accounting.SingleEpochTreeAggregationDpEvent(z, int(steps))
        self._tree = TreePrefixRelease(int(steps), z * self.clip, event, ledger)
        self._previous_prefix = np.zeros_like(self.theta0)
        self._velocity = np.zeros_like(self.theta0)
        self._update_sum = np.zeros_like(self.theta0)

    def step(self, pseudo_gradients) -> np.ndarray:
        """One round: clip every device's ``theta - theta_local``, release, update; returns theta."""
        grads = [clip_l2(np.asarray(g, dtype=np.float64), self.clip)[0] for g in pseudo_gradients]
        if not grads:
            raise ValueError("a DP-FTRL round needs at least one device's pseudo-gradient")
        n = len(grads)
        prefix = self._tree.release_prefix(np.sum(grads, axis=0)) / n
        noisy_gradient = prefix - self._previous_prefix
        self._previous_prefix = prefix
        self._velocity = self.momentum * self._velocity + noisy_gradient
        self._update_sum += self._velocity
        self.theta = self.theta0 - self.lr * self._update_sum
        return self.theta.copy()
