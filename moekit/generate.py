"""Autoregressive sampling with the KV cache: temperature, top-k, top-p (nucleus), seed.

Shapes: B batch, S prompt length, V vocab, N new tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.model.transformer import Transformer
from moekit.validate import check_padding_mask, check_seed


def filter_logits(
    logits_BV: Tensor, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Logits with the tokens outside the top-k and outside the top-p nucleus set to -inf.

    top_k keeps the k largest logits (ties with the k-th are kept too). top_p keeps the
    smallest set of most likely tokens whose probabilities sum to at least top_p
    (Holtzman et al. 2019); the most likely token is always kept.
    """
    if top_k is not None:
        k = min(top_k, logits_BV.shape[-1])
        kth_B1 = logits_BV.topk(k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Probability mass strictly before each token: a token is kept while that mass
        # has not yet reached top_p, so the first token always stays.
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        drop_sorted_BV = before_BV >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row, [B] long; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    # In float64, shifted so the largest is 0 before dividing: a tiny temperature then
    # sends the others to -inf (probability 0), where unshifted float32 logits overflow to
    # inf - inf = nan, and a temperature under 1e-45 is 0 in float32.
    logits_BV = logits_BV.double()
    logits_BV = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature
    logits_BV = filter_logits(logits_BV, top_k, top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


def _check_options(temperature: object, top_k: object, top_p: object, max_new: object) -> None:
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new!r}")
    # inf would flatten every logit to 0, and top-k / top-p then keep every tied token.
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _is_number(value: object) -> bool:
    # bool is an int to Python: temperature=True would sample at temperature 1.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _eos_ids(eos_id: object, device: torch.device) -> Tensor | None:
    """eos_id (None, an int or a sequence of ints) as a [n] long tensor; None for none."""
    if eos_id is None:
        return None
    ids = list(eos_id) if isinstance(eos_id, Sequence) else [eos_id]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_id must be None, an int >= 0 or a sequence of them, got {eos_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | Sequence[int] | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Continue each prompt row by up to max_new_tokens sampled tokens.

    Args:
        model: the language model; run in eval mode (its mode is restored afterwards).
        prompt_ids: [B, S] long token ids; rows may be left-padded where padding_mask
            says so.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: optional filters (see `filter_logits`).
        seed: a private generator seeded with it makes the output reproducible; None
            draws from torch's global generator.
        eos_id: an end-of-sequence id, or several (generation_config.json often lists
            two); a row that samples one keeps emitting it, and generation stops early
            once every row has.
        padding_mask: bool [B, S], True at padding, for prompts of different lengths
            padded on the left (each row's last prompt token must be real). RoPE scores
            depend on relative positions only, so a row continues as it would alone.

    MoE layers decode dropless, whatever their capacity_factor: with drops a token's
    experts would depend on the other rows and, in the prompt, on later tokens. Models
    with an expert_choice router are refused: each expert picks its tokens from the whole
    call, which no token-by-token decoding can reproduce.

    Returns:
        [B, S + N] ids, the prompt followed by N <= max_new_tokens new tokens.
    """
    _check_options(temperature, top_k, top_p, max_new_tokens)
    choosers = [i for i, m in enumerate(model.moe_layers()) if m.config.router == "expert_choice"]
    if choosers:
        raise ValueError(
            f"cannot decode with router='expert_choice' (MoE layers {choosers}): each expert "
            "picks its top tokens from the whole input, so a token's output depends on later "
            "tokens; sample from a model with a token-choice router"
        )
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be a [B, S] tensor, got {prompt_ids!r:.200}")
    B, S = prompt_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"prompt_ids must hold at least one token per row, got shape {(B, S)}")
    total = S + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt length {S} + max_new_tokens {max_new_tokens} must be <= max_seq_len "
            f"({model.config.max_seq_len}), got {total}"
        )
    if padding_mask is not None:
        # Checked here, not only by the model: the last column is read first.
        check_padding_mask(padding_mask, (B, S))
        if bool(padding_mask[:, -1].any()):
            raise ValueError("padding_mask: pad prompts on the left; the last column must be real")
    eos_ids = _eos_ids(eos_id, prompt_ids.device)
    generator = None
    if seed is not None:
        check_seed("seed", seed)
        generator = torch.Generator(device=prompt_ids.device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, total)

        def next_logits(ids_BS: Tensor, padding_mask: Tensor | None = None) -> Tensor:
            out = model(ids_BS, padding_mask=padding_mask, cache=cache, dropless=True)
            return out.logits[:, -1]

        logits_BV = next_logits(prompt_ids, padding_mask)
        done_B = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        new: list[Tensor] = []
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
            if eos_ids is not None:
                # A finished row repeats the id that ended it.
                if new:
                    next_B = torch.where(done_B, new[-1], next_B)
                done_B = done_B | torch.isin(next_B, eos_ids)
            new.append(next_B)
            if step == max_new_tokens - 1 or (eos_ids is not None and bool(done_B.all())):
                break
            logits_BV = next_logits(next_B[:, None])
    finally:
        model.train(was_training)
    return torch.cat([prompt_ids, torch.stack(new, dim=1).to(prompt_ids.dtype)], dim=1)
