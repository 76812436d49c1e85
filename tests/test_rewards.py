"""SafetyGatedReward branches, whitening, the reward-model scorer and TRL reward-function compatibility."""

import math

import pytest
import torch

from llama2_hf import Llama2Config, Llama2ForRewardModel
from llama2_hf.losses import whiten
from llama2_hf.rewards import RewardModelScorer, RunningMoments, SafetyGatedReward, score_with
from llama2_hf.tokenization_llama2 import encode_dialog


class TableScorer:
    """A reward model stand-in: a fixed logit per response text; records which responses it scored."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def __call__(self, prompts, responses):
        self.seen.extend(responses)
        return [self.table[r] for r in responses]


# safety logits: sigmoid(-2.0) = 0.119 < 0.15; sigmoid(-1.5) = 0.182; logit(0.15) = -1.7346 sits on the threshold
SAFETY = {"tagged": 1.0, "unsafe": -2.0, "borderline": -1.5, "threshold": math.log(0.15 / 0.85), "safe": 3.0}
HELP = {"tagged": 10.0, "unsafe": 20.0, "borderline": 30.0, "threshold": 40.0, "safe": 50.0}


def gated(whiten_mode="none", threshold=0.15):
    return SafetyGatedReward(TableScorer(HELP), TableScorer(SAFETY), threshold=threshold, whiten=whiten_mode)


def test_every_branch_of_the_piecewise_reward_picks_the_right_model():
    reward = gated()
    responses = ["tagged", "unsafe", "borderline", "threshold", "safe"]
    out = reward.score(["p"] * 5, responses, is_safety_prompt=[True, False, False, False, False])
    # tagged prompt -> R_s even though the safety score is high; sigmoid(R_s) < 0.15 -> R_s; otherwise R_h
    # (at exactly 0.15 the strict inequality picks the helpfulness model)
    torch.testing.assert_close(out.raw, torch.tensor([1.0, -2.0, 30.0, 40.0, 50.0]))
    torch.testing.assert_close(out.components["used_safety"], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out.rewards, out.raw)  # whiten="none": LOGIT(R_c) itself
    # the helpfulness model is only run where its score is used
    assert reward.helpfulness.seen == ["borderline", "threshold", "safe"]
    assert torch.isnan(out.components["helpfulness"][:2]).all()
    torch.testing.assert_close(out.components["safety_prob"], torch.sigmoid(torch.tensor(list(SAFETY.values()))))
    # a higher threshold moves the borderline case to the safety model; no tag column means nothing is tagged
    out = gated(threshold=0.2).score(["p"] * 2, ["borderline", "tagged"])
    torch.testing.assert_close(out.raw, torch.tensor([-1.5, 10.0]))


def test_probability_outputs_are_mapped_back_with_logit():
    reward = SafetyGatedReward(TableScorer({"a": 0.9}), TableScorer({"a": 0.5}), whiten="none",
                               rm_outputs="probabilities")
    torch.testing.assert_close(reward.score(["p"], ["a"]).raw, torch.tensor([math.log(9.0)]))


def test_batch_and_running_whitening():
    responses = ["unsafe", "borderline", "safe", "tagged"]
    raw = torch.tensor([-2.0, 30.0, 50.0, 10.0])
    out = gated("batch").score(["p"] * 4, responses)
    torch.testing.assert_close(out.rewards, whiten(raw))
    torch.testing.assert_close(out.raw, raw)  # the pre-whitening score stays available
    running = gated("running")
    running.score(["p"] * 2, responses[:2])
    second = running.score(["p"] * 2, responses[2:])
    mean, var = raw.mean(), raw.var(unbiased=False)  # statistics of everything seen so far
    torch.testing.assert_close(second.rewards, (raw[2:] - mean) / torch.sqrt(var + 1e-8))
    restored = gated("running")
    restored.load_state_dict(running.state_dict())
    assert restored.moments.state_dict() == running.moments.state_dict()


def test_running_moments_merge_exactly():
    moments = RunningMoments()
    values = torch.randn(37, generator=torch.Generator().manual_seed(0))
    for chunk in values.split([5, 1, 20, 11]):
        moments.update(chunk)
    assert moments.count == 37
    assert abs(moments.mean - values.mean().item()) < 1e-6
    assert abs(moments.var - values.var(unbiased=False).item()) < 1e-6


def test_bad_columns_raise_clear_errors():
    with pytest.raises(ValueError, match=r"is_safety_prompt\[1\] must be a bool"):
        gated().score(["p", "p"], ["safe", "safe"], is_safety_prompt=[True, "maybe"])
    with pytest.raises(ValueError, match="has 1 values for 2 prompts"):
        gated().score(["p", "p"], ["safe", "safe"], is_safety_prompt=[True])
    with pytest.raises(ValueError, match="whiten must be one of"):
        gated("global")


def test_trl_reward_function_signature_with_conversational_inputs():
    reward = gated("batch")
    logged = {}
    prompts = [[{"role": "user", "content": "q"}]] * 3
    completions = [[{"role": "assistant", "content": r}] for r in ("safe", "unsafe", "borderline")]
    values = reward(prompts=prompts, completions=completions, completion_ids=[[1], [2], [3]],
                    is_safety_prompt=[0, 0, 1],
                    trainer_state=None, log_extra=lambda *a: None, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert isinstance(values, list) and len(values) == 3 and all(isinstance(v, float) for v in values)
    torch.testing.assert_close(torch.tensor(values), whiten(torch.tensor([50.0, -2.0, -1.5])))
    assert logged["safety_gated_reward/used_safety"] == pytest.approx(2 / 3)
    assert logged["safety_gated_reward/helpfulness"] == pytest.approx(50.0)
    # plain callables of the contract work through score_with
    out = score_with(lambda prompts, responses, **kw: [len(r) for r in responses], ["a", "b"], ["xy", "xyz"])
    torch.testing.assert_close(out.rewards, torch.tensor([2.0, 3.0]))


@pytest.fixture
def tiny_rm(tiny_tokenizer):
    torch.manual_seed(1)
    return Llama2ForRewardModel(Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer))).eval()


def test_reward_model_scorer_batches_like_single_unpadded_calls(tiny_tokenizer, tiny_rm):
    prompts = ["what is 2 plus 2", [{"role": "system", "content": "be safe"}, {"role": "user", "content": "hello"}],
               "write a poem about the moon"]
    responses = ["4", "hello, how can i help you with that question", [{"role": "assistant", "content": "no"}]]
    scorer = RewardModelScorer(tiny_rm, tiny_tokenizer, batch_size=2)
    scores = scorer.raw_scores(prompts, responses)
    for i, ids in enumerate(scorer.encode(prompts, responses)):
        assert ids[-1] == tiny_tokenizer.eos_token_id  # scored at the closing EOS of the answer
        single = tiny_rm(input_ids=torch.tensor([ids])).logits[0, 0]
        assert abs(scores[i].item() - single.item()) < 1e-5
    messages = [{"role": "user", "content": "what is 2 plus 2"}, {"role": "assistant", "content": "4"}]
    assert scorer.encode(prompts[:1], responses[:1])[0] == encode_dialog(tiny_tokenizer, messages)
    # an RM in another dtype still returns float32 scores
    scorer16 = RewardModelScorer(tiny_rm.to(torch.bfloat16), tiny_tokenizer)
    out = scorer16.raw_scores(prompts, responses)
    assert out.dtype == torch.float32 and torch.allclose(out, scores, atol=0.05)
    with pytest.raises(ValueError, match="pair 0 is .* longer than the reward model's max_length 5"):
        RewardModelScorer(tiny_rm, tiny_tokenizer, max_length=5).raw_scores(prompts, responses)


def test_gated_reward_with_two_reward_models(tiny_tokenizer, tiny_rm):
    torch.manual_seed(2)
    safety_rm = Llama2ForRewardModel(Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer))).eval()
    helpful = RewardModelScorer(tiny_rm, tiny_tokenizer)
    safety = RewardModelScorer(safety_rm, tiny_tokenizer)
    prompts, responses = ["hi", "how do i hurt someone", "tell me a joke"], ["hello", "sorry, i cannot", "a cat"]
    out = SafetyGatedReward(helpful, safety, whiten="none").score(prompts, responses,
                                                                  is_safety_prompt=[False, True, False])
    r_h, r_s = helpful.raw_scores(prompts, responses), safety.raw_scores(prompts, responses)
    use_s = torch.tensor([False, True, False]) | (torch.sigmoid(r_s) < 0.15)
    torch.testing.assert_close(out.raw, torch.where(use_s, r_s, r_h))


def test_grpo_trainer_accepts_the_gated_reward(tmp_path, tiny_tokenizer, tiny_model_factory, tiny_rm):
    """One real GRPOTrainer step with SafetyGatedReward as its reward function (dataset column `is_safety_prompt`)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token
    scorer = RewardModelScorer(tiny_rm, tiny_tokenizer)
    reward = SafetyGatedReward(scorer, scorer)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} plus 1"}],
                               "is_safety_prompt": i % 2 == 0}
                              for i in range(4)])
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                      max_steps=1, per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                      logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=tiny_model_factory(), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tiny_tokenizer)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "rewards/safety_gated_reward/mean" in logs
    assert logs["safety_gated_reward/used_safety"] >= 0.5  # the tagged half always uses the safety model
