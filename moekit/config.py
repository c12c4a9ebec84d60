"""MoEConfig: every setting of one MoE layer, validated when it is made."""

from __future__ import annotations

from dataclasses import dataclass, fields

from moekit.validate import check_bool, check_choice, check_int, check_non_negative

ROUTER_NAMES = ("softmax_topk", "topk_softmax", "sigmoid_bias", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu")
DROP_POLICIES = ("probs", "position")
IMPLS = ("reference", "grouped")


@dataclass(frozen=True)
class MoEConfig:
    """One Mixture-of-Experts feed-forward layer."""

    d_model: int
    """Model width D: size of each token vector entering and leaving the layer."""
    d_ff: int
    """Hidden width F of each routed expert."""
    num_experts: int
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token K (for expert_choice: average experts per token, sets capacity)."""
    router: str = "softmax_topk"
    """Router: softmax_topk, topk_softmax, sigmoid_bias or expert_choice."""
    norm_topk_prob: bool = True
    """Renormalise the K selected weights to sum to 1 (softmax_topk, sigmoid_bias). With
    top_k=1 that makes every weight 1 and the router learns from the balancing losses only:
    `moekit train` refuses it."""
    num_groups: int = 1
    """Expert groups for group-limited routing (sigmoid_bias); 1 disables it."""
    topk_groups: int = 1
    """Groups each token may use when num_groups > 1."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' combine weights (DeepSeek-V3)."""
    bias_update_rate: float = 1e-3
    """Step of the auxiliary-loss-free bias update (sigmoid_bias), per call of update_bias."""
    router_jitter: float = 0.0
    """Training only: multiply router input by U(1-eps, 1+eps) (Switch Transformer)."""
    router_noise: float = 0.0
    """Training only: std of Gaussian noise added to router logits (noisy top-k)."""
    capacity_factor: float | None = None
    """None = dropless. Else each expert takes at most ceil(cf * T * K / E) tokens."""
    drop_policy: str = "probs"
    """Over capacity, drop the lowest router scores first (probs) or the latest tokens."""
    activation: str = "swiglu"
    """Expert MLP: swiglu (gate, up, down) or gelu (up, down)."""
    num_shared_experts: int = 0
    """Always-on shared experts, fused into one MLP of width num_shared_experts * shared_d_ff."""
    shared_d_ff: int | None = None
    """Hidden width per shared expert; None = d_ff."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x @ w) (Qwen2-MoE)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss (1.0 when perfectly balanced). Under
    expert_choice every expert is full by construction: the loss stays at 1.0, with no
    gradient, whatever this weight."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the per-sequence balancing loss (DeepSeek-V2/V3)."""
    z_loss_coef: float = 1e-3
    """Weight of the router z-loss (ST-MoE)."""
    impl: str = "grouped"
    """Expert computation: reference (loop over experts) or grouped (sorted, grouped GEMM)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "num_groups", "topk_groups"):
            check_int(name, getattr(self, name))
        check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        if self.shared_d_ff is not None:
            check_int("shared_d_ff", self.shared_d_ff)
        check_bool("norm_topk_prob", self.norm_topk_prob)
        check_bool("shared_expert_gate", self.shared_expert_gate)
        # Shared-expert settings without shared experts would be silently ignored.
        for name, value in (
            ("shared_expert_gate", self.shared_expert_gate),
            ("shared_d_ff", self.shared_d_ff),
        ):
            if value not in (False, None) and not self.num_shared_experts:
                raise ValueError(
                    f"{name}={value!r} needs num_shared_experts >= 1, "
                    f"got num_shared_experts={self.num_shared_experts!r}"
                )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k!r}"
            )
        check_choice("router", self.router, ROUTER_NAMES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice("impl", self.impl, IMPLS)
        for name in (
            "routed_scaling_factor",
            "bias_update_rate",
            "router_jitter",
            "router_noise",
            "aux_loss_coef",
            "seq_aux_loss_coef",
            "z_loss_coef",
        ):
            check_non_negative(name, getattr(self, name))
        if self.router_jitter >= 1.0:
            raise ValueError(f"router_jitter must be < 1, got {self.router_jitter!r}")
        if self.routed_scaling_factor == 0:
            raise ValueError("routed_scaling_factor must be > 0, got 0")
        if self.capacity_factor is not None:
            check_non_negative("capacity_factor", self.capacity_factor)
            if self.capacity_factor <= 0:
                raise ValueError(
                    f"capacity_factor must be > 0 or None, got {self.capacity_factor!r}"
                )
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups must divide num_experts ({self.num_experts}), got {self.num_groups!r}"
            )
        if self.topk_groups > self.num_groups:
            raise ValueError(
                f"topk_groups must be <= num_groups ({self.num_groups}), got {self.topk_groups!r}"
            )
        if self.num_groups > 1:
            if self.router != "sigmoid_bias":
                raise ValueError(
                    f"num_groups > 1 needs router='sigmoid_bias', got router={self.router!r}"
                )
            if self.topk_groups * self.experts_per_group < self.top_k:
                raise ValueError(
                    f"topk_groups ({self.topk_groups}) * experts per group "
                    f"({self.experts_per_group}) must be >= top_k ({self.top_k})"
                )
        # Settings the chosen router or the dropless layer would silently ignore.
        if not self.norm_topk_prob and self.router in ("topk_softmax", "expert_choice"):
            why = (
                "its softmax over the K chosen logits always sums to 1"
                if self.router == "topk_softmax"
                else "its weights are the router's probabilities, never renormalised"
            )
            raise ValueError(
                f"norm_topk_prob=False has no effect with router={self.router!r} ({why}); "
                "use router='softmax_topk' for unnormalised top-k weights"
            )
        if self.drop_policy != "probs" and (
            self.capacity_factor is None or self.router == "expert_choice"
        ):
            raise ValueError(
                f"drop_policy={self.drop_policy!r} needs a capacity_factor and a token-choice "
                f"router, got capacity_factor={self.capacity_factor!r}, router={self.router!r}"
            )
        if (self.router_jitter or self.router_noise) and self.router == "expert_choice":
            raise ValueError(
                f"router_jitter ({self.router_jitter!r}) and router_noise "
                f"({self.router_noise!r}) apply to token-choice routers only, "
                f"got router={self.router!r}"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def shared_width(self) -> int:
        """Total hidden width of the fused shared experts (0 when there are none)."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    @property
    def experts_per_token(self) -> float:
        """Routed experts a token runs through, on average: top_k; under expert choice,
        where each expert takes C = capacity_factor * T * K / E tokens, capacity_factor *
        top_k (at most every expert)."""
        if self.router != "expert_choice":
            return float(self.top_k)
        return min(float(self.num_experts), (self.capacity_factor or 1.0) * self.top_k)

    @property
    def active_ffn_width(self) -> int:
        """Hidden width a token sees: its routed experts' (experts_per_token, rounded to a
        whole width) plus the shared ones."""
        return round(self.experts_per_token * self.d_ff) + self.shared_width

    def replace(self, **changes: object) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s): {sorted(unknown)}")
        values.update(changes)
        return MoEConfig(**values)
