"""The balancing losses and routing statistics of one MoE call, each computed when needed.

Shapes: T tokens, E experts, A assignments.

A layer's forward needs few of them: training adds the weighted loss (only the terms with
a nonzero coefficient) and reads the tokens per expert; decoding reads none. Computing all
of them on every call cost about half the layer forward's host time on a GPU (1.47 of
2.74 ms) and about a third of a tiny model's decode step on CPU (3.55 ms against 2.41-2.45
without them; both in benchmarks/README.md). So each is a cached property, computed on
first read and then kept:

- in the grad mode of the forward that made it, whatever the mode at the read, so a
  statistic read inside `torch.no_grad()` or `torch.inference_mode()` after a training
  forward still carries its graph, and one from a no-grad forward never does;
- eagerly for `loss` when grad is enabled (MoE.forward asks for it): its graph goes through
  the router, which backward of the layer output frees;
- eagerly for all when the path's statistics need collectives (expert or data parallelism):
  every rank must join each all-reduce in the same order, whatever its caller reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from moekit import losses
from moekit.config import MoEConfig
from moekit.lazy import computed_once
from moekit.losses import GroupSum
from moekit.router import Routing

LOSS_TERMS = ("aux_loss", "seq_aux_loss", "z_loss")
"""The unweighted losses that `loss` weighs, in the order they are summed."""
STATISTICS = ("loss", *LOSS_TERMS, "router_entropy", "dropped_fraction")


class RoutingStats:
    """The statistics of one call: `routed` before capacity drops, `routing` after.

    routed_E, kept_E [E]: assignments per expert before and after the drops (the same
    tensor when nothing can drop); seq_T [T]: each real token's sequence; seqs_span_group:
    the ranks of the group hold parts of the same sequences (a [T, D] call's one sequence).
    """

    def __init__(
        self,
        config: MoEConfig,
        routing: Routing,
        routed: Routing,
        routed_E: Tensor,
        kept_E: Tensor,
        seq_T: Tensor,
        num_seqs: int,
        group_sum: GroupSum,
        seqs_span_group: bool = False,
    ) -> None:
        self.config = config
        self.routing, self.routed = routing, routed
        self.routed_E, self.kept_E = routed_E, kept_E
        self.seq_T, self.num_seqs = seq_T, num_seqs
        self.group_sum = group_sum
        self.seqs_span_group = seqs_span_group
        self.grad_enabled = torch.is_grad_enabled()
        # torch.compile cannot trace the inference-mode query (a graph break in every
        # layer, which also splits CUDA graphs); a compiled forward's statistics are
        # read in its own mode, or later outside inference mode with grad off (allowed
        # on inference tensors).
        self.inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()

    def _forward_mode(self) -> AbstractContextManager[None]:
        """The forward's autograd mode, whatever the reader's.

        Both: inside inference mode, enabling grad alone records nothing. While
        compiling, the grad mode alone: torch.compile traces set_grad_enabled but neither
        the inference-mode query nor a generator-based context manager (either is a graph
        break in every layer), and a compiled forward is not recorded in inference mode.
        """
        if torch.compiler.is_compiling():
            return torch.set_grad_enabled(self.grad_enabled)
        return _autograd_mode(self.inference, self.grad_enabled)

    def compute_all(self) -> None:
        """Every statistic now, in a fixed order (the order of their collectives)."""
        for name in STATISTICS:
            getattr(self, name)

    @computed_once
    def aux_loss(self) -> Tensor:
        with self._forward_mode():
            r = self.routed
            return losses.switch_aux_loss(
                r.probs_TE, r.expert_A, self.config.num_experts, self.group_sum, self.routed_E
            )

    @computed_once
    def seq_aux_loss(self) -> Tensor:
        cfg, r = self.config, self.routed
        with self._forward_mode():
            return losses.sequence_aux_loss(
                r.probs_TE,
                r.expert_A,
                r.token_A,
                self.seq_T,
                self.num_seqs,
                cfg.num_experts,
                cfg.top_k,
                self.group_sum,
                self.seqs_span_group,
            )

    @computed_once
    def z_loss(self) -> Tensor:
        with self._forward_mode():
            return losses.z_loss(self.routing.logits_TE, self.group_sum)

    @computed_once
    def loss(self) -> Tensor:
        cfg = self.config
        coefs = (cfg.aux_loss_coef, cfg.seq_aux_loss_coef, cfg.z_loss_coef)
        with self._forward_mode():
            # Terms with a zero coefficient stay out (and are never computed for it), so
            # backward skips their graphs. Adding 0 * finite is exact, so the sum equals
            # the full weighted sum bit for bit.
            weighted = zip(coefs, LOSS_TERMS, strict=True)
            terms = [c * getattr(self, name) for c, name in weighted if c != 0]
            if not terms:  # a zero that still reaches the router, as the full sum would
                return self.aux_loss * 0.0
            return sum(terms[1:], terms[0])

    @computed_once
    def router_entropy(self) -> Tensor:
        return losses.router_entropy(self.routing.probs_TE, self.group_sum)

    @computed_once
    def dropped_fraction(self) -> Tensor:
        with torch.no_grad():
            # Routed and kept assignments, summed on the device: a tensor made from their
            # host-side numel() would be a copy from the host per call.
            counts = self.group_sum(torch.stack([self.routed_E.sum(), self.kept_E.sum()]).float())
            # 0 when nothing was routed, tested without a host sync.
            return (1 - counts[1] / counts[0].clamp(min=1)) * (counts[0] > 0)


@contextmanager
def _autograd_mode(inference: bool, grad_enabled: bool) -> Iterator[None]:
    with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
        yield
