"""Llama2SFTTrainer: paper defaults, answer-only loss, packed == padded, gradient-accumulation invariance, learning,
policies, LoRA (the `sft` command: test_stage_sft.py)."""

import json
import math

import pytest
import torch
from datasets import Dataset

from llama2_hf.trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
           disable_tqdm=True)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_length=128, global_batch_size=None,
                per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, seed=0, **CPU)
    base.update(kw)
    return Llama2SFTConfig(**base)


def chats(n=12):
    rows = []
    for a in range(n):
        turns = [{"role": "user", "content": f"What is {a} plus {a + 1}?"},
                 {"role": "assistant", "content": f"{a} plus {a + 1} equals {2 * a + 1}." + " yes" * (a % 5)}]
        if a % 3 == 0:
            turns += [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome"}]
        rows.append({"messages": turns})
    return Dataset.from_list(rows)


def test_paper_defaults(tmp_path):
    cfg = Llama2SFTConfig(output_dir=str(tmp_path), **CPU)
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.weight_decay) == (2e-5, "cosine", 0.1)
    assert (cfg.num_train_epochs, cfg.max_length, cfg.packing, cfg.train_on) == (2.0, 4096, True, "all")
    # batch 64 rows = 8 per device x 8 accumulation steps on one process
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.global_batch_size) == (8, 8, 64)


@pytest.mark.parametrize("kw, match", [
    (dict(global_batch_size=60), "not a multiple"),
    (dict(global_batch_size=64, gradient_accumulation_steps=2), "contradicts global_batch_size"),
    (dict(assistant_only_loss=True), "train_on"),
    (dict(packing_strategy="bfd"), "packing_strategy must be one of"),
    (dict(train_on="first"), "train_on must be"),
    (dict(on_invalid="skip"), "on_invalid must be one of"),
    (dict(packing=False, eval_packing=True), "eval_packing=True needs packing=True"),
])
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Llama2SFTConfig(output_dir=str(tmp_path), **{**CPU, **kw})


