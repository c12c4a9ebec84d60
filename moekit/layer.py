"""The MoE layer: router -> (capacity) -> experts via a path -> combine (+ shared experts).

Shapes: B batch, S sequence, T tokens (B*S), D model dim, E experts, A assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import capacity, capacity_keep, count_ids
from moekit.experts import ExpertBank
from moekit.mlp import MLP
from moekit.paths import PATHS
from moekit.router import ROUTERS, Routing, SigmoidBias


@dataclass
class MoEOutput:
    """Routing results of one MoE call; statistics cover real (non-padding) tokens only."""

    loss: Tensor
    """Weighted sum of the balancing losses with the config's coefficients: add to training."""
    aux_loss: Tensor
    """Switch/GShard loss, unweighted; exactly 1.0 for a perfectly uniform router."""
    seq_aux_loss: Tensor
    """Sequence-level balancing loss (DeepSeek-V2/V3), unweighted; 1.0 when uniform."""
    z_loss: Tensor
    """Router z-loss (ST-MoE), unweighted."""
    tokens_per_expert: Tensor
    """[E] float32: assignments each expert computed (after capacity drops)."""
    dropped_fraction: Tensor
    """Share of routed assignments dropped by capacity (0 when dropless)."""
    router_entropy: Tensor
    """Mean entropy of the router distribution, in nats."""
    token_ids: Tensor
    """[A] long: flat input position (index into x.reshape(-1, D)) of each kept assignment."""
    expert_ids: Tensor
    """[A] long: the expert of each kept assignment."""


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    `y, out = moe(x, padding_mask=None)` with x [B, S, D] or [T, D]; y has x's shape.
    padding_mask (bool, x.shape[:-1]) is True at padding: those tokens are not routed,
    get y = 0, and count in no statistic or loss.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(
                f"config must be a MoEConfig, got {type(config).__name__} {config!r:.200}"
            )
        self.config = config
        self.router = ROUTERS[config.router](config)
        self.experts = ExpertBank(config)
        self.path = PATHS[config.impl]()
        self.shared_experts = (
            MLP(config.d_model, config.shared_width, config.activation)
            if config.num_shared_experts
            else None
        )
        self.shared_expert_gate = (
            nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, MoEOutput]:
        cfg = self.config
        x_TD, seq_T, num_seqs = self._flatten(x)
        real_T = self._real_tokens(x, padding_mask)
        if real_T is not None:
            x_TD, seq_T = x_TD.index_select(0, real_T), seq_T.index_select(0, real_T)
        T = x_TD.shape[0]

        routing = self.router(x_TD)
        # The balancing losses see the router's choices before capacity drops: Switch
        # (Fedus et al. 2021, eq. 2) counts f_e from the argmax, so an overloaded expert
        # keeps being pushed back instead of looking balanced once capped at C.
        routed = routing
        if cfg.capacity_factor is not None and cfg.router != "expert_choice":
            cap = capacity(T, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            keep_A = capacity_keep(
                routing.expert_A,
                routing.weight_A,
                routing.slot_A,
                routing.token_A,
                cfg.num_experts,
                cap,
                cfg.drop_policy,
            )
            routing = routing.select(keep_A)

        y_TD = self.path(x_TD, routing, self.experts)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        out = self._output(routing, routed, seq_T, num_seqs)
        if real_T is not None:
            y_full = y_TD.new_zeros(x.numel() // cfg.d_model, cfg.d_model)
            y_TD = y_full.index_copy(0, real_T, y_TD)
            out.token_ids = real_T[out.token_ids]
        return y_TD.view(x.shape), out

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """Auxiliary-loss-free balancing step (sigmoid_bias router); a no-op for others.

        Call after each optimizer step with the load observed since the last call.
        """
        if isinstance(self.router, SigmoidBias):
            self.router.update_bias(tokens_per_expert)

    def _flatten(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        D = self.config.d_model
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"x must have shape [B, S, {D}] or [T, {D}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, D)
        if x.dim() == 3:
            B, S = x.shape[:2]
            seq_T = torch.arange(B, device=x.device).repeat_interleave(S)
            return x_TD, seq_T, B
        return x_TD, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1

    @staticmethod
    def _real_tokens(x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        if padding_mask is None:
            return None
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            kind = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask)
            raise TypeError(f"padding_mask must be a bool tensor (True = padding), got {kind}")
        if padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"padding_mask must have shape {tuple(x.shape[:-1])}, "
                f"got {tuple(padding_mask.shape)}"
            )
        return (~padding_mask).reshape(-1).nonzero().squeeze(1)

    def _output(self, routing: Routing, routed: Routing, seq_T: Tensor, num_seqs: int) -> MoEOutput:
        cfg = self.config
        gs = self.path.group_sum
        E = cfg.num_experts
        # One count serves the aux loss and the load statistic unless capacity dropped
        # assignments in between.
        routed_E = count_ids(routed.expert_A, E)
        kept_E = routed_E if routing is routed else count_ids(routing.expert_A, E)
        aux = losses.switch_aux_loss(routed.probs_TE, routed.expert_A, E, gs, counts_E=routed_E)
        seq_aux = losses.sequence_aux_loss(
            routed.probs_TE,
            routed.expert_A,
            routed.token_A,
            seq_T,
            num_seqs,
            E,
            cfg.top_k,
            gs,
        )
        z = losses.z_loss(routing.logits_TE, gs)
        with torch.no_grad():
            tokens_per_expert = gs(kept_E.float())
            # The numbers of routed and kept assignments, summed on the device: a tensor
            # made from their host-side numel() would be a copy from the host per call.
            counts = gs(torch.stack([routed_E.sum(), kept_E.sum()]).float())
            # 0 when nothing was routed, tested without a host sync.
            dropped = (1 - counts[1] / counts[0].clamp(min=1)) * (counts[0] > 0)
        # Terms with a zero coefficient stay out of the sum, so backward skips their graphs;
        # each loss keeps its own graph and value in the output. Adding 0 * finite is exact,
        # so the sum equals the full weighted sum bit for bit.
        terms = [
            c * t
            for c, t in (
                (cfg.aux_loss_coef, aux),
                (cfg.seq_aux_loss_coef, seq_aux),
                (cfg.z_loss_coef, z),
            )
            if c != 0
        ]
        loss = sum(terms[1:], terms[0]) if terms else aux * 0.0
        return MoEOutput(
            loss=loss,
            aux_loss=aux,
            seq_aux_loss=seq_aux,
            z_loss=z,
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=dropped,
            router_entropy=losses.router_entropy(routing.probs_TE, gs),
            token_ids=routing.token_A.detach(),
            expert_ids=routing.expert_A.detach(),
        )
