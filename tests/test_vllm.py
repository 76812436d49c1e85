"""The vLLM generation backend (`generation_backend: vllm`): the same continuations as the PyTorch backend, the
rejection-sampling stage's outputs from a recipe, PPO rollouts from the current weights, the backend chosen from a
recipe for every sampling stage.

vLLM runs in its own environment (`llama2-hf setup-vllm`); without it these tests are skipped. Its CPU attention
needs head_dim >= 64, hence the 2-head width-128 test model below. Starting an engine takes a minute or two on a
small CPU machine, so one engine serves the whole module (`engine`), and only the stage test starts its own.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.generation import SamplingConfig, generate
from llama2_hf.sampling import BackendArguments, ChatSampler, derive_seed
from llama2_hf.sampling.vllm_backend import VLLMSampler
from llama2_hf.sampling.vllm_engine import VLLMEngine, VLLMNotInstalled, vllm_python
from llama2_hf.tokenization_llama2 import encode_dialog
from tests.conftest import TargetTokenReward, write_jsonl

try:
    vllm_python()
    HAVE_VLLM = True
except VLLMNotInstalled:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM's environment is not built (llama2-hf setup-vllm)")

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats, please."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Translate 'good morning' into German."}],
]


def vllm_config(vocab_size: int, **overrides) -> Llama2Config:
    """Tiny but vLLM-CPU compatible: head_dim 64 (2 heads of width 128)."""
    return Llama2Config.from_preset("tiny", vocab_size=vocab_size, hidden_size=128, num_attention_heads=2,
                                    num_key_value_heads=2, **overrides)


def make_policy(tokenizer, seed: int = 0) -> Llama2ForCausalLM:
    torch.manual_seed(seed)
    return Llama2ForCausalLM(vllm_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def engine(llama2_tokenizer):
    if not HAVE_VLLM:
        pytest.skip("vLLM's environment is not built (llama2-hf setup-vllm)")
    with VLLMEngine.start_for_model(make_policy(llama2_tokenizer), BackendArguments(generation_backend="vllm")) as e:
        yield e


def chat_ids(tokenizer) -> list[list[int]]:
    return [encode_dialog(tokenizer, m) for m in MESSAGES]


@needs_vllm
def test_greedy_continuations_equal_the_torch_backend(engine, llama2_tokenizer):
    policy = make_policy(llama2_tokenizer)
    engine.load_weights(policy)  # the module's engine may hold another test's weights
    prompts = chat_ids(llama2_tokenizer)
    config = SamplingConfig(max_new_tokens=24, temperature=0.0, num_samples=1, prompt_batch_size=4)
    ours = generate(policy, prompts, config, eos_token_id=llama2_tokenizer.eos_token_id)
    sampler = VLLMSampler(engine, llama2_tokenizer, config)
    theirs = sampler.sample_ids(prompts, seed=None)
    assert theirs.response_ids == ours.response_ids
    assert theirs.finished == ours.finished
    assert all(len(r[0]) == 24 for r in ours.response_ids)  # a random model never says EOS: 24 real tokens each

    # Sampling: a call's seed makes it reproducible (prompt i seeded with derive_seed(seed, i)); the K samples
    # differ; another seed draws other samples.
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=4)
    a = sampler.sample_ids(prompts, seed=10, config=sampled)
    assert sampler.sample_ids(prompts, seed=10, config=sampled).response_ids == a.response_ids
    b = engine.generate_output(prompts[2:3], sampled, seeds=[derive_seed(10, 2)])
    assert b.response_ids[0] == a.response_ids[2]
    assert len({tuple(s) for s in a.response_ids[0]}) > 1
    c = sampler.sample_ids(prompts, seed=20, config=sampled)
    assert c.response_ids != a.response_ids


@needs_vllm
def test_chat_sampler_over_the_engine_answers_as_the_torch_model(engine, llama2_tokenizer):
    policy = make_policy(llama2_tokenizer)
    engine.load_weights(policy)
    config = SamplingConfig(max_new_tokens=10, temperature=0.0, num_samples=1)
    expected = ChatSampler(policy, llama2_tokenizer, config, seed=0)(MESSAGES[:3])
    sampler = ChatSampler(VLLMSampler(engine, llama2_tokenizer, config), seed=0)
    assert sampler.max_length == policy.config.max_position_embeddings
    assert sampler(MESSAGES[:3]) == expected


@needs_vllm
def test_evaluation_generation_with_the_engine_equals_the_torch_model(engine, llama2_tokenizer):
    from llama2_hf.evaluation.base import ensure_pad_token
    from llama2_hf.evaluation.engine import TaskDecoding as EvalSampling
    from llama2_hf.evaluation.engine import generate_until

    tokenizer = copy.deepcopy(llama2_tokenizer)
    ensure_pad_token(tokenizer)
    policy = make_policy(tokenizer)
    engine.load_weights(policy)
    contexts = ["Question: What is 2 + 3?\nAnswer:", "Q: Name a colour.\nA:", "The capital of France is"]
    common = dict(stop=["\n", "."], sampling=EvalSampling(max_new_tokens=12), batch_size=2, progress=False)
    expected = generate_until(policy, tokenizer, contexts, **common)
    sampler = VLLMSampler(engine, tokenizer)
    assert generate_until(policy, tokenizer, contexts, sampler=sampler, **common) == expected


@needs_vllm
def test_ppo_rollouts_come_from_the_weights_after_the_previous_update(engine, llama2_tokenizer, tmp_path):
    from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer

    prompts = [{"prompt": m[-1]["content"], "is_safety_prompt": False} for m in MESSAGES[:4]]
    config = Llama2PPOConfig(output_dir=str(tmp_path / "ppo"), num_iterations=2, batch_size=4, mini_batch_size=4,
                             learning_rate=0.5, value_model_init="policy", save_steps=0, use_cpu=True, report_to=[])
    rollout = SamplingConfig(max_new_tokens=6, temperature=0.0, top_p=1.0, prompt_batch_size=64)
    # Adam moves every weight with a gradient by about the learning rate: 0.5 makes one update change the greedy
    # answers, so that rollouts from stale weights cannot pass for fresh ones.
    policy = make_policy(llama2_tokenizer, seed=3)  # the engine starts with other weights: the push must land
    initial = copy.deepcopy(policy)
    trainer = Llama2PPOTrainer(config, policy, llama2_tokenizer, TargetTokenReward(llama2_tokenizer), prompts,
                               sampler=VLLMSampler(engine, llama2_tokenizer, rollout))
    rollouts = []
    generate_output = engine.generate_output

    def recording(prompt_ids, *args, **kwargs):
        out = generate_output(prompt_ids, *args, **kwargs)
        rollouts.append((prompt_ids, [r[0] for r in out.response_ids]))
        return out

    engine.generate_output = recording
    updates = engine.weight_updates
    try:
        trainer.step()
        after_first = copy.deepcopy(trainer.policy).eval()
        metrics = trainer.step()
    finally:
        del engine.generate_output
    assert engine.weight_updates == updates + 2 and metrics["time/weight_sync"] > 0

    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=1)

    def torch_greedy(model, ids):
        return [r[0] for r in generate(model, ids, greedy, eos_token_id=llama2_tokenizer.eos_token_id).response_ids]

    assert all(torch.isfinite(p).all() for p in after_first.parameters())  # NaN weights would also agree
    (first_prompts, first), (second_prompts, second) = rollouts
    assert first == torch_greedy(initial, first_prompts)
    assert second == torch_greedy(after_first, second_prompts)
    # The update changed the greedy answers: an engine with stale weights would give the initial policy's.
    assert second != torch_greedy(initial, second_prompts)


@pytest.fixture(scope="module")
def rs_inputs(tmp_path_factory, llama2_tokenizer):
    root = tmp_path_factory.mktemp("vllm_rs")
    make_policy(llama2_tokenizer).save_pretrained(root / "policy")
    llama2_tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(1)
    Llama2ForRewardModel(Llama2Config.from_preset("tiny", vocab_size=len(llama2_tokenizer))).save_pretrained(
        root / "rm")
    rows = [{"id": f"p{i}", "messages": m, "is_safety_prompt": i % 3 == 0} for i, m in enumerate(MESSAGES)]
    return {"root": root, "policy": root / "policy", "rm": root / "rm",
            "prompts": write_jsonl(root / "prompts.jsonl", rows)}


def rs_recipe(inputs, out, **extra) -> dict:
    return {"model_name_or_path": str(inputs["policy"]), "helpfulness_reward_model": str(inputs["rm"]),
            "prompts_file": [str(inputs["prompts"])], "output_dir": str(out), "num_samples": 3,
            "temperature": 1.0, "max_new_tokens": 8, "prompt_batch_size": 4, "finetune": False, "seed": 7,
            "use_cpu": True, "report_to": [], **extra}


@needs_vllm
def test_rejection_sampling_stage_with_the_vllm_backend_from_a_recipe(rs_inputs, llama2_tokenizer, engine, tmp_path):
    from llama2_hf.cli import main as cli
    from llama2_hf.runner import RunRecord

    out = tmp_path / "rs"
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(yaml.safe_dump(rs_recipe(rs_inputs, out, generation_backend="vllm")))
    assert cli(["rejection-sample", "--config", str(recipe)]) == 0

    record = RunRecord.read(out)
    assert record.args["generation_backend"] == "vllm"
    assert record.outputs["candidates"] == "candidates.jsonl" and record.outputs["data"] == "selected.jsonl"
    candidates = [json.loads(line) for line in open(out / "candidates.jsonl")]
    assert [c["prompt_id"] for c in candidates] == [f"p{i}" for i in range(len(MESSAGES))]
    for c in candidates:
        assert c["sampling"] == {"iteration": 1, "num_samples": 3, "temperature": 1.0, "top_p": 1.0,
                                 "max_new_tokens": 8, "prompt_batch_size": 4, "seed": 7, "backend": "vllm"}
        assert len(c["responses"]) == len(c["finished"]) == len(c["scores"]) == len(c["rewards"]) == 3
        assert all(isinstance(s, float) for s in c["scores"])
        assert c["is_safety_prompt"] == (int(c["prompt_id"][1:]) % 3 == 0)
    selected = [json.loads(line) for line in open(out / "selected.jsonl")]
    for row in selected:  # SFT rows: the prompt's conversation closed by its best finished sample
        source = next(c for c in candidates if c["messages"] == row["messages"][:-1])
        assert row["messages"][-1] == {"role": "assistant", "content": source["best"]["response"]}

    # The samples are vLLM's, each batch seeded from (seed, iteration, its first prompt id) and prompt i of the batch
    # from that: the module's engine, given the same weights, draws prompt p2's three samples again.
    from llama2_hf.stages.common import load_tokenizer

    tokenizer = load_tokenizer(str(rs_inputs["policy"]))  # the stage's own
    engine.load_weights(Llama2ForCausalLM.from_pretrained(str(rs_inputs["policy"])))
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, num_samples=3)
    out = engine.generate_output([encode_dialog(tokenizer, MESSAGES[2])], config,
                                 seeds=[derive_seed(derive_seed(7, 1, "p0"), 2)], eos_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.response_ids[0]]
    assert candidates[2]["responses"] == texts, out
    assert candidates[2]["finished"] == out.finished[0]


SAMPLING_STAGES = ["rejection-sample", "ppo", "gatt", "gatt-eval", "distill", "refusals", "eval"]


@pytest.mark.parametrize("name", SAMPLING_STAGES)
def test_every_sampling_stage_reads_the_backend_from_a_recipe(name, tmp_path):
    from llama2_hf.runner import field_names, parse_args
    from llama2_hf.stages import get_stage

    stage = get_stage(name)
    assert any(issubclass(t, BackendArguments) for t in stage.dataclass_types)
    values = {"output_dir": str(tmp_path / "out"), "generation_backend": "vllm", "vllm_tensor_parallel_size": 2}
    if "use_cpu" in field_names(stage):  # Trainer-based stages refuse their bf16 default without a GPU
        values["use_cpu"] = True
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    instances, _ = parse_args(stage, ["--config", str(recipe)])
    chosen = next(i for i in instances if isinstance(i, BackendArguments))
    assert (chosen.generation_backend, chosen.vllm_tensor_parallel_size) == ("vllm", 2)
    instances, _ = parse_args(stage, ["--config", str(recipe), "--generation_backend", "torch"])
    assert next(i for i in instances if isinstance(i, BackendArguments)).generation_backend == "torch"


def test_a_missing_vllm_environment_stops_the_stage_before_any_model_load(rs_inputs, tmp_path, capsys):
    from llama2_hf.cli import main as cli

    args = rs_recipe(rs_inputs, tmp_path / "rs", generation_backend="vllm",
                     vllm_python=str(tmp_path / "no-env" / "bin" / "python"))
    argv = ["rejection-sample"]
    for key, value in args.items():
        if value != []:
            argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "vLLM's environment is not installed" in err and "llama2-hf setup-vllm" in err
    assert "Traceback" not in err


@needs_vllm
def test_another_family_samples_through_vllm_as_through_torch(tmp_path):
    """A Qwen2 policy (ChatML template, tied embeddings) on the vLLM backend: vLLM's own Qwen2 class serves it, the
    prompts are the ids of the tokenizer's chat template, and greedy answers equal the PyTorch backend's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llama2_hf.sampling import open_sampler
    from llama2_hf.sampling.torch_backend import TorchSampler
    from tests.test_families import checkpoint_tokenizer

    tokenizer = checkpoint_tokenizer("qwen2", tmp_path)  # what any process reads from a qwen2 folder
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True)).eval()
    config = SamplingConfig(max_new_tokens=12, temperature=0.0, prompt_batch_size=4)
    ours = TorchSampler(model, tokenizer, config)
    with open_sampler(model, tokenizer, config, BackendArguments(generation_backend="vllm")) as sampler:
        assert sampler.backend == "vllm" and sampler.max_length == 256
        assert sampler.encode(MESSAGES[0]) == tokenizer.apply_chat_template(MESSAGES[0], add_generation_prompt=True,
                                                                           tokenize=True, return_dict=False)
        prompt_ids = [sampler.encode(m) for m in MESSAGES[:4]]
        theirs = sampler.sample_ids(prompt_ids, seed=0)
        texts = sampler.sample(MESSAGES[:4], seed=0)
    mine = ours.sample_ids(prompt_ids, seed=0)
    assert theirs.response_ids == mine.response_ids and theirs.finished == mine.finished
    assert sum(len(r[0]) for r in mine.response_ids) > 4  # real tokens, not only an immediate EOS
    assert texts == ours.sample(MESSAGES[:4], seed=0)
