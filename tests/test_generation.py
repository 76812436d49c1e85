"""The shared sampling helper: parity with transformers' generate, shared prefill, nucleus semantics, EOS, FSDP2."""

import os
import socket

import pytest
import torch

from llama2_hf.generation import (
    SamplingConfig,
    as_messages,
    full_weights_for_generation,
    generate,
    generate_text,
    sample_categorical,
    sample_top_p,
)
from llama2_hf.tokenization_llama2 import encode_dialog

PROMPTS = ["What is 3 plus 4?", "Write a poem about the sun and the moon please", "hello"]


def prompt_ids(tokenizer):
    return [encode_dialog(tokenizer, as_messages(p)) for p in PROMPTS]


def test_greedy_matches_transformers_generate_per_prompt(tiny_tokenizer, tiny_model_factory):
    """Left padding, the K-fold cache copy and batching change nothing: every greedy sample equals an unbatched,
    unpadded `model.generate` of its prompt."""
    model = tiny_model_factory()
    ids = prompt_ids(tiny_tokenizer)
    out = generate(model, ids, SamplingConfig(max_new_tokens=12, temperature=0, num_samples=3, prompt_batch_size=2),
                   eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0)
    assert len(out.response_ids) == 3 and all(len(r) == 3 for r in out.response_ids)
    for p, samples, finished in zip(ids, out.response_ids, out.finished):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0)[0, len(p):].tolist()
        for sample, done in zip(samples, finished):
            assert sample == ref
            assert done == (tiny_tokenizer.eos_token_id in ref)


def test_prefill_runs_once_per_prompt_then_expands(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory()
    batch_sizes = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    ids = prompt_ids(tiny_tokenizer)
    generate(model, ids, SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=1.0, num_samples=8,
                                        prompt_batch_size=3), eos_token_id=-1)  # no EOS: always 4 steps
    handle.remove()
    longest = max(len(p) for p in ids)
    assert batch_sizes[0] == (3, longest)  # one prefill row per prompt, not per sample
    assert batch_sizes[1:] == [(24, 1)] * 3  # then 3 prompts x 8 samples decode one token at a time


def test_sampling_is_reproducible_and_diverse(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory()
    ids = prompt_ids(tiny_tokenizer)[:1]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0, num_samples=6)
    a = generate(model, ids, cfg, generator=torch.Generator().manual_seed(3)).response_ids
    b = generate(model, ids, cfg, generator=torch.Generator().manual_seed(3)).response_ids
    assert a == b
    assert len({tuple(s) for s in a[0]}) > 1  # the K samples are not copies of one another


def test_eos_stops_a_sample_and_max_new_tokens_truncates(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory()
    ids = prompt_ids(tiny_tokenizer)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, num_samples=2)
    full = generate(model, ids, greedy, eos_token_id=-1)
    assert all(len(s) == 10 and not f for ss, ff in zip(full.response_ids, full.finished) for s, f in zip(ss, ff))
    stop = full.response_ids[0][0][3]  # make the 4th greedy token of prompt 0 the EOS
    out = generate(model, ids, greedy, eos_token_id=stop)
    for (ref, _), samples, finished in zip(full.response_ids, out.response_ids, out.finished):
        end = ref.index(stop) + 1 if stop in ref else None
        for sample, done in zip(samples, finished):
            assert sample == ref[:end] and done == (end is not None)
    assert len(out.response_ids[0][0]) <= 4


