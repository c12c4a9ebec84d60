"""ModelConfig: every setting of the decoder-only MoE transformer, validated when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from moekit.config import ACTIVATIONS, MoEConfig
from moekit.model.rope import ROPE_TYPES, Yarn
from moekit.validate import check_bool, check_int, check_non_negative, check_positive

ATTENTION_NAMES = ("gqa", "mla")
QK_NORMS = (None, "head", "full")
_MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_YARN_DEFAULTS = {
    "rope_factor": 1.0,
    "rope_original_max_seq_len": None,
    "rope_beta_fast": 32.0,
    "rope_beta_slow": 1.0,
    "rope_mscale": None,
    "rope_mscale_all_dim": None,
    "rope_attention_factor": None,
    "rope_truncate": True,
}
"""The YaRN fields at their defaults: what a config without rope_type='yarn' must hold."""


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose feed-forward layers are MoE layers (or dense)."""

    vocab_size: int = 256
    """Vocabulary size V (256 for byte-level text)."""
    d_model: int = 128
    """Model width D."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads H."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = num_heads (multi-head attention)."""
    head_dim: int | None = None
    """Width of one attention head; None = d_model // num_heads."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (prompt plus generated tokens)."""
    moe: MoEConfig | None = None
    """The MoE feed-forward layer; None = a dense model."""
    moe_as_dense: bool = False
    """Dense twin: each MoE layer's place holds a dense FFN of the MoE's active width."""
    dense_d_ff: int | None = None
    """Hidden width of dense FFN layers; None = the MoE's active width (required if moe is None)."""
    activation: str = "swiglu"
    """Activation of dense FFN layers: swiglu or gelu."""
    first_k_dense: int = 0
    """The first k layers are dense (DeepSeek-V3 first_k_dense_replace)."""
    moe_every: int = 1
    """Layer i is MoE when (i + 1) % moe_every == 0 (Qwen decoder_sparse_step)."""
    dense_layers: tuple[int, ...] = ()
    """Layer indices that are dense whatever the other rules say (Qwen mlp_only_layers)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_type: str = "default"
    """Rotary variant: default (plain RoPE) or yarn (YaRN context extension, Peng et al. 2023)."""
    rope_factor: float = 1.0
    """yarn: context stretch, max_seq_len over the pretraining length (DeepSeek-V3: 40)."""
    rope_original_max_seq_len: int | None = None
    """yarn: the pretraining context length (required with yarn)."""
    rope_beta_fast: float = 32.0
    """yarn: frequency pairs turning more often than this over the original context are kept."""
    rope_beta_slow: float = 1.0
    """yarn: frequency pairs turning less often than this are divided by rope_factor."""
    rope_mscale: float | None = None
    """yarn: DeepSeek's mscale, numerator of the cos/sin factor; None = plain YaRN."""
    rope_mscale_all_dim: float | None = None
    """yarn: DeepSeek's mscale_all_dim, denominator of that factor and MLA softmax-scale term."""
    rope_attention_factor: float | None = None
    """yarn: explicit cos/sin multiplier; None = derived from rope_factor and the mscales."""
    rope_truncate: bool = True
    """yarn: round the frequency ramp's ends to whole dimensions (the reference default)."""
    attention: str = "gqa"
    """Attention class from the registry: gqa (grouped-query) or mla (multi-head latent)."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2-MoE)."""
    o_bias: bool = False
    """Bias on the output projection of attention."""
    qk_norm: str | None = None
    """RMSNorm on q and k before RoPE: None, head (per head, Qwen3-MoE) or full (OLMoE)."""
    clip_qkv: float | None = None
    """Clamp q, k and v to [-clip_qkv, clip_qkv] after projection (OLMoE); None = off."""
    q_lora_rank: int | None = None
    """MLA: rank of the query compression; None = a full-rank query projection."""
    kv_lora_rank: int | None = None
    """MLA: rank of the joint key/value compression."""
    qk_nope_head_dim: int | None = None
    """MLA: per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int | None = None
    """MLA: per-head query/key width that carries the rotary embedding."""
    v_head_dim: int | None = None
    """MLA: per-head value width."""
    rope_interleave: bool = False
    """MLA: the rotary dimensions are stored interleaved (DeepSeek-V3 checkpoints)."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            check_int(name, getattr(self, name))
        for name in (
            "moe_as_dense",
            "qkv_bias",
            "o_bias",
            "rope_interleave",
            "tie_embeddings",
            "rope_truncate",
        ):
            check_bool(name, getattr(self, name))
        check_positive("norm_eps", self.norm_eps)
        check_positive("rope_theta", self.rope_theta)
        if self.rope_theta <= 1:
            # theta^(-2i/d) would grow with the dimension (and YaRN divides by log theta).
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta!r}")
        check_positive("init_std", self.init_std)
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(
                    f"moe.d_model must equal d_model ({self.d_model}), got {self.moe.d_model!r}"
                )
        elif self.moe_as_dense:
            raise ValueError("moe_as_dense=True needs a moe config to take the width from")
        if self.dense_d_ff is not None:
            check_int("dense_d_ff", self.dense_d_ff)
        elif self.moe is None:
            raise ValueError("dense_d_ff must be set when moe is None, got None")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        check_int("first_k_dense", self.first_k_dense, minimum=0)
        if self.first_k_dense > self.num_layers:
            raise ValueError(
                f"first_k_dense must be <= num_layers ({self.num_layers}), "
                f"got {self.first_k_dense!r}"
            )
        check_int("moe_every", self.moe_every)
        if not isinstance(self.dense_layers, tuple):
            raise TypeError(f"dense_layers must be a tuple of ints, got {self.dense_layers!r}")
        for i in self.dense_layers:
            check_int("dense_layers entry", i, minimum=0)
            if i >= self.num_layers:
                raise ValueError(
                    f"dense_layers entries must be < num_layers ({self.num_layers}), got {i!r}"
                )
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {ATTENTION_NAMES}, got {self.attention!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.clip_qkv is not None:
            check_positive("clip_qkv", self.clip_qkv)
        self._check_rope()
        self._check_heads()
        if self.attention == "mla":
            self._check_mla()

    def _check_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        check_positive("rope_factor", self.rope_factor)
        if self.rope_original_max_seq_len is not None:
            check_int("rope_original_max_seq_len", self.rope_original_max_seq_len)
        check_positive("rope_beta_fast", self.rope_beta_fast)
        check_positive("rope_beta_slow", self.rope_beta_slow)
        for name in ("rope_mscale", "rope_mscale_all_dim"):
            if getattr(self, name) is not None:
                check_non_negative(name, getattr(self, name))
        if self.rope_attention_factor is not None:
            check_positive("rope_attention_factor", self.rope_attention_factor)
        if self.rope_type != "yarn":
            # Else a YaRN setting given without rope_type='yarn' would be ignored, silently.
            unused = [n for n, v in _YARN_DEFAULTS.items() if getattr(self, n) != v]
            self._refuse_unused(unused, "rope_type='yarn'", f"rope_type={self.rope_type!r}")
            return
        if self.rope_factor < 1:
            raise ValueError(
                f"rope_factor must be >= 1 with rope_type='yarn', got {self.rope_factor!r}"
            )
        if self.rope_original_max_seq_len is None:
            raise ValueError(
                "rope_original_max_seq_len must be set when rope_type='yarn', got None"
            )
        # Equal betas (Kimi-K2's 1.0 and 1.0) make a one-point ramp, which rope.py widens
        # as transformers does.
        if self.rope_beta_fast < self.rope_beta_slow:
            raise ValueError(
                f"rope_beta_fast must be >= rope_beta_slow ({self.rope_beta_slow}), "
                f"got {self.rope_beta_fast!r}"
            )

    def _check_heads(self) -> None:
        if self.num_kv_heads is not None:
            check_int("num_kv_heads", self.num_kv_heads)
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim)
        if self.attention != "gqa":
            # MLA's heads are its own fields; these would be ignored, silently.
            for name in ("num_kv_heads", "head_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to attention='gqa' only (MLA sizes its heads with "
                        f"qk_nope_head_dim, qk_rope_head_dim and v_head_dim), got "
                        f"{getattr(self, name)!r}"
                    )
            return
        unused = [n for n in ("q_lora_rank", *_MLA_FIELDS) if getattr(self, n) is not None]
        if self.rope_interleave:
            unused.append("rope_interleave")
        self._refuse_unused(unused, "attention='mla'", "attention='gqa'")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads must divide d_model ({self.d_model}) when head_dim is None, "
                f"got {self.num_heads!r}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads ({self.num_heads}), got {self.num_kv_heads!r}"
            )
        if self.head_size % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {self.head_size!r}")

    def _refuse_unused(self, names: list[str], used_by: str, chosen: str) -> None:
        """ValueError naming the fields `names` (and their values) when there are any:
        settings only `used_by` reads, given where `chosen` ignores them."""
        if names:
            raise ValueError(
                f"{', '.join(names)} apply to {used_by} only, got "
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
                + f" with {chosen}"
            )

    def _check_mla(self) -> None:
        if self.q_lora_rank is not None:
            check_int("q_lora_rank", self.q_lora_rank)
        for name in _MLA_FIELDS:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"{name} must be set when attention='mla', got None")
            check_int(name, value)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim!r}")
        if self.qk_norm is not None or self.clip_qkv is not None:
            raise ValueError(
                f"qk_norm/clip_qkv apply to attention='gqa' only, got qk_norm={self.qk_norm!r}, "
                f"clip_qkv={self.clip_qkv!r}"
            )

    @property
    def yarn(self) -> Yarn | None:
        """The YaRN settings when rope_type is yarn, else None (plain RoPE)."""
        if self.rope_type != "yarn":
            return None
        return Yarn(
            factor=self.rope_factor,
            original_max_seq_len=self.rope_original_max_seq_len,
            beta_fast=self.rope_beta_fast,
            beta_slow=self.rope_beta_slow,
            mscale=self.rope_mscale,
            mscale_all_dim=self.rope_mscale_all_dim,
            attention_factor=self.rope_attention_factor,
            truncate=self.rope_truncate,
        )

    @property
    def kv_heads(self) -> int:
        """Key/value heads, resolved (num_kv_heads or num_heads)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head, resolved (head_dim or d_model // num_heads)."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Width rotated by RoPE in each head: head_size for gqa, qk_rope_head_dim for mla."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_size

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (the attention score dot product)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_size

    @property
    def value_head_dim(self) -> int:
        """Per-head width of values."""
        return self.v_head_dim if self.attention == "mla" else self.head_size

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense FFN layers, resolved."""
        return self.moe.active_ffn_width if self.dense_d_ff is None else self.dense_d_ff

    def is_sparse_place(self, i: int) -> bool:
        """Whether layer i is an MoE layer by the placement rules (also in a dense twin)."""
        if self.moe is None:
            return False
        if i < self.first_k_dense or i in self.dense_layers:
            return False
        return (i + 1) % self.moe_every == 0

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i holds an MoE layer (False everywhere for dense models and twins)."""
        return not self.moe_as_dense and self.is_sparse_place(i)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Indices of the layers that hold an MoE layer."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        values.update(changes)
        return ModelConfig(**values)

    def to_dict(self) -> dict:
        """Plain JSON-ready values; the nested MoEConfig becomes a dict, tuples become lists."""
        out = asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The inverse of to_dict; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise TypeError(f"ModelConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        values = dict(data)
        moe = values.get("moe")
        if isinstance(moe, dict):
            moe_known = {f.name for f in fields(MoEConfig)}
            bad = set(moe) - moe_known
            if bad:
                raise ValueError(f"unknown MoEConfig field(s): {sorted(bad)}")
            values["moe"] = MoEConfig(**moe)
        if "dense_layers" in values and isinstance(values["dense_layers"], list):
            values["dense_layers"] = tuple(values["dense_layers"])
        return cls(**values)


def dense_twin(config: ModelConfig) -> ModelConfig:
    """The same model with a dense FFN of the MoE's active width in each MoE layer's place.

    Width experts_per_token * d_ff (top_k * d_ff; capacity_factor * top_k * d_ff under
    expert choice) + shared width with the MoE's activation, so the FFN FLOPs per token
    are equal (the router's are not counted); attention, embeddings and the layers that
    were already dense are unchanged. A dense config is returned as it is.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.moe is None or config.moe_as_dense:
        return config
    return config.replace(moe_as_dense=True)
