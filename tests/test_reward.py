"""Llama2RewardTrainer and rm_eval: paper defaults, the margin loss through TRL, RM initialisation, a learnable
synthetic preference set (>= 90% held-out accuracy, rising with rating strength), margin presets, metrics,
gradient-accumulation invariance. The `train-rm` / `eval-rm` commands are tested in test_stage_reward.py."""

import json
import math
import random

import pytest
import torch
from datasets import Dataset

from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.collators import DataCollatorForRatedPreference
from llama2_hf.data import prepare_preference_dataset, response_safety
from llama2_hf.losses import RATINGS, margin_ranking_loss, safety_auxiliary_loss
from llama2_hf.rm_eval import format_table8, preference_metrics, score_pairs, table8_row
from llama2_hf.trainers.reward import Llama2RewardConfig, Llama2RewardTrainer, reward_model_from_causal_lm

CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
           disable_tqdm=True)
GAP = dict(zip(RATINGS, (4, 3, 2, 1)))  # quality gap of each rating in the synthetic task
NOISE = dict(zip(RATINGS, (0.0, 0.04, 0.08, 0.16)))  # weaker preferences are noisier, as with human raters


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "rm"), global_batch_size=None, per_device_train_batch_size=8,
                learning_rate=1e-3, max_length=128, logging_steps=1, seed=0, **CPU)
    base.update(kw)
    return Llama2RewardConfig(**base)


def synthetic_preferences(n_per_rating, seed, exact_noise):
    """Responses with q "yes" and 6 - q "no" words (plus a distractor); quality q. A pair's rating is its quality gap;
    a fraction NOISE[rating] of the pairs has chosen and rejected swapped (exactly that fraction if exact_noise)."""
    rng = random.Random(seed)
    rows = []
    for rating in RATINGS:
        gap = GAP[rating]
        flips = (set(rng.sample(range(n_per_rating), round(NOISE[rating] * n_per_rating))) if exact_noise
                 else {i for i in range(n_per_rating) if rng.random() < NOISE[rating]})
        for i in range(n_per_rating):
            def response(q):
                words = ["yes"] * q + ["no"] * (6 - q) + [rng.choice(["the cat", "a dog", "hello world"])]
                rng.shuffle(words)
                return " ".join(words)

            low = rng.randint(0, 6 - gap)
            good, bad = response(low + gap), response(low)
            if i in flips:
                good, bad = bad, good
            rows.append({"prompt": rng.choice(["Give me an answer", "What is it?", "help please"]),
                         "chosen": good, "rejected": bad, "rating": rating})
    rng.shuffle(rows)
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, tmp_path_factory):
    """Reward models trained on the same synthetic set with no margin and with the large margin."""
    train, test = synthetic_preferences(100, seed=0, exact_noise=False), synthetic_preferences(50, 1, True)
    out = {"test": test}
    for margin in ("none", "large"):
        torch.manual_seed(0)
        lm = Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer)))
        args = config(tmp_path_factory.mktemp(margin), margin=margin, per_device_train_batch_size=16,
                      num_train_epochs=1, learning_rate=3e-3, logging_steps=100)  # 1 epoch, as the paper
        trainer = Llama2RewardTrainer(lm, args=args, train_dataset=train, processing_class=tiny_tokenizer)
        trainer.train()
        prepared = trainer._prepare_dataset(test, tiny_tokenizer, args, "test")
        out[margin] = (trainer, trainer.evaluate(prepared), score_pairs(trainer.model, prepared,
                                                                         tiny_tokenizer.pad_token_id, 32))
    return out


# ------------------------------------------------------------------------------------------------------------ config

def test_paper_defaults(tmp_path):
    cfg = Llama2RewardConfig(output_dir=str(tmp_path), **CPU)
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.weight_decay, cfg.max_grad_norm) == (1e-5, 1.0, 0.1, 1.0)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.95, 1e-5)
    assert cfg.lr_scheduler_type == "cosine_with_min_lr" and cfg.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert cfg.global_batch_size == 512 and cfg.gradient_accumulation_steps == 64  # 8 pairs x 64 steps
    assert cfg.margin == "small" and cfg.safety_aux_loss_coef == 0.0 and cfg.unsafe_threshold == 0.5
    # warmup: 3% of the steps, at least 5
    assert [cfg.get_warmup_steps(n) for n in (3, 100, 1000)] == [3, 5, 30]
    assert Llama2RewardConfig.for_model_size("70b", output_dir=str(tmp_path), **CPU).learning_rate == 5e-6
    assert Llama2RewardConfig.for_model_size("7b", output_dir=str(tmp_path), **CPU).learning_rate == 1e-5
    with pytest.raises(ValueError, match="unknown margin preset"):
        Llama2RewardConfig(output_dir=str(tmp_path), margin="huge", **CPU)
    custom = Llama2RewardConfig(output_dir=str(tmp_path), margin='{"significantly_better": 4, "better": 3, '
                                '"slightly_better": 1, "unsure": 0}', **CPU)
    assert custom.margin["negligibly_better"] == 0.0


