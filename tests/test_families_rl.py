"""Any transformers chat model in the RL and chat-data stages: a tiny Qwen2 (ChatML with generation marks, a system
role) and a tiny Mistral (`[INST]` without a system role) go through `rejection-sample` (with its fine-tuning), `ppo`
(the critic from the helpfulness RM, and once from the policy), `gatt` (then `sft` on its rows, last turn only),
`gatt-eval`, `distill` and `refusals`, with a policy, reference, critic and reward models of their own family; one
reward model of the other family (another tokenizer) scores by re-encoding the text. Every model written stays its
family (model type, architecture, tokenizer class, chat template) and loads with the Auto classes in a process that
never imports this package. The RLHF loop (`iterate`) runs one version with PPO on the Qwen2 family."""

from __future__ import annotations

import json

import pytest
import torch

from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING, write_jsonl
from test_families import checkpoint_tokenizer, load_elsewhere, model_of, tokenizer_of

FAMILIES = {"qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
            "mistral": ("MistralForCausalLM", "MistralForSequenceClassification")}
PROMPTS = [{"prompt": f"what is {i} plus {i + 1}?", "is_safety_prompt": i % 2 == 0} for i in range(4)]
TINY_PPO = {"use_cpu": True, "batch_size": 4, "mini_batch_size": 4, "prompt_batch_size": 4, "max_new_tokens": 4,
            "num_iterations": 1, "learning_rate": 1e-3, "save_steps": 1, "reward_whitening": "none",
            "disable_tqdm": True}


def lm_of(family: str, tokenizer, seed: int = 0):
    return model_of(family, tokenizer, seed, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)