def test_packed_and_padded_training_match(tmp_path, tiny_tokenizer, tiny_model_factory):
    """One optimizer step on the same examples: same loss, same updated parameters, packed or padded."""
    results = {}
    for packing in (True, False):
        model = tiny_model_factory(seed=1).train()
        trainer = Llama2SFTTrainer(model, args=config(tmp_path, packing=packing, per_device_train_batch_size=16,
                                                      max_steps=1),
                                   train_dataset=chats(), processing_class=tiny_tokenizer)
        n_rows = len(trainer.train_dataset)
        trainer.train()
        results[packing] = (trainer.state.log_history[0]["loss"], n_rows,
                            {k: v.detach().clone() for k, v in model.named_parameters()})
    (loss_packed, rows_packed, params_packed), (loss_padded, rows_padded, params_padded) = results[True], results[False]
    assert rows_padded == 12 and rows_packed < rows_padded  # really packed
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for name, value in params_packed.items():
        torch.testing.assert_close(value, params_padded[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_gradient_accumulation_invariance(tmp_path, tiny_tokenizer, tiny_model_factory, packing):
    """issue 14 item 9: 4 rows x 1 micro-step == 1 row x 4 == 2 x 2 on the first step's loss and gradient norm. The
    rows have different numbers of answer tokens, so averaging per micro-batch instead of per token would show."""
    results = {}
    for batch, accumulation in ((4, 1), (1, 4), (2, 2)):
        trainer = Llama2SFTTrainer(tiny_model_factory(seed=1).train(),
                                   args=config(tmp_path / f"{batch}x{accumulation}", packing=packing, max_length=64,
                                               per_device_train_batch_size=batch, max_steps=1,
                                               gradient_accumulation_steps=accumulation),
                                   train_dataset=chats(), processing_class=tiny_tokenizer)
        assert len(trainer.train_dataset) >= 4
        trainer.train()
        log = trainer.state.log_history[0]
        results[batch, accumulation] = (log["loss"], log["grad_norm"])
    reference = results[4, 1]
    assert reference[1] > 0
    for key in ((1, 4), (2, 2)):
        assert results[key] == pytest.approx(reference, rel=1e-5, abs=0), key


def test_training_lowers_loss_and_updates_every_parameter(tmp_path, tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=2).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Llama2SFTTrainer(model, args=config(tmp_path, max_steps=24, learning_rate=3e-3),
                               train_dataset=chats(), processing_class=tiny_tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == []


def test_train_on_last_and_bad_input_policies(tmp_path, tiny_tokenizer, tiny_model_factory):
    bad = chats(4).to_list()
    bad[2]["messages"] = bad[2]["messages"][:1]  # ends with the user: no answer
    with pytest.raises(ValueError, match="row 2, field 'messages': must end with a 'assistant' message"):
        Llama2SFTTrainer(tiny_model_factory(), args=config(tmp_path), train_dataset=Dataset.from_list(bad),
                         processing_class=tiny_tokenizer)
    trainer = Llama2SFTTrainer(tiny_model_factory(), args=config(tmp_path, packing=False, train_on="last",
                                                                 on_invalid="drop"),
                               train_dataset=Dataset.from_list(bad), processing_class=tiny_tokenizer)
    report = trainer.data_reports["train"]
    assert (report.total, report.kept, dict(report.dropped)) == (4, 3, {"bad_roles": 1})
    labels = trainer.train_dataset[0]["labels"]  # row 0 has two turns: only the last answer is trained
    trained = [t for t in labels if t != -100]
    assert tiny_tokenizer.decode(trained[:-1]) == "you are welcome "


def test_lora_trains_only_adapters(tmp_path, tiny_tokenizer, tiny_model_factory):
    from peft import LoraConfig

    model = tiny_model_factory(seed=3)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Llama2SFTTrainer(model, args=config(tmp_path, max_steps=2),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                               train_dataset=chats(), processing_class=tiny_tokenizer)
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert changed and all("lora_" in k for k in changed)
    merged = trainer.model.merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, base["model.embed_tokens.weight"])
    q_proj = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, base["model.layers.0.self_attn.q_proj.weight"])


def test_qlora_from_a_path(tmp_path, tiny_tokenizer, tiny_model_factory):
    """QLoRA: the base model loaded in 4-bit from a path (bitsandbytes on CPU), LoRA adapters trained."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    tiny_model_factory().save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    trainer = Llama2SFTTrainer(str(tmp_path / "base"), args=config(tmp_path, max_steps=2), train_dataset=chats(),
                               quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    lora_b = q_proj.lora_B["default"].weight.detach().clone()  # LoRA B starts at zero
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert not torch.equal(q_proj.lora_B["default"].weight, lora_b)


def test_separator_token_format_trains_with_exact_answer_labels(tmp_path, tiny_tokenizer, tiny_model_factory):
    """sft_format='separator_token' (paper §3.1): the token is added to the tokenizer, the embeddings grow by one row,
    labels are -100 up to and including the separator and the answer ids + EOS after it; training runs and the
    separator survives a save/load round trip. The default stays Meta's format."""
    import copy

    from llama2_hf import Llama2ForCausalLM, Llama2Tokenizer

    assert Llama2SFTConfig(output_dir=str(tmp_path), **CPU).sft_format == "llama2_chat"
    tok = copy.deepcopy(tiny_tokenizer)  # the session tokenizer must keep its vocabulary
    n_vocab = len(tok)
    model = tiny_model_factory(seed=4).train()
    trainer = Llama2SFTTrainer(model, args=config(tmp_path, packing=False, max_steps=3, sft_format="separator_token"),
                               train_dataset=chats(3), processing_class=tok)
    sep = tok.convert_tokens_to_ids("<sep>")
    assert (sep, len(tok), model.get_input_embeddings().num_embeddings) == (n_vocab, n_vocab + 1, n_vocab + 1)
    assert model.lm_head.weight.shape[0] == n_vocab + 1
    row = trainer.train_dataset[1]  # "What is 1 plus 2?" -> "1 plus 2 equals 3. yes"
    bare = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    prompt, answer = [tok.bos_token_id] + bare("What is 1 plus 2?") + [sep], bare("1 plus 2 equals 3. yes") + [2]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [-100] * len(prompt) + answer
    before = model.get_input_embeddings().weight[sep].detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(model.get_input_embeddings().weight[sep], before)  # the separator's embedding is trained
    trainer.save_model(str(tmp_path / "saved"))
    tok.save_pretrained(str(tmp_path / "saved"))
    reloaded = Llama2Tokenizer.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.convert_tokens_to_ids("<sep>") == sep
    assert Llama2ForCausalLM.from_pretrained(str(tmp_path / "saved")).config.vocab_size == n_vocab + 1
    with pytest.raises(ValueError, match="sft_format must be"):
        Llama2SFTConfig(output_dir=str(tmp_path), sft_format="sep", **CPU)
