"""Sampling: filters on hand-built distributions, seeds, greedy against the full forward, EOS."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from moekit import MoEConfig
from moekit.generate import filter_logits, generate, sample_next
from moekit.model import ModelConfig, Transformer

V = 37


def _config(init_std: float = 0.3, **moe_changes) -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        d_model=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=24,
        tie_embeddings=True,
        moe=MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2, **moe_changes),
        init_std=init_std,
    )


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1)
    return Transformer(_config()).double()


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_top_k_keeps_the_k_largest() -> None:
    out = filter_logits(_logits([0.1, 0.4, 0.05, 0.3, 0.15]), top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert_close(out[0, [1, 3]], _logits([0.4, 0.3])[0])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.3, [1]),  # 0.4 alone already reaches 0.3
        (0.5, [1, 3]),  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
        (0.71, [1, 3, 4]),
        (0.84, [1, 3, 4]),
        (0.9, [0, 1, 3, 4]),  # 0.85 < 0.9 needs the fourth (0.1)
        (1.0, [0, 1, 2, 3, 4]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, kept) -> None:
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    # Shuffle a second row to check the scatter back to vocabulary order.
    perm = [3, 0, 4, 1, 2]
    logits = torch.cat([_logits(probs), _logits([probs[i] for i in perm])])
    finite = torch.isfinite(filter_logits(logits, top_p=top_p))
    assert finite[0].nonzero().squeeze(1).tolist() == kept
    assert sorted(perm[i] for i in finite[1].nonzero().squeeze(1).tolist()) == kept


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
def test_a_tiny_temperature_samples_the_argmax(temperature) -> None:
    # Dividing unshifted logits by it overflows to inf, and softmax of inf - inf is nan.
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0], [-2.0, -3.0, -1.5]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        got = sample_next(logits, temperature=temperature, generator=gen)
        assert got.tolist() == [1, 0, 2]


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = _logits([0.1, 0.4, 0.05, 0.3, 0.15]).expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, top_k=3, generator=gen)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert_close(
        freq, torch.tensor([0, 0.4, 0, 0.3, 0.15], dtype=torch.float64) / 0.85, atol=0.015, rtol=0
    )
    t = sample_next(_logits([0.1, 0.4, 0.05, 0.3, 0.15]), temperature=0)
    assert t.tolist() == [1]


def test_seed_makes_generation_reproducible(model) -> None:
    prompt = torch.randint(0, V, (3, 4))
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.95, seed=7)
    b = generate(model, prompt, 10, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, prompt, 10, temperature=1.0, top_p=0.95, seed=8)
    assert a.shape == (3, 14) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("options", [{"temperature": 0}, {"top_k": 1}])
def test_greedy_equals_argmax_of_the_full_forward(model, options) -> None:
    prompt = torch.randint(0, V, (2, 3))
    out = generate(model, prompt, 8, seed=0, **options)
    ids = prompt
    for _ in range(8):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)
    assert model.training  # generation restores the caller's mode


def test_eos_stops_rows_and_generation(model) -> None:
    prompt = torch.randint(0, V, (2, 3))
    greedy = generate(model, prompt, 6, temperature=0)
    eos = int(greedy[0, 4])  # row 0's second new token
    out = generate(model, prompt, 6, temperature=0, eos_id=eos)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    assert torch.equal(out[:, : 3 + first + 1][1], greedy[1, : 3 + first + 1])
    finished = generate(model, prompt[:1], 6, temperature=0, eos_id=int(greedy[0, 3]))
    assert finished.shape == (1, 4)


def test_any_of_several_eos_ids_ends_a_row(model) -> None:
    prompt = torch.randint(0, V, (2, 3))
    greedy = generate(model, prompt, 6, temperature=0)
    # Row 0's first new token and row 1's third end generation: each row stops at the
    # first of them it samples and repeats that one.
    eos = [int(greedy[1, 5]), int(greedy[0, 3])]
    out = generate(model, prompt, 6, temperature=0, eos_id=eos)
    for row in range(2):
        at = next(i for i, t in enumerate(greedy[row, 3:].tolist()) if t in eos)
        assert torch.equal(out[row, : 3 + at + 1], greedy[row, : 3 + at + 1])
        assert (out[row, 3 + at :] == greedy[row, 3 + at]).all()
    assert torch.equal(generate(model, prompt, 6, temperature=0, eos_id=[]), greedy)
    with pytest.raises(ValueError, match=r"eos_id must be .* got \[1, -2\]"):
        generate(model, prompt, 2, eos_id=[1, -2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens.*0"),
        ({"max_new_tokens": 30}, "max_seq_len.*24.*34"),
        ({"temperature": -1.0}, "temperature.*-1.0"),
        # inf flattened every logit to 0, and top-k then kept every tied token.
        ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"top_k": 0}, "top_k.*0"),
        ({"top_p": 1.5}, "top_p.*1.5"),
        ({"top_p": math.nan}, "top_p.*nan"),
        ({"temperature": True}, "temperature.*True"),  # a bool is no number of its own
        ({"top_p": True}, "top_p.*True"),
    ],
)
def test_bad_options(model, kwargs, match) -> None:
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 4, dtype=torch.long), **args)


def test_left_padded_prompts_continue_as_alone(model) -> None:
    short, long = torch.randint(0, V, (1, 3)), torch.randint(0, V, (1, 6))
    prompts = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, :3] = True
    out = generate(model, prompts, 5, temperature=0, padding_mask=pad)
    assert torch.equal(out[0, 3:], generate(model, short, 5, temperature=0)[0])
    assert torch.equal(out[1], generate(model, long, 5, temperature=0)[0])
    with pytest.raises(ValueError, match="left"):
        generate(model, prompts, 5, padding_mask=pad.flip(1))
    # A mask of another shape or kind is named before any of it is read.
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(2, 6\), got \(6,\)"):
        generate(model, prompts, 5, padding_mask=pad[0])
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor .* got <class 'list'>"):
        generate(model, prompts, 5, padding_mask=pad.tolist())
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor .* got torch.int64"):
        generate(model, prompts, 5, padding_mask=pad.long())


@pytest.mark.gpu
def test_cuda_matches_cpu_and_seeds_reproduce(model) -> None:
    prompt = torch.randint(0, V, (2, 5))
    cpu = copy.deepcopy(model).float()
    gpu = Transformer(cpu.config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    assert_close(gpu(prompt.cuda()).logits.cpu(), cpu(prompt).logits, atol=1e-4, rtol=1e-4)
    a = generate(gpu, prompt.cuda(), 6, seed=3)
    assert torch.equal(a, generate(gpu, prompt.cuda(), 6, seed=3))


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p() -> None:
    # Two equal logits: probabilities exactly 0.5, so the boundary is exact.
    finite = torch.isfinite(filter_logits(torch.zeros(1, 2), top_p=0.5))
    assert finite.tolist() == [[True, False]]
    assert torch.isfinite(filter_logits(torch.zeros(1, 2), top_p=1.0)).all()


def test_generate_accepts_top_p_one_and_restores_the_mode(model) -> None:
    prompt = torch.randint(0, V, (1, 3))
    for training in (True, False):
        model.train(training)
        generate(model, prompt, 2, top_p=1.0, seed=0)
        assert model.training is training
    model.eval()


def test_a_cache_refuses_another_batch_size(model) -> None:
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="batch size 2"), torch.no_grad():
        model(torch.randint(0, V, (1, 3)), cache=cache)


def _metaspace_tokenizer(words: list[str], tmp_path):
    """A word-level tokenizer.json with SentencePiece's Metaspace pre-tokenizer and decoder."""
    tokenizers = pytest.importorskip("tokenizers")
    from moekit.data.tokenizer import load_tokenizer

    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_continuations_keep_the_space_a_metaspace_decoder_puts_before_a_word(tmp_path) -> None:
    from moekit.commands.sample import continuation
    from moekit.data.tokenizer import ByteTokenizer

    words = ["<unk>", "▁the", "▁quick", "▁brown", "▁fox", "▁jumps"]
    words += [f"▁w{i}" for i in range(V - len(words))]
    meta = _metaspace_tokenizer(words, tmp_path)
    prompt = meta.encode("the quick")
    assert prompt == [1, 2] and meta.decode([3, 4]) == "brown fox"  # alone: no space
    assert continuation(meta, prompt, [3, 4]) == " brown fox"
    # Byte tokens decode the same with the prompt or without it.
    byte = ByteTokenizer()
    assert continuation(byte, byte.encode("caf"), list("é!".encode())) == "é!"