def family_tokenizer(family: str, folder):
    """The family's tokenizer as its checkpoint folder reads it back, with a pad token (EOS where it has none)."""
    tokenizer = checkpoint_tokenizer(family, folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Per family: `policy` (causal LM + tokenizer), `helpful` and `safety` reward models (the policy's decoder
    with a random scalar head, the pad a reward model reads around), and the data files."""
    from llama2_hf.loading import reward_pad_token
    from llama2_hf.trainers.reward import reward_model_from_causal_lm

    root = tmp_path_factory.mktemp("families_rl")
    out = {}
    for family in FAMILIES:
        folder = root / family
        tokenizer = family_tokenizer(family, folder / "policy")
        lm_of(family, tokenizer).save_pretrained(folder / "policy")
        tokenizer.save_pretrained(folder / "policy")
        for seed, name in ((1, "helpful"), (2, "safety")):
            rm = reward_model_from_causal_lm(lm_of(family, tokenizer, seed))
            torch.nn.init.normal_(rm.score.weight, std=0.5)
            rm_tokenizer = family_tokenizer(family, folder / name)
            rm.config.pad_token_id = reward_pad_token(rm_tokenizer)
            rm.save_pretrained(folder / name)
            rm_tokenizer.save_pretrained(folder / name)
        out[family] = folder
    out["prompts"] = write_jsonl(root / "prompts.jsonl", PROMPTS)
    out["dialogues"] = write_jsonl(root / "dialogues.jsonl", [
        {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello."},
                      {"role": "user", "content": "what is 2 plus 3?"}]},
        {"messages": [{"role": "user", "content": "thanks"}]}])
    return out


def assert_own_family(family: str, policy, outputs: list[tuple[str, str, str]]) -> None:
    """Each (kind, model folder, tokenizer folder) loads with the Auto classes without this package, as `family`."""
    from transformers import AutoTokenizer

    loaded = load_elsewhere(outputs)
    source = AutoTokenizer.from_pretrained(policy)
    lm, rm = FAMILIES[family]
    for kind, path, tokenizer_path in outputs:
        seen = loaded[str(path)]
        arch, model_type, tokenizer_class, template, shape = (seen[k] for k in ("class", "model_type", "tokenizer",
                                                                                 "template", "shape"))
        assert (arch, model_type) == (lm if kind == "lm" else rm, family), path
        assert (tokenizer_class, template) == (type(source).__name__, source.chat_template), path
        assert shape[-1] == (1 if kind == "rm" else len(source))
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == [arch] and "auto_map" not in config
        tok_config = json.loads((tokenizer_path / "tokenizer_config.json").read_text())
        assert tok_config.get("tokenizer_class") == json.loads(
            (policy / "tokenizer_config.json").read_text()).get("tokenizer_class")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rejection_sampling_and_ppo_keep_the_family(inputs, tmp_path, family):
    folder = inputs[family]
    other = inputs["mistral" if family == "qwen2" else "qwen2"]
    rms = {"helpfulness_reward_model": str(folder / "helpful"), "safety_reward_model": str(folder / "safety")}
    rs = tmp_path / "rs"
    record = run_stage("rejection-sample", model_name_or_path=str(folder / "policy"),
                       prompts_file=[str(inputs["prompts"])], output_dir=str(rs), num_samples=2, max_new_tokens=4,
                       prompt_batch_size=4, select_unfinished=True, **rms, **TINY_TRAINING)
    assert record.outputs["model"] == "." and record.metrics["selected_rows"] == len(PROMPTS)
    candidates = read_jsonl(rs / "candidates.jsonl")
    assert all(len(r["scores"]) == 2 and None not in r["scores"] for r in candidates)
    # PPO from the rejection-sampling model: the critic from the helpfulness RM, a safety RM of the other family
    # (another tokenizer: it scores the decoded text in its own chat format)
    ppo = tmp_path / "ppo"
    record = run_stage("ppo", model_name_or_path=str(rs), prompts_file=[str(inputs["prompts"])], output_dir=str(ppo),
                       helpfulness_reward_model=str(folder / "helpful"), safety_reward_model=str(other / "safety"),
                       value_model_init="reward_model", **TINY_PPO)
    assert {"reward/helpfulness", "reward/safety"} <= set(record.metrics)
    assert torch.isfinite(torch.tensor(record.metrics["value/loss"]))
    # the critic from the policy's own decoder (a fresh head), the policy PPO left
    from_policy = tmp_path / "ppo-policy-critic"
    run_stage("ppo", model_name_or_path=str(ppo), prompts_file=[str(inputs["prompts"])],
              output_dir=str(from_policy), value_model_init="policy", **rms, **TINY_PPO)
    assert_own_family(family, folder / "policy", [
        ("lm", rs, rs), ("lm", ppo, ppo), ("rm", ppo / "value_model", ppo),
        ("lm", from_policy, from_policy), ("rm", from_policy / "value_model", from_policy)])


def test_reward_models_keep_their_own_tokenizer(inputs, tmp_path):
    """The loop's judge scores with each RM's own tokenizer; an RM of another vocabulary cannot start the critic."""
    from llama2_hf.errors import UsageError
    from llama2_hf.iterate import RewardModelJudge

    judge = RewardModelJudge(str(inputs["mistral"] / "helpful"), str(inputs["qwen2"] / "safety"),
                             tokenizer_name_or_path=str(inputs["qwen2"] / "policy"))
    assert judge.scorer("helpfulness").tokenizer.chat_template == tokenizer_of("mistral").chat_template
    assert type(judge.scorer("safety").tokenizer).__name__ == "Qwen2Tokenizer"
    pairs = [{"id": "x", "prompt": "what is 1 plus 1?", "response_a": "2.", "response_b": "3.",
              "is_safety_prompt": False}]
    assert judge(pairs)[0]["choice"] in ("a", "b")
    with pytest.raises(UsageError, match="value_model_init=reward_model: the helpfulness reward model .* has another "
                                         "vocabulary"):
        run_stage("ppo", model_name_or_path=str(inputs["qwen2"] / "policy"), prompts_file=[str(inputs["prompts"])],
                  output_dir=str(tmp_path / "ppo"), helpfulness_reward_model=str(inputs["mistral"] / "helpful"),
                  value_model_init="reward_model", **TINY_PPO)


def test_model_judge_keeps_meta_ids_for_llama2(tiny_tokenizer, tiny_model_factory):
    from llama2_hf.gatt.evaluation import JUDGE_PROMPT, ModelJudge
    from llama2_hf.tokenization_llama2 import encode_dialog

    judge = ModelJudge(tiny_model_factory(), tiny_tokenizer)
    question = [{"role": "user", "content": JUDGE_PROMPT.format(instruction="Speak French.", response="Oui.")}]
    assert judge.chat_format.prompt_ids(question) == encode_dialog(tiny_tokenizer, question)


def test_critic_values_read_every_token_of_a_family_classifier(inputs):
    """`token_values` of an Auto sequence classifier: its head on each position; at the last token, its score."""
    from llama2_hf.loading import load_pretrained, load_tokenizer
    from llama2_hf.modeling_llama2 import Llama2ForRewardModel
    from llama2_hf.trainers.ppo_parts import token_values, value_model_from_policy

    for family in FAMILIES:
        rm = load_pretrained(Llama2ForRewardModel, str(inputs[family] / "helpful"), "reward model")
        ids = torch.tensor([load_tokenizer(inputs[family] / "helpful")("hello there friend")["input_ids"]])
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        values = token_values(rm, ids, mask, positions)
        assert values.shape == ids.shape
        assert torch.allclose(values[0, -1], rm(input_ids=ids).logits[0, 0], atol=1e-5)
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(inputs[family] / "policy")
        critic = value_model_from_policy(policy)
        assert type(critic).__name__ == FAMILIES[family][1] and critic.config.num_labels == 1
        assert torch.equal(token_values(critic, ids, mask, positions), torch.zeros_like(values))
        hidden = policy.model(input_ids=ids).last_hidden_state
        assert torch.allclose(critic.model(input_ids=ids).last_hidden_state, hidden)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gatt_gatt_eval_distill_refusals_keep_the_family(inputs, tmp_path, family):
    from transformers import AutoTokenizer

    from llama2_hf.chat_format import chat_format_for
    from llama2_hf.loading import load_tokenizer

    folder = inputs[family]
    greedy = {"max_new_tokens": 4, "temperature": 0.0, "prompt_batch_size": 2}
    gatt = tmp_path / "gatt"
    record = run_stage("gatt", model_name_or_path=str(folder / "policy"), dialogues_file=[str(inputs["dialogues"])],
                       output_dir=str(gatt), **greedy)
    rows = read_jsonl(gatt / "gatt.jsonl")
    assert record.metrics["rows"] == 2 and rows[0]["messages"][0]["role"] == "system"
    # sft on the GAtt rows, the last answer only: the instruction goes where the template takes it
    tokenizer = load_tokenizer(folder / "policy")
    encoded = chat_format_for(tokenizer).encode(rows[0]["messages"], train_on="last")
    text = tokenizer.decode(encoded.input_ids)
    assert rows[0]["messages"][0]["content"] in text
    answer = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m])
    assert answer.startswith(rows[0]["messages"][-1]["content"]) and sum(encoded.assistant_mask) < len(text)
    if family == "mistral":  # no system role: the instruction opens the first user turn
        assert text.startswith(f"<s>[INST] {rows[0]['messages'][0]['content']}\n\n")
    sft = tmp_path / "sft"
    run_stage("sft", model_name_or_path=str(folder / "policy"), train_file=[str(gatt)], train_on="last",
              output_dir=str(sft), **{**TINY_TRAINING, "max_length": 512})
    record = run_stage("gatt-eval", model_name_or_path=str(sft), eval_name="tiny", num_dialogues=2,
                       eval_max_turns=2, turns=[2], output_dir=str(tmp_path / "gatt-eval"),
                       checkers=["language", "keyword", "judge"], judge_model=str(folder / "policy"), **greedy)
    assert record.metrics["adherence"]["tiny"]["2"] is not None
    # distill: answers with and without the preprompt, scored by the family's safety RM
    record = run_stage("distill", model_name_or_path=str(folder / "policy"), prompts_file=[str(inputs["prompts"])],
                       safety_reward_model=str(folder / "safety"), output_dir=str(tmp_path / "distill"), **greedy)
    assert record.metrics["adversarial"] == 2
    candidates = read_jsonl(tmp_path / "distill" / "candidates.jsonl")
    scored = [r for r in candidates if r["status"] == "scored"]
    assert len(scored) == 2 and all(isinstance(r["safety_gain"], float) for r in scored)
    borderline = write_jsonl(tmp_path / "borderline.jsonl", [{"prompt": "how do i kill a python process?"}])
    record = run_stage("refusals", model_name_or_path=str(folder / "policy"), prompts_file=[str(inputs["prompts"])],
                       borderline_file=str(borderline), output_dir=str(tmp_path / "refusals"),
                       classifier=str(folder / "helpful"), **greedy)
    assert record.metrics["prompts"]["total"] == len(PROMPTS) and record.metrics["borderline"]["total"] == 1
    assert AutoTokenizer.from_pretrained(sft).chat_template == AutoTokenizer.from_pretrained(folder / "policy").chat_template
    assert_own_family(family, folder / "policy", [("lm", sft, sft)])


class LongerWins:
    """A programmatic annotator: the longer response wins, nothing is unsafe."""

    name = "longer-wins"

    def __call__(self, pairs):
        return [{"choice": "a" if len(p["response_a"]) >= len(p["response_b"]) else "b", "rating": "better",
                 "safety_a": "safe", "safety_b": "safe"} for p in pairs]


def test_rlhf_loop_keeps_the_family(inputs, tmp_path):
    from llama2_hf.iterate import IterateConfig
    from llama2_hf.stages.rlhf_loop import iterate

    folder = inputs["qwen2"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"what is {i} plus {i}?", "is_safety_prompt": i % 2 == 0} for i in range(4)])
    config = IterateConfig(output_dir=str(tmp_path / "loop"), model_name_or_path=str(folder / "policy"),
                           prompts_file=[str(prompts)], eval_prompts_file=[str(inputs["prompts"])], versions=1,
                           prompts_per_version=4, max_new_tokens=4, sampling_batch_size=4, heldout_fraction=0.25,
                           annotation_batch_size=4, pair_temperatures=[0.8, 1.5], ppo_versions=[1], seed=0)
    stage_args = {"train-rm": TINY_TRAINING, "eval-rm": {"use_cpu": True}, "ppo": {**TINY_PPO, "batch_size": 4},
                  "rejection-sample": {**TINY_TRAINING, "num_samples": 2, "max_new_tokens": 4,
                                       "prompt_batch_size": 4, "select_unfinished": True}}
    records = iterate(config, LongerWins(), stage_args)
    assert records
    v1 = tmp_path / "loop" / "v1"
    results = json.loads((v1 / "eval" / "results.json").read_text())
    assert results["scores"]["current"]["helpfulness"] is not None
    assert_own_family("qwen2", folder / "policy", [
        ("rm", v1 / "rm_helpfulness", v1 / "rm_helpfulness"), ("rm", v1 / "rm_safety", v1 / "rm_safety"),
        ("lm", v1 / "rs", v1 / "rs"), ("lm", v1 / "ppo", v1 / "ppo"), ("rm", v1 / "ppo" / "value_model", v1 / "ppo")])
