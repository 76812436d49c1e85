"""Llama2PPOTrainer: paper defaults, first-step invariants, learning, LoRA reference, critic, checkpoint/resume,
precision (fp32 master weights with bf16 compute). The `ppo` stage and its launches: tests/test_stage_ppo.py."""

import json

import pytest
import torch

from llama2_hf import Llama2Config, Llama2ForRewardModel
from llama2_hf.rewards import RewardModelScorer
from llama2_hf.losses import entropy_from_logits, logprobs_from_logits
from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer, PPOSampling, token_logprobs, token_values
from tests.conftest import TargetTokenReward

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "prompt_batch_size")
PROMPTS = [{"prompt": f"say the magic words, number {i}", "is_safety_prompt": i % 4 == 0} for i in range(32)]


def small_config(tmp_path, **overrides):
    """(PPO config, rollout sampling): the sampling fields of `overrides` go to the second."""
    base = dict(output_dir=str(tmp_path / "ppo"), num_iterations=2, batch_size=8, mini_batch_size=4,
                max_new_tokens=4, learning_rate=1e-3, value_model_init="policy", save_steps=0)
    values = {**base, **overrides}
    sampling = PPOSampling(**{k: values.pop(k) for k in SAMPLING_FIELDS if k in values}).sampling_config()
    return Llama2PPOConfig(**values), sampling


def ppo_trainer(setup, *args, **kwargs) -> Llama2PPOTrainer:
    config, sampling = setup
    return Llama2PPOTrainer(config, *args, sampler=sampling, **kwargs)


def test_config_defaults_are_the_papers():
    cfg = Llama2PPOConfig()
    assert (cfg.batch_size, cfg.mini_batch_size, cfg.ppo_epochs) == (512, 64, 1)  # 8 steps per iteration
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (1e-6, 0.9, 0.95, 1e-5)
    assert (cfg.weight_decay, cfg.max_grad_norm, cfg.clip_range) == (0.1, 1.0, 0.2)
    assert cfg.kl_coef == 0.01 and Llama2PPOConfig(model_size="13b").kl_coef == 0.01
    assert Llama2PPOConfig(model_size="34b").kl_coef == Llama2PPOConfig(model_size="70b").kl_coef == 0.005
    assert Llama2PPOConfig(model_size="70b", kl_coef=0.02).kl_coef == 0.02
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        Llama2PPOConfig(batch_size=100, mini_batch_size=64)
    with pytest.raises(ValueError, match="kl_estimator"):
        Llama2PPOConfig(kl_estimator="k9")