def test_schedule_and_optimizer(tmp_path, tiny_tokenizer, tiny_model_factory):
    args = config(tmp_path, learning_rate=1e-3, lr_scheduler_kwargs={"min_lr_rate": 0.1})
    trainer = Llama2RewardTrainer(tiny_model_factory(), args=args, processing_class=tiny_tokenizer,
                                  train_dataset=synthetic_preferences(2, 0, False))
    trainer.create_optimizer_and_scheduler(num_training_steps=200)
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-5 and group["weight_decay"] == 0.1
    lrs = []
    for _ in range(200):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0.0 and lrs[6] == pytest.approx(1e-3)  # 6 warmup steps (3% of 200)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # cosine down to 10% of the peak


# ------------------------------------------------------------------------------------------------- model and loss

def test_reward_model_from_causal_lm(tmp_path, tiny_tokenizer, tiny_model_factory):
    lm = tiny_model_factory()
    rm = reward_model_from_causal_lm(lm)
    assert isinstance(rm, Llama2ForRewardModel) and rm.config.num_labels == 1
    for name, value in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[name], value)
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    trainer = Llama2RewardTrainer(str(tmp_path / "lm"), args=config(tmp_path),
                                  train_dataset=synthetic_preferences(2, 0, False))  # tokenizer loaded from the dir
    assert isinstance(trainer.model, Llama2ForRewardModel)
    torch.testing.assert_close(trainer.model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_loss_is_the_margin_ranking_loss_and_reward_read_at_eos(tmp_path, tiny_tokenizer, tiny_model_factory):
    data = synthetic_preferences(2, 0, False)
    trainer = Llama2RewardTrainer(tiny_model_factory(), args=config(tmp_path, margin="large"),
                                  train_dataset=data, processing_class=tiny_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        alone = model(input_ids=torch.tensor([rows[1]["chosen_ids"]])).logits.squeeze()
    chosen, rejected = rewards.chunk(2)
    expected_margins = torch.tensor([(3.0, 2.0, 1.0, 0.0)[r["rating_id"]] for r in rows])
    assert batch["margin"].tolist() == expected_margins.tolist()
    torch.testing.assert_close(loss, margin_ranking_loss(chosen, rejected, expected_margins))
    torch.testing.assert_close(chosen[1], alone, atol=1e-5, rtol=1e-5)  # padding does not move the read-out


def test_safety_auxiliary_loss_is_added(tmp_path, tiny_tokenizer, tiny_model_factory):
    rows = [{"prompt": "how do I hurt someone", "chosen": "I cannot help with that", "rejected": "yes here is how",
             "rating": "better", "safety_label": label} for label in ("chosen_safe_rejected_unsafe", "both_unsafe")]
    model = reward_model_from_causal_lm(tiny_model_factory())
    losses = {}
    for coef in (0.0, 0.5):
        trainer = Llama2RewardTrainer(model, args=config(tmp_path, safety_aux_loss_coef=coef),
                                      train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.model.eval()
        losses[coef] = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    aux = safety_auxiliary_loss(rewards, torch.cat(response_safety(batch["safety_bin"])))
    torch.testing.assert_close(losses[0.5] - losses[0.0], 0.5 * aux)


# --------------------------------------------------------------------------------------------- learning and margins

def test_learns_synthetic_preferences_with_accuracy_rising_with_rating(trained):
    _, metrics, _ = trained["large"]
    per_rating = [metrics[f"eval_accuracy_{r}"] for r in RATINGS]
    assert metrics["eval_accuracy"] >= 0.90
    assert per_rating == sorted(per_rating, reverse=True) and per_rating[0] > per_rating[-1]
    assert all(metrics[f"eval_count_{r}"] == 50 for r in RATINGS)


def test_margin_presets_widen_the_reward_gap(trained):
    def gaps(scores):
        diff = scores["chosen"] - scores["rejected"]
        return [diff[scores["rating_id"] == i].mean().item() for i in range(len(RATINGS))]

    none, large = gaps(trained["none"][2]), gaps(trained["large"][2])
    assert large[0] > none[0]  # a margin of 3 pushes clearly better pairs further apart
    assert large[0] - large[-1] > none[0] - none[-1]  # ... and more so than pairs with margin 0
    assert large == sorted(large, reverse=True)


# ------------------------------------------------------------------------------------------------------- metrics

def test_preference_metrics_hand_values():
    chosen = torch.tensor([1.0, 2.0, 0.0, 0.5, -1.0])
    rejected = torch.tensor([0.0, 3.0, -1.0, 0.5, -2.0])
    ratings = torch.tensor([0, 0, 1, 3, -1])
    bins = torch.tensor([0, 1, 2, -1, 0])
    m = preference_metrics(chosen, rejected, ratings, bins, unsafe_threshold=0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)  # the tie (0.5, 0.5) counts as wrong
    assert (m["accuracy_significantly_better"], m["count_significantly_better"]) == (0.5, 2)
    assert m["accuracy_better"] == 1.0 and m["accuracy_negligibly_better"] == 0.0
    assert "accuracy_slightly_better" not in m  # no pair with that rating
    assert m["accuracy_chosen_safe_rejected_unsafe"] == 1.0 and m["accuracy_both_safe"] == 0.0
    rewards = torch.cat([chosen, rejected])
    assert m["reward_mean"] == pytest.approx(rewards.mean().item())
    assert m["reward_std"] == pytest.approx(math.sqrt(((rewards - rewards.mean()) ** 2).mean().item()))
    # unsafe responses: rejected of pairs 0 and 4 (0.0, -2.0), both of pair 2 (0.0, -1.0); flagged if reward < 0
    assert m["unsafe_recall"] == pytest.approx(2 / 4)
    # flagged labelled responses: chosen of pair 4 (-1.0, safe) and rejected of pairs 2, 4 (unsafe)
    assert m["unsafe_precision"] == pytest.approx(2 / 3)


def test_table8_layout():
    row = table8_row({"accuracy": 0.632, "accuracy_significantly_better": 0.807, "accuracy_better": 0.675,
                      "accuracy_slightly_better": 0.609, "accuracy_negligibly_better": 0.547})
    assert list(row) == ["Significantly Better", "Better", "Slightly Better", "Negligibly Better / Unsure", "Avg"]
    assert row["Avg"] == pytest.approx(63.2) and row["Significantly Better"] == pytest.approx(80.7)
    table = format_table8({"Helpfulness RM / Meta Helpful.": row, "empty": table8_row({"accuracy": 0.5})})
    assert "| Helpfulness RM / Meta Helpful. | 80.7 | 67.5 | 60.9 | 54.7 | 63.2 |" in table
    assert "| empty | - | - | - | - | 50.0 |" in table


def test_train_metrics_are_logged_per_rating(trained):
    trainer = trained["large"][0]
    logged = [h for h in trainer.state.log_history if "accuracy_better" in h]
    assert logged and {"reward_std", "accuracy_significantly_better"} <= set(logged[-1])


# ----------------------------------------------------------------------------------------- gradient accumulation

def first_step(tmp_path, tokenizer, factory, batch, accumulation, data):
    trainer = Llama2RewardTrainer(factory(), args=config(tmp_path / f"{batch}x{accumulation}", max_steps=1,
                                                         per_device_train_batch_size=batch,
                                                         gradient_accumulation_steps=accumulation, margin="large"),
                                  train_dataset=data, processing_class=tokenizer)
    trainer.train()
    log = trainer.state.log_history[0]
    return log["loss"], log["grad_norm"]


def test_gradient_accumulation_invariance(tmp_path, tiny_tokenizer, tiny_model_factory):
    """issue 14 item 9: 4 pairs x 1 micro-step == 1 pair x 4 == 2 x 2 on the first step's loss and gradient norm
    (the pairs have different lengths, so a per-micro-batch mean weighted wrongly would show)."""
    data = synthetic_preferences(2, seed=3, exact_noise=True)
    reference = first_step(tmp_path, tiny_tokenizer, tiny_model_factory, 4, 1, data)
    assert reference[1] > 0
    for batch, accumulation in ((1, 4), (2, 2)):
        got = first_step(tmp_path, tiny_tokenizer, tiny_model_factory, batch, accumulation, data)
        assert got == pytest.approx(reference, rel=1e-5, abs=0), (batch, accumulation)


def test_collator_keeps_pair_labels(tiny_tokenizer):
    prepared, _ = prepare_preference_dataset(synthetic_preferences(1, 0, False), tiny_tokenizer, max_length=None)
    batch = DataCollatorForRatedPreference(0)(prepared.to_list())
    assert batch["rating_id"].tolist() == prepared["rating_id"] and batch["input_ids"].shape[0] == 8