def test_sampled_text_is_the_continuation_of_the_prompt(model, tmp_path) -> None:
    from moekit.commands.sample import sample_text

    words = ["<unk>", *(f"▁w{i}" for i in range(V - 1))]
    meta = _metaspace_tokenizer(words, tmp_path)
    (text,) = sample_text(model, meta, "w1 w2", 5, temperature=0.0, seed=0)
    # Every generated word is one "▁w.." piece, so the continuation is five " w.." words.
    assert text.startswith(" w") and len(text.split()) == 5
    assert meta.decode(meta.encode("w1 w2" + text)) == "w1 w2" + text


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_torch_cannot_take_is_a_clear_error(model, seed) -> None:
    with pytest.raises(ValueError, match=f"seed must be .*, got {seed}"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, seed=seed)


def _capacity_model() -> Transformer:
    # Large weights make the router confident, so capacity 1.0 drops assignments.
    torch.manual_seed(7)  # a seed whose prompts below decode differently with drops
    return Transformer(_config(init_std=2.0, capacity_factor=1.0)).double()


def test_a_capacity_model_decodes_dropless_and_each_row_as_alone() -> None:
    model = _capacity_model()
    prompts = torch.randint(0, V, (3, 8))
    with torch.no_grad():
        dropped = model(prompts).moe[0].dropped_fraction
        assert dropped > 0  # the case this test is about: the full forward drops
        full = model(prompts, dropless=True)
        assert all(float(o.dropped_fraction) == 0 for o in full.moe)
    out = generate(model, prompts, 6, temperature=0)
    for row in range(3):
        assert torch.equal(out[row], generate(model, prompts[row : row + 1], 6, temperature=0)[0])
    # Greedy decoding is the argmax of the dropless full forward, position by position.
    ids = prompts
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids, dropless=True).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_an_expert_choice_model_is_refused() -> None:
    cfg = _config(router="expert_choice")
    with pytest.raises(ValueError, match=r"router='expert_choice' \(MoE layers \[0, 1\]\)"):
        generate(Transformer(cfg), torch.zeros(1, 3, dtype=torch.long), 2)


def test_a_sample_ends_at_its_first_eos_whatever_the_others_do(monkeypatch) -> None:
    # generate() repeats a finished row's EOS while other rows go on; decoded, an EOS
    # that is no special token had shown as a run of it, longer with more samples.
    import moekit.generate
    from moekit.commands.sample import sample_text
    from moekit.data import ByteTokenizer

    prompt = list(b"ab")
    rows = [prompt + list(b"xs") + list(b"sss"), prompt + list(b"xyzws")]
    monkeypatch.setattr(moekit.generate, "generate", lambda *a: torch.tensor(rows))
    texts = sample_text(torch.nn.Linear(1, 1), ByteTokenizer(), "ab", 5, 2, eos_ids=[ord("s")])
    assert texts == ["xs", "xyzws"]
