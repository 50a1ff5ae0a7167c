"""Base class of the baselines whose aggregation is a numpy function of pseudo-gradients."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

from flwr_invariant.screened_replies import ScreenedReplies

from .common import apply_step, flat_pseudo_gradients

__all__ = ["PseudoGradientStrategy", "RoundUpdates"]


@dataclass
class RoundUpdates:
    """The valid updates of one round, as the numpy baselines see them.

    pseudo_gradients: ``(N, P)`` float32, ``g_i = w - w_i`` over the floating layers.
    node_ids: ``(N,)`` ids of the nodes that sent them (stable across rounds).
    num_examples: ``(N,)`` their reported training examples.
    layer_slices: where each floating layer lies in ``P`` (in model order).
    layer_shapes: the shapes of those layers.
    global_flat: ``(P,)`` the global weights of those layers.
    layer_names: the model's keys of those layers (empty when unknown).
    """

    server_round: int
    pseudo_gradients: np.ndarray
    node_ids: list[int]
    num_examples: np.ndarray
    layer_slices: list[slice]
    layer_shapes: list[tuple[int, ...]]
    global_flat: np.ndarray
    layer_names: list[str] = field(default_factory=list)


class PseudoGradientStrategy(ScreenedReplies, FedAvg):
    """A Message API ``FedAvg`` whose server step comes from :meth:`server_step`.

    Bad replies are screened out first (see ``ScreenedReplies``); the valid
    ones become flat pseudo-gradients ``G`` (``(N, P)``, ``g_i = w - w_i``), and
    the new weights are ``w - server_step(G, ...)``. Non-floating arrays take
    the coordinate-wise median. Keyword arguments are ``FedAvg``'s.
    """

    def aggregate_updates(
        self,
        server_round: int,
        global_weights: list[np.ndarray],
        updates: list[list[np.ndarray]],
        messages: list[Message],
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """Weights ``w - server_step(G)`` and the step's metrics plus the clients' metrics."""
        float_layers = [w for w in global_weights if w.dtype.kind == "f"]
        offsets = np.cumsum([0] + [w.size for w in float_layers])
        round_updates = RoundUpdates(
            server_round=server_round,
            pseudo_gradients=flat_pseudo_gradients(global_weights, updates),
            node_ids=[int(msg.metadata.src_node_id) for msg in messages],
            num_examples=np.array(
                [_num_examples(msg, self.weighted_by_key) for msg in messages], dtype=float
            ),
            layer_slices=[slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)],
            layer_shapes=[w.shape for w in float_layers],
            global_flat=np.concatenate([np.ravel(w) for w in float_layers]).astype(np.float32, copy=False),
            layer_names=[
                k
                for k, w in zip(self._global_arrays.keys(), global_weights, strict=True)
                if w.dtype.kind == "f"
            ],
        )
        step, metrics = self.server_step(round_updates)
        return apply_step(global_weights, updates, step), {**metrics, **self.train_metrics(messages)}

    @abstractmethod
    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The flat step (shape ``(P,)``) subtracted from the global weights, and metrics."""


def _num_examples(message: Message, key: str) -> float:
    return float(next(iter(message.content.metric_records.values()))[key])