@pytest.mark.parametrize("rollout_logprobs", [True, False])
def test_first_iteration_has_zero_kl_and_unit_ratio(tmp_path, tok, tiny_model_factory, rollout_logprobs):
    trainer = ppo_trainer(small_config(tmp_path, rollout_logprobs=rollout_logprobs), tiny_model_factory(), tok,
                               TargetTokenReward(tok), PROMPTS)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    m = trainer.step()
    # policy == pi_0 before the first update: exactly 0 when both come from the same forward pass; the sampling
    # steps' log-probabilities (KV-cached decode) differ from pi_0's forward pass by float rounding only
    assert m["objective/kl"] == pytest.approx(0.0, abs=0 if not rollout_logprobs else 1e-5)
    assert m["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    for key in ("reward/mean", "objective/entropy", "value/loss", "policy/clipfrac", "response/length_mean",
                "time/generation", "time/scoring", "time/training"):
        assert key in m
    changed = [k for k, v in trainer.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every policy parameter moved
    m = trainer.step()
    assert m["objective/kl"] != 0.0  # the policy has moved away from pi_0
    assert m["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)  # rollouts are on-policy


def test_rollout_logprobs_from_sampling_equal_a_forward_pass(tmp_path, tok, tiny_model_factory):
    """`rollout_logprobs` (default): the old log-probabilities and entropies come from the sampling steps, not from a
    second forward pass of the policy. Same rollouts, the same log-probabilities and entropies within 1e-5 of the
    forward pass's, so the same first-iteration metrics and update within float rounding; and one forward pass of
    the policy fewer (the reference pass and the update's remain)."""
    runs = {}
    for flag in (True, False):
        cfg = small_config(tmp_path / str(flag), rollout_logprobs=flag, num_iterations=1, temperature=0.8)
        trainer = ppo_trainer(cfg, tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
        calls = []
        handle = trainer.policy.register_forward_pre_hook(lambda *a: calls.append(1))
        rollout, metrics = trainer._rollout(*trainer._next_prompts())
        handle.remove()
        metrics.update(trainer._train_on(rollout))
        runs[flag] = rollout, metrics, calls, trainer.policy.state_dict()
    (sampled, m_sampled, calls_sampled, w_sampled), (forward, m_forward, calls_forward, w_forward) = runs[True], \
        runs[False]
    assert torch.equal(sampled.query_responses, forward.query_responses)
    assert torch.equal(sampled.response_mask, forward.response_mask)
    mask = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[mask], forward.logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(sampled.values, forward.values)
    assert len(calls_forward) - len(calls_sampled) == 2  # the policy's scoring pass, one per micro-batch (8 / 4)
    assert m_sampled["reward/mean"] == m_forward["reward/mean"]
    for key in ("objective/kl", "objective/entropy", "policy/loss", "value/loss", "policy/ratio_first_minibatch",
                "policy/approx_kl"):
        assert m_sampled[key] == pytest.approx(m_forward[key], abs=1e-5), key
    for key, value in w_forward.items():
        torch.testing.assert_close(w_sampled[key], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, dtype, reuse", [(1.0, torch.float32, False), (1.0, torch.float32, True),
                                                      (0.7, torch.float32, False), (1.0, torch.bfloat16, False)])
def test_token_logprobs_and_their_gradient_equal_autograds(temperature, dtype, reuse, monkeypatch):
    """`token_logprobs` (the update's log-probabilities: one (N, V) buffer in backward, row blocks on CPU) equals
    `logprobs_from_logits(logits / T)` and its autograd gradient: float32 logits kept or handed over
    (`reuse_logits`), its own float32 copy (temperature, bf16 logits)."""
    import llama2_hf.trainers.ppo_parts as ppo_parts

    monkeypatch.setattr(ppo_parts, "_ROW_CHUNK_BYTES", 3 * 50 * 4)  # several row blocks, the last one short
    torch.manual_seed(0)
    base = (torch.randn(3, 5, 50) * 3).to(dtype)
    targets = torch.randint(0, 50, (3, 5))
    weights = torch.randn(3, 5)
    logits = base.clone().requires_grad_()
    reference = logprobs_from_logits(logits.float() / temperature, targets)
    (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
    produced = base.clone().requires_grad_()
    handed = produced * 1.0  # a non-leaf, as a model's output
    ours = token_logprobs(handed, targets, temperature, reuse_logits=reuse)
    (grad,) = torch.autograd.grad((ours * weights).sum(), produced)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(ours, reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)
    assert torch.equal(base, produced.detach())  # the leaf is never written
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(base, targets, temperature), reference.detach(), atol=1e-5,
                                   rtol=1e-5)
    assert entropy_from_logits(base.float()).shape == ours.shape


def test_chunks_cut_shared_left_padding_without_changing_the_scores(tmp_path, tok, tiny_model_factory):
    """Scoring and update chunks drop the prompt padding that all their rows share; the log-probabilities and
    values of every chunk equal those of the full-width batch."""
    prompts = [{"prompt": "hi"}, {"prompt": "a much longer prompt with many many more words in it, " * 2}] * 4
    trainer = ppo_trainer(small_config(tmp_path), tiny_model_factory(), tok, TargetTokenReward(tok), prompts)
    rollout, _ = trainer._rollout(*trainer._next_prompts())
    tensors = {"input_ids": rollout.query_responses, "attention_mask": rollout.attention_mask,
               "position_ids": rollout.position_ids}
    p_len = rollout.context_length
    with torch.no_grad():
        full_lp, _ = trainer._logprobs(trainer.policy, tensors, p_len)
        full_values = trainer._values(tensors, p_len)
        short = torch.tensor([i for i in range(8) if rollout.attention_mask[i, :p_len].sum() < p_len // 2])
        widths = []
        for rows, chunk, context in trainer._chunks(tensors, 2, p_len, short):
            widths.append(context)
            lp, _ = trainer._logprobs(trainer.policy, chunk, context)
            torch.testing.assert_close(lp, full_lp[rows], atol=1e-5, rtol=0)
            torch.testing.assert_close(trainer._values(chunk, context), full_values[rows], atol=1e-5, rtol=0)
    assert len(short) == 4 and max(widths) < p_len // 2


def test_adamw_is_fused_unless_optim_says_otherwise(tmp_path, tok, tiny_model_factory):
    """`optim` (transformers' default `adamw_torch_fused`) picks PyTorch's fused AdamW; `adamw_torch` the per-tensor
    loop; both make the same update."""
    weights = {}
    for optim in ("adamw_torch_fused", "adamw_torch"):
        trainer = ppo_trainer(small_config(tmp_path / optim, optim=optim, num_iterations=1),
                                   tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
        assert bool(trainer.policy_optimizer.defaults["fused"]) == (optim == "adamw_torch_fused")
        assert bool(trainer.value_optimizer.defaults["fused"]) == (optim == "adamw_torch_fused")
        trainer.step()
        weights[optim] = trainer.policy.state_dict()
    for key, value in weights["adamw_torch"].items():
        torch.testing.assert_close(weights["adamw_torch_fused"][key], value, atol=1e-6, rtol=0)


def test_gradient_accumulation_matches_full_mini_batches(tmp_path, tok, tiny_model_factory):
    weights = []
    for micro in (4, 1):
        trainer = ppo_trainer(small_config(tmp_path, micro_batch_size=micro, num_iterations=1),
                                   tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
        trainer.step()
        weights.append(trainer.policy.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-6, rtol=1e-5)


def test_ppo_raises_the_mean_reward(tmp_path, tok, tiny_model_factory):
    """8 iterations of 32 rollouts (4 steps each) on a tiny model: the mean reward of the last two iterations is at
    least 0.05 above the first two's (about 0.06 -> 0.13; a random policy stays near 0.07)."""
    cfg = small_config(tmp_path, num_iterations=8, batch_size=32, mini_batch_size=8, max_new_tokens=8,
                       learning_rate=5e-3, kl_coef=0.01)
    trainer = ppo_trainer(cfg, tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
    history = trainer.train()
    rewards = [m["reward/mean"] for m in history]
    assert sum(rewards[-2:]) / 2 >= sum(rewards[:2]) / 2 + 0.05, rewards
    lines = (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == list(range(1, 9))


def test_lora_policy_uses_its_disabled_adapter_as_reference(tmp_path, tok, tiny_model_factory):
    from peft import LoraConfig

    base = tiny_model_factory()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = ppo_trainer(small_config(tmp_path, learning_rate=1e-2), base, tok, TargetTokenReward(tok),
                               PROMPTS, peft_config=lora)
    assert trainer.ref_model is None
    assert trainer.step()["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # sampling-step log-probs: rounding
    assert abs(trainer.step()["objective/kl"]) > 1e-3
    for key, value in trainer.policy.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, frozen[key.replace(".base_layer", "")]), key  # the base stays pi_0


def test_critic_warmup_trains_the_critic_alone_then_both(tmp_path, tok, tiny_model_factory):
    trainer = ppo_trainer(small_config(tmp_path, critic_warmup_iterations=2, num_iterations=3),
                               tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)

    def snapshot(model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    for iteration in (1, 2):
        policy, critic = snapshot(trainer.policy), snapshot(trainer.value_model)
        m = trainer.step()
        assert m["policy/frozen"] == 1.0 and "policy/grad_norm" not in m
        assert all(torch.equal(v, policy[k]) for k, v in trainer.policy.state_dict().items()), iteration
        assert any(not torch.equal(v, critic[k]) for k, v in trainer.value_model.state_dict().items()), iteration
    # the policy never moved, so the rollouts still sample pi_0
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    policy = snapshot(trainer.policy)
    m = trainer.step()
    assert m["policy/frozen"] == 0.0 and m["policy/grad_norm"] > 0
    assert any(not torch.equal(v, policy[k]) for k, v in trainer.policy.state_dict().items())
    with pytest.raises(ValueError, match="critic_warmup_iterations"):
        small_config(tmp_path, critic_warmup_iterations=-1)


def test_critic_is_initialised_from_the_reward_model(tmp_path, tok, tiny_model_factory):
    torch.manual_seed(3)
    rm = Llama2ForRewardModel(Llama2Config.from_preset("tiny", vocab_size=len(tok))).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    mask = torch.ones_like(ids)
    values = token_values(rm, ids, mask, torch.arange(5)[None])
    # the per-token head read at the last token is the reward model's sequence score
    assert values[0, -1].item() == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    trainer = ppo_trainer(small_config(tmp_path, value_model_init="reward_model"), tiny_model_factory(), tok,
                               RewardModelScorer(rm, tok), PROMPTS)
    assert trainer.value_model is not rm
    for (name, a), b in zip(trainer.value_model.state_dict().items(), rm.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="value_model_init='reward_model' needs a reward"):
        ppo_trainer(small_config(tmp_path, value_model_init="reward_model"), tiny_model_factory(), tok,
                         TargetTokenReward(tok), PROMPTS)


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path, tok, tiny_model_factory):
    reward = TargetTokenReward(tok)
    straight = ppo_trainer(small_config(tmp_path / "a", num_iterations=3), tiny_model_factory(), tok, reward,
                                PROMPTS)
    straight.train()

    first = ppo_trainer(small_config(tmp_path / "b", num_iterations=2, save_steps=2), tiny_model_factory(),
                             tok, reward, PROMPTS)
    first.train()
    assert (tmp_path / "b" / "ppo" / "checkpoint-2" / "trainer_state.pt").exists()
    resumed = ppo_trainer(small_config(tmp_path / "b", num_iterations=3), tiny_model_factory(), tok, reward,
                               PROMPTS)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.iteration == 3 and len(resumed.history) == 3

    def strip(m):
        return {k: v for k, v in m.items() if not k.startswith("time/")}

    assert [strip(m) for m in resumed.history] == [strip(m) for m in straight.history]
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key
    for key, value in straight.value_model.state_dict().items():
        assert torch.equal(value, resumed.value_model.state_dict()[key]), key


def test_bf16_compute_keeps_the_fp32_update_at_the_papers_learning_rate(tmp_path, tok, tiny_model_factory):
    """One PPO optimizer step at lr 1e-6 (paper) on one fixed rollout batch, three ways: float32 weights and compute,
    float32 master weights with bf16 autocast compute (`bf16=True`), and bf16 weights.

    AdamW's first step moves each weight by lr * g / (|g| + eps) plus the decay lr * wd * w, about lr * sign(g).
    bf16 compute perturbs the gradients by about 2^-8 relative, which changes that update only where a gradient is
    near zero (its sign, or its size against eps = 1e-5): the bf16-compute update stays within 5% (relative L2) of
    the float32 one (measured: 2.7%) and moves every weight. bf16 weights cannot hold the step: near a weight of
    0.02 the bf16 spacing is 1.2e-4, so a 1e-6 change rounds away and almost no weight moves (measured: 1.3% of a
    tiny model's)."""
    reward = TargetTokenReward(tok)

    def config(**overrides):
        return small_config(tmp_path, learning_rate=1e-6, batch_size=8, mini_batch_size=8, max_new_tokens=6,
                            num_iterations=1, **overrides)

    maker = ppo_trainer(config(), tiny_model_factory(), tok, reward, PROMPTS)
    rollout, _ = maker._rollout(*maker._next_prompts())
    deltas = {}
    for name, bf16, dtype in (("fp32", False, torch.float32), ("bf16_compute", True, torch.float32),
                              ("bf16_weights", False, torch.bfloat16)):
        trainer = ppo_trainer(config(bf16=bf16, use_cpu=True), tiny_model_factory().to(dtype), tok, reward,
                                   PROMPTS)
        before = {k: p.detach().float().clone() for k, p in trainer.policy.named_parameters()}
        trainer._train_on(rollout)
        deltas[name] = {k: p.detach().float() - before[k] for k, p in trainer.policy.named_parameters()}

    def moved(delta):
        return sum(int((d != 0).sum()) for d in delta.values()) / sum(d.numel() for d in delta.values())

    def distance(a, b):
        return (sum(float((a[k] - b[k]).pow(2).sum()) for k in a) / sum(float(b[k].pow(2).sum()) for k in b)) ** 0.5

    assert moved(deltas["fp32"]) > 0.99 and moved(deltas["bf16_compute"]) > 0.99
    assert distance(deltas["bf16_compute"], deltas["fp32"]) < 0.05
    assert moved(deltas["bf16_weights"]) < 0.1
    assert distance(deltas["bf16_weights"], deltas["fp32"]) > 0.5
