"""Batched log-likelihoods (shared-prefix KV cache, length-sorted batches) and batched generation, checked against
references computed with a plain full-sequence forward and a hand-written greedy loop."""

from __future__ import annotations

import pytest
import torch

from llama2_hf.evaluation.engine import (
    TaskDecoding,
    encode_pair,
    generate_until,
    loglikelihoods,
    truncate_at_stop,
)


def reference_loglik(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Sum of log p of the last `n_cont` tokens of `ids` from one plain forward over the whole sequence."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)  # (T-1, V)
    rows = range(len(ids) - 1 - n_cont, len(ids) - 1)
    targets = ids[-n_cont:]
    ll = sum(logprobs[r, t].item() for r, t in zip(rows, targets))
    greedy = all(logprobs[r].argmax().item() == t for r, t in zip(rows, targets))
    return ll, greedy


REQUESTS = [
    ("what is the answer to the question about apples and the cat? please answer", " yes"),
    ("what is the answer to the question about apples and the cat? please answer", " no"),
    ("what is the answer to the question about apples and the cat? please answer", " the sun is a moon"),
    ("what is the answer to the question about apples and the dog? write", " no"),
    ("what is the answer to the question about apples and the dog? write", " a poem about the moon"),
    ("hello world", " thanks"),
]


@pytest.mark.parametrize("batch_size,share_prefix", [(1, False), (2, True), (4, True)])
def test_loglikelihoods_match_plain_forward(tiny_model_factory, tiny_tokenizer, batch_size, share_prefix):
    model = tiny_model_factory()
    groups = ["q", "q", "q", "q", "q", "other"]
    got = loglikelihoods(model, tiny_tokenizer, REQUESTS, batch_size=batch_size, prefix_groups=groups,
                         share_prefix=share_prefix, progress=False)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got):
        ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
        ref_ll, ref_greedy = reference_loglik(model, ctx + cont, len(cont))
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_shared_prefix_is_computed_once(tiny_model_factory, tiny_tokenizer):
    """With sharing, the embedding layer sees the common prefix once plus each request's own suffix."""
    model = tiny_model_factory()
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, inp, out: seen.append(inp[0].numel()))
    reqs = REQUESTS[:5]
    loglikelihoods(model, tiny_tokenizer, reqs, batch_size=1, progress=False)
    inputs = [tuple((c + k)[:-1]) for c, k in (encode_pair(tiny_tokenizer, *r) for r in reqs)]
    unique = list(dict.fromkeys(inputs))  # " yes" / " no" after the same context share one forward
    assert len(unique) == 4
    prefix = 0
    while all(len(u) > prefix and u[prefix] == unique[0][prefix] for u in unique):
        prefix += 1
    assert prefix >= 8
    assert sum(seen) == prefix + sum(len(u) - prefix for u in unique)
    seen.clear()
    loglikelihoods(model, tiny_tokenizer, reqs, batch_size=1, share_prefix=False, progress=False)
    assert sum(seen) == sum(len(u) for u in unique)


def test_left_truncation_as_lm_eval(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    context, continuation = REQUESTS[2]
    ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
    max_length = len(ctx + cont) - 6
    (ll, _), = loglikelihoods(model, tiny_tokenizer, [(context, continuation)], max_length=max_length,
                              progress=False)
    kept = (ctx + cont)[-(max_length + 1):]  # lm-eval keeps the last max_length + 1 tokens
    assert ll == pytest.approx(reference_loglik(model, kept, len(cont))[0], abs=1e-4)


def test_loglikelihood_errors(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(model, tiny_tokenizer, REQUESTS, batch_size=0)
    with pytest.raises(ValueError, match="prefix_groups"):
        loglikelihoods(model, tiny_tokenizer, REQUESTS, prefix_groups=["a"])


def greedy_reference(model, tokenizer, context: str, max_new_tokens: int) -> str:
    """Token-by-token argmax over full re-forwards (no cache, no padding), stopping at EOS."""
    ids = tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


CONTEXTS = ["what is 12 plus 30? [/INST]", "hello", "give me a poem about the sun and the moon, please"]


def test_generate_until_greedy_matches_reference(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token
    refs = [greedy_reference(model, tiny_tokenizer, c, 10) for c in CONTEXTS]
    got = generate_until(model, tiny_tokenizer, CONTEXTS, stop=[], sampling=TaskDecoding(max_new_tokens=10),
                         batch_size=2, progress=False)
    assert got == refs
    # A stop string taken from inside a generation cuts it at its first occurrence.
    text = next(r for r in refs if len(r.strip()) > 6)
    stop = text.strip()[3:6]
    got = generate_until(model, tiny_tokenizer, CONTEXTS, stop=[stop], sampling=TaskDecoding(max_new_tokens=10),
                         batch_size=3, progress=False)
    assert got == [r.split(stop)[0] for r in refs]


def test_generate_until_stops_at_the_model_s_own_end_of_turn(tiny_model_factory, tiny_tokenizer):
    """A model whose generation config names another end-of-turn id than the tokenizer's EOS stops there too."""
    model = tiny_model_factory()
    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token
    context = CONTEXTS[2]
    ids = tiny_tokenizer.encode(context)
    with torch.no_grad():  # the greedy first and second tokens of the context
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        second = int(model(input_ids=torch.tensor([ids + [first]])).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, second]
    got = generate_until(model, tiny_tokenizer, [context], stop=[], sampling=TaskDecoding(max_new_tokens=10),
                         progress=False)
    assert got == [tiny_tokenizer.decode([first, second], skip_special_tokens=True)]


def test_generate_until_sampling_is_seeded(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token
    cfg = TaskDecoding(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generate_until(model, tiny_tokenizer, CONTEXTS, stop=[], sampling=cfg, seed=3, progress=False)
    b = generate_until(model, tiny_tokenizer, CONTEXTS, stop=[], sampling=cfg, seed=3, progress=False)
    assert a == b
    gen = cfg.generation_config(tiny_tokenizer)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 1.0, 0.9, 0)  # no hidden top-k 50
    assert TaskDecoding().generation_config(tiny_tokenizer).do_sample is False


def test_truncate_at_stop_and_errors(tiny_model_factory, tiny_tokenizer):
    assert truncate_at_stop("a Q: b\n\nc", ["\n\n", "Q:"]) == "a "
    assert truncate_at_stop("abc", ["", "x"]) == "abc"
    with pytest.raises(ValueError, match="temperature"):
        TaskDecoding(temperature=-1)
    tiny_tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate_until(tiny_model_factory(), tiny_tokenizer, ["x"], stop=[])
    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token


def test_transformers_llama_is_supported(tiny_tokenizer):
    """The shared-prefix cache also works with transformers' own Llama (e.g. meta-llama/Llama-2-7b-hf)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    got = loglikelihoods(model, tiny_tokenizer, REQUESTS[:5], batch_size=2, progress=False)
    for (context, continuation), (ll, _) in zip(REQUESTS, got):
        ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
        assert ll == pytest.approx(reference_loglik(model, ctx + cont, len(cont))[0], abs=1e-4)