def test_sample_top_p_follows_meta_nucleus_semantics():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).repeat(4000, 1)
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps {0.5, 0.3}, which
    # renormalise to 0.625 / 0.375 (the token that crosses the threshold is kept).
    tokens = sample_top_p(probs, 0.7, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    assert abs((tokens == 1).float().mean().item() - 0.625) < 0.03
    # top_p below the largest probability keeps only the argmax
    assert set(sample_top_p(probs[:50], 0.4).tolist()) == {1}


def test_sample_categorical_draws_in_proportion_and_never_a_zero_weight():
    """The inverse-CDF draw behind every sampled token: frequencies follow the (unnormalised) weights, weight-0
    entries are never drawn, the seeded stream repeats, and rows without a valid distribution raise."""
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]]).repeat(20000, 1)
    tokens = sample_categorical(weights, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0]), atol=0.015, rtol=0)
    assert torch.equal(tokens, sample_categorical(weights, torch.Generator().manual_seed(0)))
    # a vocabulary-sized, very peaked distribution: tiny probabilities keep their share (float64 cumulative sum)
    probs = torch.softmax(torch.randn(4, 32000, generator=torch.Generator().manual_seed(1)) * 4, -1)
    rows = probs.repeat_interleave(2000, 0)
    drawn = sample_categorical(rows, torch.Generator().manual_seed(2)).view(4, 2000)
    assert (probs.gather(1, drawn) > 0).all()
    top = probs.argmax(-1)
    assert ((drawn == top[:, None]).float().mean(-1) - probs.max(-1).values).abs().max() < 0.05
    # several blocks of 256 and a padded last one: only the positive weights, in proportion, up to the last entry
    sparse = torch.zeros(1000)
    sparse[[0, 255, 256, 700, 999]] = torch.tensor([1.0, 1.0, 2.0, 0.5, 0.5])
    tokens = sample_categorical(sparse.repeat(20000, 1), torch.Generator().manual_seed(5))
    freq = torch.bincount(tokens, minlength=1000).float() / len(tokens)
    torch.testing.assert_close(freq, sparse / sparse.sum(), atol=0.015, rtol=0)
    assert set(tokens.tolist()) == {0, 255, 256, 700, 999}
    for bad in (torch.zeros(1, 4), torch.tensor([[0.5, float("nan"), 0.5]])):
        with pytest.raises(ValueError, match="sampling weights"):
            sample_categorical(bad)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.0, 1.0)])
def test_sampled_logprobs_equal_a_forward_pass(tiny_tokenizer, tiny_model_factory, temperature, top_p):
    """`return_logprobs`: every token's log-probability and entropy, taken inside the decoding loop (KV cache, left
    padding, K samples per prefill), equal those of one full float32 forward pass over the prompt and the response,
    log_softmax(logits / T) before top-p (T = 1 when greedy), within 1e-5."""
    model = tiny_model_factory()
    ids = prompt_ids(tiny_tokenizer)
    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p, num_samples=2, prompt_batch_size=2)
    out = generate(model, ids, cfg, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0,
                   generator=torch.Generator().manual_seed(4), return_logprobs=True)
    plain = generate(model, ids, cfg, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0,
                     generator=torch.Generator().manual_seed(4))
    assert out.response_ids == plain.response_ids and out.finished == plain.finished  # same draws either way
    scale = temperature if temperature > 0 else 1.0
    for p, samples, logprobs, entropies in zip(ids, out.response_ids, out.logprobs, out.entropy):
        for sample, logp, entropy in zip(samples, logprobs, entropies):
            assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (len(sample),)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + sample])).logits[0, len(p) - 1: -1]
            full = torch.log_softmax(logits.float() / scale, -1)
            torch.testing.assert_close(logp, full.gather(-1, torch.tensor(sample)[:, None]).squeeze(-1), atol=1e-5,
                                       rtol=0)
            torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), atol=1e-5, rtol=0)
    from llama2_hf.sampling.vllm_backend import VLLMSampler

    engine = type("Engine", (), {"generate_output": lambda *a, **k: None, "config": model.config})()
    with pytest.raises(ValueError, match="no log-probabilities"):  # an engine's samples come without them
        VLLMSampler(engine, tiny_tokenizer, cfg).sample_ids(ids, seed=0, return_logprobs=True)


def test_cpu_decoding_runs_the_head_as_one_matmul_and_restores_it(tiny_tokenizer, tiny_model_factory):
    """On CPU a plain bias-free LM head is run as `mm(W, x.T).T` while decoding (the same logits as `F.linear`, which
    the greedy and log-probability tests above check against full forward passes) and is itself again afterwards."""
    model = tiny_model_factory()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append("forward" in vars(m)))
    generate(model, prompt_ids(tiny_tokenizer), SamplingConfig(max_new_tokens=3, temperature=0), eos_token_id=-1)
    handle.remove()
    assert seen == [True] * 3 and "forward" not in vars(model.lm_head)
    x = torch.randn(2, 3, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(x), x @ model.lm_head.weight.t())


