"""Llama2PPOTrainer: paper defaults, first-step invariants, learning, LoRA reference, critic, checkpoint/resume, CLI."""

import json

import pytest
import torch

from llama2_hf import Llama2Config, Llama2ForRewardModel
from llama2_hf.rewards import RewardModelScorer
from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer, main, token_values
from tests.conftest import TargetTokenReward, write_rlhf_cli_inputs

PROMPTS = [{"prompt": f"say the magic words, number {i}", "is_safety": i % 4 == 0} for i in range(32)]


def small_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "ppo"), num_iterations=2, batch_size=8, mini_batch_size=4,
                max_new_tokens=4, learning_rate=1e-3, value_model_init="policy", save_steps=0)
    return Llama2PPOConfig(**{**base, **overrides})


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


def test_first_iteration_has_zero_kl_and_unit_ratio(tmp_path, tok, tiny_model_factory):
    trainer = Llama2PPOTrainer(small_config(tmp_path), tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    m = trainer.step()
    assert m["objective/kl"] == 0.0  # policy == pi_0 before the first update
    assert m["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    for key in ("reward/mean", "objective/entropy", "value/loss", "policy/clipfrac", "response/length_mean",
                "time/generation", "time/scoring", "time/training"):
        assert key in m
    changed = [k for k, v in trainer.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every policy parameter moved
    m = trainer.step()
    assert m["objective/kl"] != 0.0  # the policy has moved away from pi_0
    assert m["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)  # rollouts are on-policy


def test_gradient_accumulation_matches_full_mini_batches(tmp_path, tok, tiny_model_factory):
    weights = []
    for micro in (4, 1):
        trainer = Llama2PPOTrainer(small_config(tmp_path, micro_batch_size=micro, num_iterations=1),
                                   tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
        trainer.step()
        weights.append(trainer.policy.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-6, rtol=1e-5)


def test_ppo_raises_the_mean_reward(tmp_path, tok, tiny_model_factory):
    """8 iterations of 32 rollouts (4 steps each) on a tiny model: the mean reward of the last two iterations is at
    least 0.08 above the first iteration's (about 0.035 -> 0.2)."""
    cfg = small_config(tmp_path, num_iterations=8, batch_size=32, mini_batch_size=8, max_new_tokens=8,
                       learning_rate=5e-3, kl_coef=0.01)
    trainer = Llama2PPOTrainer(cfg, tiny_model_factory(), tok, TargetTokenReward(tok), PROMPTS)
    history = trainer.train()
    rewards = [m["reward/mean"] for m in history]
    assert sum(rewards[-2:]) / 2 >= rewards[0] + 0.08, rewards
    lines = (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == list(range(1, 9))


def test_lora_policy_uses_its_disabled_adapter_as_reference(tmp_path, tok, tiny_model_factory):
    from peft import LoraConfig

    base = tiny_model_factory()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = Llama2PPOTrainer(small_config(tmp_path, learning_rate=1e-2), base, tok, TargetTokenReward(tok),
                               PROMPTS, peft_config=lora)
    assert trainer.ref_model is None
    assert trainer.step()["objective/kl"] == 0.0
    assert trainer.step()["objective/kl"] != 0.0
    for key, value in trainer.policy.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, frozen[key.replace(".base_layer", "")]), key  # the base stays pi_0


def test_critic_is_initialised_from_the_reward_model(tmp_path, tok, tiny_model_factory):
    torch.manual_seed(3)
    rm = Llama2ForRewardModel(Llama2Config.from_preset("tiny", vocab_size=len(tok))).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    mask = torch.ones_like(ids)
    values = token_values(rm, ids, mask, torch.arange(5)[None])
    # the per-token head read at the last token is the reward model's sequence score
    assert values[0, -1].item() == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    trainer = Llama2PPOTrainer(small_config(tmp_path, value_model_init="reward_model"), tiny_model_factory(), tok,
                               RewardModelScorer(rm, tok), PROMPTS)
    assert trainer.value_model is not rm
    for (name, a), b in zip(trainer.value_model.state_dict().items(), rm.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="value_model_init='reward_model' needs a reward"):
        Llama2PPOTrainer(small_config(tmp_path, value_model_init="reward_model"), tiny_model_factory(), tok,
                         TargetTokenReward(tok), PROMPTS)


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path, tok, tiny_model_factory):
    reward = TargetTokenReward(tok)
    straight = Llama2PPOTrainer(small_config(tmp_path / "a", num_iterations=3), tiny_model_factory(), tok, reward,
                                PROMPTS)
    straight.train()

    first = Llama2PPOTrainer(small_config(tmp_path / "b", num_iterations=2, save_steps=2), tiny_model_factory(),
                             tok, reward, PROMPTS)
    first.train()
    assert (tmp_path / "b" / "ppo" / "checkpoint-2" / "trainer_state.pt").exists()
    resumed = Llama2PPOTrainer(small_config(tmp_path / "b", num_iterations=3), tiny_model_factory(), tok, reward,
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


def test_cli_runs_and_resumes(tmp_path, tok, tiny_model_factory):
    argv = write_rlhf_cli_inputs(tmp_path, tok, tiny_model_factory(), PROMPTS[:8])
    argv += ["--batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "4", "--save-steps", "1",
             "--model-size", "70b"]
    assert main(argv + ["--num-iterations", "1"]) == 0
    assert main(argv + ["--num-iterations", "2", "--resume", "latest"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    assert {"reward/helpfulness", "reward/safety", "reward/used_safety"} <= set(lines[0])
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["ppo"]["kl_coef"] == 0.005
    assert (tmp_path / "out" / "value_model" / "config.json").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def _fsdp_ppo_worker(rank: int, world: int, port: int, tok, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from llama2_hf import Llama2ForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = Llama2Config.from_preset("tiny", vocab_size=len(tok))
    policy, ref, critic = Llama2ForCausalLM(cfg), Llama2ForCausalLM(cfg), Llama2ForRewardModel(cfg)
    ref.load_state_dict(policy.state_dict())
    before = policy.lm_head.weight.detach().clone()
    for model in (policy, ref, critic):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    config = Llama2PPOConfig(output_dir=out, num_iterations=2, batch_size=8, mini_batch_size=4, max_new_tokens=4,
                             learning_rate=1e-3, save_steps=0)
    trainer = Llama2PPOTrainer(config, policy, tok, TargetTokenReward(tok), PROMPTS, value_model=critic,
                               ref_model=ref)
    history = trainer.train()
    moved = not torch.equal(policy.lm_head.weight.full_tensor(), before)
    if rank == 0:
        torch.save({"kl": [m["objective/kl"] for m in history], "moved": moved,
                    "ratio": [m["policy/ratio_first_minibatch"] for m in history]}, os.path.join(out, "r.pt"))
    dist.destroy_process_group()


def test_ppo_under_fsdp2_on_two_ranks(tmp_path, tok):
    """Two gloo ranks with FSDP2-sharded policy, reference and critic: rollouts gather the full weights once, each rank
    takes half the batch, gradients are reduced by FSDP; the first-step invariants hold."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_ppo_worker, args=(2, port, tok, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    result = torch.load(tmp_path / "r.pt", weights_only=True)
    assert result["kl"][0] == 0.0 and result["kl"][1] != 0.0
    assert result["ratio"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result["moved"]
