"""The MoE layer: router -> (capacity) -> experts via a path -> combine (+ shared experts).

Shapes: B batch, S sequence, T tokens (B*S), D model dim, E experts, A assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.dispatch import capacity, capacity_keep, count_ids
from moekit.experts import ExpertBank
from moekit.mlp import MLP
from moekit.paths import PATHS
from moekit.router import ROUTERS, Routing, SigmoidBias
from moekit.routing_stats import STATISTICS, RoutingStats
from moekit.validate import check_bool, check_padding_mask


class MoEOutput:
    """Routing results of one MoE call; statistics cover real (non-padding) tokens only.

    `tokens_per_expert`, `token_ids` and `expert_ids` are tensors from the start. The
    losses and the other statistics are computed on first read, in the forward's grad
    mode, and then kept (moekit.routing_stats says why and when they are computed
    eagerly instead). Until then it holds the call's routing ([T, E] probabilities and
    logits among it): across many batches keep the numbers you need, not the outputs.
    """

    def __init__(
        self,
        stats: RoutingStats,
        tokens_per_expert: Tensor,
        routed_tokens_per_expert: Tensor,
        token_ids: Tensor,
        expert_ids: Tensor,
    ) -> None:
        self._stats = stats
        self.tokens_per_expert = tokens_per_expert
        """[E] float32: assignments each expert computed (after capacity drops)."""
        self.routed_tokens_per_expert = routed_tokens_per_expert
        """[E] float32: assignments the router chose for each expert, before capacity drops
        (the same tensor when dropless): the load `MoE.update_bias` takes. After drops every
        overloaded expert sits at the capacity, which hides how overloaded it is."""
        self.token_ids = token_ids
        """[A] long: flat input position (index into x.reshape(-1, D)) of each kept assignment."""
        self.expert_ids = expert_ids
        """[A] long: the expert of each kept assignment."""

    @property
    def loss(self) -> Tensor:
        """Weighted sum of the balancing losses with the config's coefficients: add to training."""
        return self._stats.loss

    @property
    def aux_loss(self) -> Tensor:
        """Switch/GShard loss, unweighted; exactly 1.0 for a perfectly uniform router."""
        return self._stats.aux_loss

    @property
    def seq_aux_loss(self) -> Tensor:
        """Sequence-level balancing loss (DeepSeek-V2/V3), unweighted; 1.0 when uniform."""
        return self._stats.seq_aux_loss

    @property
    def z_loss(self) -> Tensor:
        """Router z-loss (ST-MoE), unweighted."""
        return self._stats.z_loss

    @property
    def dropped_fraction(self) -> Tensor:
        """Share of routed assignments dropped by capacity (0 when dropless)."""
        return self._stats.dropped_fraction

    @property
    def router_entropy(self) -> Tensor:
        """Mean entropy of the router distribution, in nats."""
        return self._stats.router_entropy

    def __repr__(self) -> str:
        computed = [n for n in STATISTICS if n in vars(self._stats)]
        return (
            f"MoEOutput(tokens_per_expert={self.tokens_per_expert}, "
            f"assignments={self.expert_ids.numel()}, computed={computed})"
        )


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    `y, out = moe(x, padding_mask=None)` with x [B, S, D] or [T, D]; y has x's shape.
    padding_mask (bool, x.shape[:-1]) is True at padding: those tokens are not routed,
    get y = 0, and count in no statistic or loss. dropless=True routes every assignment
    whatever the capacity_factor (decoding: with drops a token's experts would depend on
    the other tokens of the call); expert-choice routing has no dropless form and refuses it.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(
                f"config must be a MoEConfig, got {type(config).__name__} {config!r:.200}"
            )
        self._config = config
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

    @property
    def config(self) -> MoEConfig:
        """The layer's configuration. Read-only: the router, the path and the expert bank
        were built from it, so a new one would apply in part (build a new layer instead)."""
        return self._config

    @config.setter
    def config(self, value: object) -> None:
        raise AttributeError(
            "MoE.config is read-only: the router, the expert path and the bank were built "
            "from it, so a new config would apply in part; build a new MoE(config)"
        )

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, *, dropless: bool = False
    ) -> tuple[Tensor, MoEOutput]:
        cfg = self.config
        check_bool("dropless", dropless)
        if dropless and cfg.router == "expert_choice":
            raise ValueError(
                "dropless=True cannot apply to router='expert_choice': each expert takes its "
                "C best tokens of the call, so a token's experts depend on the other tokens "
                "whatever is dropped"
            )
        x_TD, seq_T, num_seqs = self._flatten(x)
        real_T = self._real_tokens(x, padding_mask)
        if real_T is not None:
            x_TD, seq_T = x_TD.index_select(0, real_T), seq_T.index_select(0, real_T)
        T = x_TD.shape[0]

        routing = self.router(x_TD)
        # The balancing losses see the router's choices before capacity drops: Switch
        # (Fedus et al. 2021, eq. 5) counts f_e from the argmax, so an overloaded expert
        # keeps being pushed back instead of looking balanced once capped at C.
        routed = routing
        if cfg.capacity_factor is not None and cfg.router != "expert_choice" and not dropless:
            cap = capacity(T, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            keep_A = capacity_keep(
                routing.expert_A,
                routing.score_A,
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

        # A [T, D] call is one sequence; over several ranks, their tokens together are it.
        out = self._output(routing, routed, seq_T, num_seqs, seqs_span_group=x.dim() == 2)
        if real_T is not None:
            y_full = y_TD.new_zeros(x.numel() // cfg.d_model, cfg.d_model)
            y_TD = y_full.index_copy(0, real_T, y_TD)
            out.token_ids = real_T[out.token_ids]
        return y_TD.view(x.shape), out

    def reset_parameters(self) -> None:
        """Initialise every weight as construction does: for a layer built on `meta` and
        given storage by `to_empty` (a Transformer has its own `init_weights`)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """Auxiliary-loss-free balancing step (sigmoid_bias router); a no-op for others.

        Call after each optimizer step with the load routed since the last call
        (`MoEOutput.routed_tokens_per_expert`, summed over the calls). Its type and shape
        ([E]) are checked for every router, so a wrong load is caught before a router
        that uses it is configured; its values (finite, >= 0) only on the CPU. On a GPU
        they are not read back, which would wait for the device: a NaN there skips the
        step for every expert, a negative count pushes its expert's bias up.
        """
        E = self.config.num_experts
        if not isinstance(tokens_per_expert, Tensor):
            raise TypeError(
                f"tokens_per_expert must be a [{E}] tensor, got {type(tokens_per_expert).__name__}"
            )
        if tokens_per_expert.shape != (E,):
            # A 0-d total would broadcast and leave the bias where it is, silently.
            raise ValueError(
                f"tokens_per_expert must have shape [{E}] (one load per expert), "
                f"got {list(tokens_per_expert.shape)}"
            )
        # A NaN would make the mean NaN and sign() 0: the step skipped for every expert,
        # silently. The values are read only where that costs no wait: on a GPU the read
        # would stall the stream once per layer per step, and the training loop's loads
        # are the routers' own counts there.
        on_host = tokens_per_expert.device.type == "cpu"
        if on_host and not bool((tokens_per_expert.isfinite() & (tokens_per_expert >= 0)).all()):
            raise ValueError(
                f"tokens_per_expert must be finite counts >= 0, got {tokens_per_expert.tolist()}"
            )
        if isinstance(self.router, SigmoidBias):
            self.router.update_bias(tokens_per_expert)

    def _flatten(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        D = self.config.d_model
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        weight = self.experts.w_up_EFD
        # Else the router would run (it promotes to float32) and the experts' matmul fail.
        # Autocast casts float32 and half tensors to its dtype but leaves float64 alone, so
        # under it a float64 input or weight must still match: nn.Linear fails there too.
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and (not autocast or torch.float64 in (x.dtype, weight.dtype)):
            raise TypeError(
                f"x has dtype {x.dtype} and the layer's weights {weight.dtype}: convert one "
                f"(e.g. moe.to({x.dtype}))"
                + (" (autocast leaves float64 as it is)" if autocast else " or run under autocast")
            )
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
        check_padding_mask(padding_mask, tuple(x.shape[:-1]))
        return (~padding_mask).reshape(-1).nonzero().squeeze(1)

    def _output(
        self,
        routing: Routing,
        routed: Routing,
        seq_T: Tensor,
        num_seqs: int,
        seqs_span_group: bool,
    ) -> MoEOutput:
        gs = self.path.group_sum
        E = self.config.num_experts
        # One count serves the aux loss and the load statistic unless capacity dropped
        # assignments in between.
        routed_E = count_ids(routed.expert_A, E)
        kept_E = routed_E if routing is routed else count_ids(routing.expert_A, E)
        stats = RoutingStats(
            self.config, routing, routed, routed_E, kept_E, seq_T, num_seqs, gs, seqs_span_group
        )
        if self.path.collective_stats:
            stats.compute_all()
        elif torch.is_grad_enabled():
            stats.loss  # noqa: B018 - computed now, while the router's graph is whole
        with torch.no_grad():
            tokens_per_expert = gs(kept_E.float())
            routed = tokens_per_expert if routing is routed else gs(routed_E.float())
        return MoEOutput(
            stats,
            tokens_per_expert=tokens_per_expert,
            routed_tokens_per_expert=routed,
            token_ids=routing.token_A.detach(),
            expert_ids=routing.expert_A.detach(),
        )