def test_generate_text_and_validation(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory()
    texts = generate_text(model, tiny_tokenizer, ["hi", [{"role": "user", "content": "what is 2 plus 2"}]],
                          SamplingConfig(max_new_tokens=5, num_samples=2), generator=torch.Generator().manual_seed(0))
    assert len(texts) == 2 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        generate(model, [[1, 2], []], SamplingConfig(max_new_tokens=2), eos_token_id=2)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] has 300 tokens"):
        generate(model, [[1] * 300], SamplingConfig(max_new_tokens=2), eos_token_id=2)
    with pytest.raises(ValueError, match="a prompt must be"):
        as_messages(3)


def _fsdp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from llama2_hf import Llama2Config, Llama2ForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama2ForCausalLM(Llama2Config.from_preset("tiny")).eval()
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, num_samples=2)
    expected = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=0).response_ids
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    up_proj = model.model.layers[0].mlp.up_proj
    full_rows = up_proj.weight.shape[0]  # a DTensor reports the global shape

    def local_rows():
        weight = up_proj.weight
        return weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]

    sharded_rows = local_rows()
    with full_weights_for_generation(model):
        during = local_rows()
        got = generate(model, prompts, cfg, eos_token_id=2, pad_token_id=0).response_ids
        after_forward = local_rows()  # the per-layer forward hooks did not reshard
    after = local_rows()
    if rank == 0:
        torch.save({"same": got == expected, "rows": [full_rows, sharded_rows, during, after_forward, after]},
                   result_path)
    dist.destroy_process_group()


def test_full_weights_for_generation_under_fsdp2(tmp_path):
    """Two gloo ranks shard a tiny model with `fully_shard`; generation inside the context equals the unsharded
    model's and the weights are sharded again afterwards."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "result.pt")
    mp.start_processes(_fsdp_worker, args=(2, port, path), nprocs=2, join=True, start_method="fork")
    result = torch.load(path, weights_only=True)
    assert result["same"]
    full, sharded, during, after_forward, after = result["rows"]
    assert sharded == after == full // 2
    assert during == after_forward == full


def test_chat_sampling_arguments_reseed_and_rollout(tiny_tokenizer, tiny_model_factory):
    from llama2_hf.sampling import ChatSampler, rollout
    from llama2_hf.stages.sampling import ChatSamplingArguments

    args = ChatSamplingArguments(max_new_tokens=5, temperature=1.0, top_p=0.9, prompt_batch_size=2)
    assert args.sampling_config() == SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, num_samples=1,
                                                    prompt_batch_size=2)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        ChatSamplingArguments(temperature=-1.0)
    sampler = ChatSampler(tiny_model_factory(), tiny_tokenizer, args.sampling_config(), seed=0)
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "what is the sun"}]]
    first = sampler(conversations)
    sampler.reseed(0)  # the same stream again: the same samples
    assert sampler(conversations) == first

    # rollout: dialogue i runs num_turns[i] turns, every dialogue batched per turn, answers fed back in order
    calls = []

    def echo(convs):
        calls.append(len(convs))
        return [f"a{sum(m['role'] == 'user' for m in c)}" for c in convs]

    def build(i, k, answers):
        messages = []
        for j in range(k + 1):
            messages.append({"role": "user", "content": f"d{i}q{j}"})
            if j < len(answers):
                messages.append({"role": "assistant", "content": answers[j]})
        return messages

    assert rollout(echo, [1, 3], build) == [["a1"], ["a1", "a2", "a3"]] and calls == [2, 1, 1]
    # a context of 2 messages (token_counter=len) stops the second dialogue after its first turn
    assert rollout(echo, [1, 3], build, max_length=2, token_counter=len) == [["a1"], ["a1"]]
