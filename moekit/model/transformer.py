"""The decoder-only MoE transformer language model.

Shapes: B batch, S sequence (new positions), D model dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.experts import ExpertBank
from moekit.layer import MoE, MoEOutput
from moekit.lazy import computed_once
from moekit.model.block import Block
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.norm import RMSNorm
from moekit.model.rope import RotaryEmbedding
from moekit.router import Router
from moekit.validate import check_padding_mask

# Weights that write into the residual stream: scaled down by sqrt(2 * num_layers) at
# init, so the residual's variance does not grow with depth (GPT-2, Radford et al. 2019).
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


@dataclass
class ModelOutput:
    """What one forward pass returns."""

    logits: Tensor
    """[B, S, V] float32 next-token logits."""
    moe: list[MoEOutput]
    """One MoEOutput per MoE layer, in layer order."""

    @computed_once
    def aux_loss(self) -> Tensor:
        """Scalar: sum over MoE layers of MoEOutput.loss (already weighted); 0 for dense models.

        Computed by the forward when grad is enabled; after a no-grad forward (decoding,
        evaluation) only if read, like the layers' statistics (moekit.routing_stats).
        """
        return sum((o.loss for o in self.moe), self.logits.new_zeros(()))


class Transformer(nn.Module):
    """Token embedding -> blocks (attention + MoE or dense FFN) -> RMSNorm -> lm_head.

    Parameters: embed.weight, layers.{i}.attn_norm.weight, layers.{i}.attn.*,
    layers.{i}.ffn_norm.weight, layers.{i}.ffn.*, norm.weight, lm_head.weight (the same
    tensor as embed.weight when tie_embeddings). Built on the `meta` device it holds
    shapes only (see moekit.model.counting).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(
            config.rope_dim, config.rope_theta, config.max_seq_len, yarn=config.yarn
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight (GPT-2/OLMo style); also recomputes the RoPE tables.

        Normal(0, init_std) for embeddings, projections, expert banks and routers;
        normal(0, init_std / sqrt(2 * num_layers)) for the output projections of attention,
        dense FFNs, shared and routed experts; norms 1; biases and the sigmoid router's
        selection bias 0. Call after `to_empty` when a model was built on `meta`.
        """
        if self.config.tie_embeddings:
            # to_empty gives each parameter storage of its own: tie the head again.
            self.lm_head.weight = self.embed.weight
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue
                nn.init.normal_(module.weight, std=out_std if leaf in _OUTPUT_PROJECTIONS else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, ExpertBank):
                for w in (module.w_gate_EFD, module.w_up_EFD):
                    if w is not None:
                        nn.init.normal_(w, std=std)
                nn.init.normal_(module.w_down_EDF, std=out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                bias = getattr(module, "expert_bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()

    def forward(
        self,
        ids_BS: Tensor,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        dropless: bool = False,
    ) -> ModelOutput:
        """Next-token logits for ids_BS [B, S] (long).

        padding_mask: bool [B, S], True at padding; padded positions are seen by no other
        position and are not routed. cache: a `new_cache(...)` to decode incrementally;
        the S tokens then take positions cache.pos .. cache.pos + S - 1 and are appended.
        dropless: MoE layers with a capacity_factor route every assignment (`generate`
        does: capacity drops would make a token's output depend on the other tokens of
        the call, later ones and other rows included).
        """
        B, S = self._check_ids(ids_BS)
        start_pos = 0 if cache is None else cache.pos
        if start_pos + S > self.config.max_seq_len:
            raise ValueError(
                f"sequence length must be <= max_seq_len ({self.config.max_seq_len}), "
                f"got {start_pos + S}"
            )
        if padding_mask is not None:
            check_padding_mask(padding_mask, (B, S))
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch size {cache.batch_size}, ids have {B}")
            if start_pos + S > cache.max_seq_len:
                raise ValueError(
                    f"cache holds {cache.max_seq_len} positions; {start_pos} cached + {S} new "
                    "do not fit"
                )
            key_padding = cache.key_padding(padding_mask, S)
        else:
            key_padding = padding_mask
        x_BSD = self.embed(ids_BS)
        outs: list[MoEOutput] = []
        for i, layer in enumerate(self.layers):
            cache_layer = None if cache is None else cache.layers[i]
            x_BSD, out = layer(x_BSD, self.rope, key_padding, cache_layer, start_pos, dropless)
            if out is not None:
                outs.append(out)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.norm(x_BSD)).float()
        out = ModelOutput(logits=logits, moe=outs)
        if torch.is_grad_enabled():
            out.aux_loss  # noqa: B018 - summed in the forward's grad mode
        return out

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in layer order."""
        return [layer.ffn for layer in self.layers if layer.is_moe]

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_per_layer: list[Tensor]) -> None:
        """Auxiliary-loss-free balancing step for every MoE layer (sigmoid_bias routers;
        a no-op for others): one [E] load tensor per MoE layer, in layer order, the load
        routed before capacity drops (each layer's `MoEOutput.routed_tokens_per_expert`)."""
        moes = self.moe_layers()
        if len(tokens_per_expert_per_layer) != len(moes):
            raise ValueError(
                f"tokens_per_expert_per_layer must have one entry per MoE layer ({len(moes)}), "
                f"got {len(tokens_per_expert_per_layer)}"
            )
        for moe, load in zip(moes, tokens_per_expert_per_layer, strict=True):
            moe.update_bias(load)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache for batch_size sequences of up to max_seq_len positions."""
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"max_seq_len must be <= config.max_seq_len ({self.config.max_seq_len}), "
                f"got {max_seq_len}"
            )
        return KVCache(self.config.num_layers, batch_size, max_seq_len)

    def _check_ids(self, ids_BS: Tensor) -> tuple[int, int]:
        if not isinstance(ids_BS, Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids_BS).__name__}")
        if ids_BS.dtype not in (torch.long, torch.int32):  # what nn.Embedding takes
            raise TypeError(f"ids must be an int64 or int32 tensor, got dtype {ids_BS.dtype}")
        if ids_BS.dim() != 2 or ids_BS.shape[1] == 0:
            raise ValueError(f"ids must have shape [B, S] with S >= 1, got {tuple(ids_BS.shape)}")
        V = self.config.vocab_size
        # One read-back for both bounds (on CUDA each is a synchronization). Out-of-range
        # ids must be caught here: on CUDA the embedding would fail with a device-side
        # assert that poisons the whole CUDA context.
        if ids_BS.numel() == 0:  # a batch of no rows: nothing to check, empty logits
            return ids_BS.shape[0], ids_BS.shape[1]
        lo, hi = torch.stack([ids_BS.min(), ids_BS.max()]).tolist()
        if lo < 0 or hi >= V:
            raise ValueError(f"ids must lie in [0, vocab_size={V}), got values in [{lo}, {hi}]")
        return ids_BS.shape[0], ids_BS.shape[1]
