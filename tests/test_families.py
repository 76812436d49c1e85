"""Any transformers chat model in the training stages: a tiny Qwen2 (ChatML with generation marks) and a tiny Mistral
(`[INST]` without a system role, answers found by rendering prefixes) go through `sft`, `train-rm` and `eval-rm` and
come out as themselves (model type, architecture, tokenizer class, chat template), loadable without this package; a
plain transformers Llama with its own template stays `model_type: llama`. The answer masks equal a hand computation,
and the SFT loss of the Qwen model equals TRL's `SFTTrainer` with `assistant_only_loss=True` on the same rows."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset

from llama2_hf.data import prepare_sft_dataset
from llama2_hf.errors import UsageError
from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING, preference_rows, write_jsonl
from test_chat_format import CHATML_MARKED, MISTRAL, pieces, trained_tokenizer

# A Zephyr-style template of a Llama-architecture chat model (not Llama 2's layout), no generation marks.
ZEPHYR = ("{%- for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}")

SYSTEM = {"role": "system", "content": "you are a helpful assistant."}
DIALOG = [{"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
          {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello friend."}]


def family_rows(n: int) -> list[dict]:
    """SFT rows: single and multi-turn dialogues, every third with a system message."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        messages = [{"role": "user", "content": f"what is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 2:
            messages += [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "hello friend."}]
        rows.append({"messages": ([SYSTEM] if i % 3 == 0 else []) + messages})
    return rows


def tokenizer_of(family: str):
    if family == "qwen2":
        return trained_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_MARKED, eos_token="<|im_end|>")
    if family == "mistral":
        return trained_tokenizer(["<unk>", "<s>", "</s>"], MISTRAL, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    return trained_tokenizer(["<unk>", "<s>", "</s>"], ZEPHYR, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def checkpoint_tokenizer(family: str, folder):
    """`tokenizer_of(family)` as a checkpoint folder of that family reads it back: AutoTokenizer reads any qwen2 folder
    with Qwen2Tokenizer whatever tokenizer_class says (its own pre-tokenizer, pad <|endoftext|>), so the Qwen2
    tokenizer is saved beside a qwen2 config and read back; the others are returned as trained."""
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = tokenizer_of(family)
    if family != "qwen2":
        return tokenizer
    tokenizer.save_pretrained(folder)
    Qwen2Config().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    return tokenizer


def model_of(family: str, tokenizer, seed: int = 0, **overrides):
    """A tiny random causal LM of `family` over `tokenizer` (`overrides`: config fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    cls, config_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig),
                       "llama": (LlamaForCausalLM, LlamaConfig)}[family]
    torch.manual_seed(seed)
    values = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return cls(config_cls(**{**values, **overrides}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved tiny checkpoint (model + tokenizer) of each family, and the data files."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("qwen2", "mistral", "llama"):
        tokenizer = checkpoint_tokenizer(family, root / family)
        model_of(family, tokenizer).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    out["sft"] = write_jsonl(root / "sft.jsonl", family_rows(16))
    out["prefs"] = write_jsonl(root / "prefs.jsonl", preference_rows(12))
    return out


def test_loading_keeps_the_family(checkpoints):
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification
    from trl import ModelConfig

    from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel, Llama2Tokenizer
    from llama2_hf.stages.common import load_model, load_tokenizer

    tokenizer = load_tokenizer(checkpoints["qwen2"])
    assert not isinstance(tokenizer, Llama2Tokenizer) and tokenizer.chat_template == CHATML_MARKED
    assert tokenizer.pad_token == "<|endoftext|>" and type(tokenizer).__name__ == "Qwen2Tokenizer"
    mistral = load_tokenizer(checkpoints["mistral"])
    assert mistral.pad_token == mistral.eos_token == "</s>"  # no pad token: EOS, as TRL
    args = ModelConfig(model_name_or_path=str(checkpoints["qwen2"]))
    assert type(load_model(Llama2ForCausalLM, args, role="policy")) is Qwen2ForCausalLM
    rm = load_model(Llama2ForRewardModel, args, role="reward model", new_head=True)
    assert type(rm) is Qwen2ForSequenceClassification and rm.config.num_labels == 1
    with pytest.raises(UsageError, match="reward model .*: not a checkpoint of Qwen2ForSequenceClassification: "
                                         r"1 weights .* are missing from it \(score.weight\)"):
        load_model(Llama2ForRewardModel, args, role="reward model", trainable=False)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_answer_masks_equal_a_hand_computation(checkpoints, family):
    from llama2_hf.stages.common import load_tokenizer

    tokenizer = load_tokenizer(checkpoints[family])
    rows = [{"messages": [SYSTEM, *DIALOG]}]
    got = prepare_sft_dataset(Dataset.from_list(rows), tokenizer, max_length=None)[0][0]
    got_last = prepare_sft_dataset(Dataset.from_list(rows), tokenizer, max_length=None, train_on="last")[0][0]
    if family == "qwen2":  # the answer and its <|im_end|> are trained; the newline after it is not
        parts = [("<|im_start|>system\n" + SYSTEM["content"] + "<|im_end|>\n", 0),
                 ("<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n", 0),
                 ("2 plus 3 is 5.<|im_end|>", 1), ("\n", 0),
                 ("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", 0),
                 ("hello friend.<|im_end|>", 1), ("\n", 0)]
    else:  # no system role: the system text opens the first user turn; the answer and its </s> are trained
        parts = [("<s>[INST] " + SYSTEM["content"] + "\n\nwhat is 2 plus 3? [/INST]", 0), ("2 plus 3 is 5.</s>", 1),
                 ("[INST] hello there [/INST]", 0), ("hello friend.</s>", 1)]
    ids, mask = pieces(tokenizer, parts)
    assert got["input_ids"] == ids
    assert got["labels"] == [t if m else -100 for t, m in zip(ids, mask)]
    final = max(k for k, (_, flag) in enumerate(parts) if flag)  # train_on="last": the final answer only
    _, last = pieces(tokenizer, [(text, int(k == final)) for k, (text, _) in enumerate(parts)])
    assert got_last["labels"] == [t if m else -100 for t, m in zip(ids, last)]


def test_qwen_sft_loss_equals_trl_assistant_only_loss(checkpoints, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from llama2_hf.stages.common import load_tokenizer
    from llama2_hf.trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

    rows = family_rows(4)
    common = {"use_cpu": True, "report_to": [], "bf16": False, "per_device_train_batch_size": 4,
              "max_length": 256, "disable_tqdm": True}
    model = model_of("qwen2", load_tokenizer(checkpoints["qwen2"]))
    ours = Llama2SFTTrainer(copy.deepcopy(model), args=Llama2SFTConfig(
        output_dir=str(tmp_path / "ours"), packing=False, global_batch_size=None, activation_checkpointing=False,
        **common), train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(checkpoints["qwen2"]))
    trl = SFTTrainer(copy.deepcopy(model), args=SFTConfig(
        output_dir=str(tmp_path / "trl"), packing=False, assistant_only_loss=True, gradient_checkpointing=False,
        **common), train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(checkpoints["qwen2"]))
    assert ours.train_dataset["input_ids"] == trl.train_dataset["input_ids"]
    losses = []
    for trainer in (ours, trl):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    out = {}
    for kind, path, tokenizer_path in json.loads(sys.argv[1]):
        cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
        model, tokenizer = cls.from_pretrained(path), AutoTokenizer.from_pretrained(tokenizer_path)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "hi"}], tokenize=True,
                                            return_dict=True)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits
        out[path] = {"class": type(model).__name__, "model_type": model.config.model_type,
                     "tokenizer": type(tokenizer).__name__, "template": tokenizer.chat_template,
                     "shape": list(logits.shape)}
    assert "llama2_hf" not in sys.modules
    print(json.dumps(out))
""")


def load_elsewhere(outputs) -> dict:
    """Load each (kind, model folder[, tokenizer folder]) with the Auto classes (kind "lm": a causal LM, else a
    sequence classifier) in a process that never imports llama2_hf, and run it on a chat; per model folder: its
    class, model type, tokenizer class, chat template and logits shape."""
    entries = [[str(o[0]), str(o[1]), str(o[2] if len(o) > 2 else o[1])] for o in outputs]
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, json.dumps(entries)], capture_output=True,
                          text=True, env=env, cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family,lm,rm", [("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
                                          ("mistral", "MistralForCausalLM", "MistralForSequenceClassification")])
def test_sft_train_rm_eval_rm_keep_the_family(checkpoints, tmp_path, family, lm, rm):
    from transformers import AutoTokenizer

    from llama2_hf.loading import load_pretrained
    from llama2_hf.modeling_llama2 import Llama2ForRewardModel
    from llama2_hf.rewards import RewardModelScorer

    source = checkpoints[family]
    template = AutoTokenizer.from_pretrained(source).chat_template
    tokenizer_class = json.loads((source / "tokenizer_config.json").read_text())["tokenizer_class"]
    run_stage("sft", model_name_or_path=str(source), train_file=[str(checkpoints["sft"])],
              output_dir=str(tmp_path / "sft"), **TINY_TRAINING)
    run_stage("train-rm", model_name_or_path=str(tmp_path / "sft"), train_file=[str(checkpoints["prefs"])],
              eval_file=[str(checkpoints["prefs"])], output_dir=str(tmp_path / "rm"), **TINY_TRAINING)
    record = run_stage("eval-rm", model_name_or_path=str(tmp_path / "rm"), eval_file=[str(checkpoints["prefs"])],
                       output_dir=str(tmp_path / "eval"), use_cpu=True)
    assert 0 <= record.metrics["accuracy"] <= 1
    for stage, arch in (("sft", lm), ("rm", rm)):
        config = json.loads((tmp_path / stage / "config.json").read_text())
        assert config["model_type"] == family and config["architectures"] == [arch] and "auto_map" not in config
        tok_config = json.loads((tmp_path / stage / "tokenizer_config.json").read_text())
        assert tok_config["tokenizer_class"] == tokenizer_class
        assert AutoTokenizer.from_pretrained(tmp_path / stage).chat_template == template
    rm_config = json.loads((tmp_path / "rm" / "config.json").read_text())
    rm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert rm_config["num_labels"] == 1 if "num_labels" in rm_config else len(rm_config["id2label"]) == 1
    assert rm_config["pad_token_id"] == rm_tokenizer.pad_token_id
    # The pad never ends a dialogue (Mistral's answers end with EOS), so the head reads the last real token: a pair
    # scores the same alone and padded in a batch with a longer one.
    assert rm_tokenizer.pad_token == ("<|endoftext|>" if family == "qwen2" else "<unk>")
    model = load_pretrained(Llama2ForRewardModel, str(tmp_path / "rm"), "reward model")
    scorer = RewardModelScorer(model, rm_tokenizer, batch_size=2)
    prompts, responses = ["what is 2 plus 3?", "hello"], ["5.", "hello there friend, the cat sat on the mat."]
    together = scorer.raw_scores(prompts, responses)
    alone = torch.cat([scorer.raw_scores([p], [r]) for p, r in zip(prompts, responses)])
    assert torch.allclose(together, alone, atol=1e-5)
    loaded = load_elsewhere([("lm", str(tmp_path / "sft")), ("rm", str(tmp_path / "rm"))])
    assert loaded[str(tmp_path / "sft")]["class"] == lm and loaded[str(tmp_path / "rm")]["class"] == rm
    assert loaded[str(tmp_path / "rm")]["shape"][-1] == 1


def test_plain_llama_with_its_own_template_stays_llama(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    run_stage("sft", model_name_or_path=str(checkpoints["llama"]), train_file=[str(checkpoints["sft"])],
              output_dir=str(tmp_path / "sft"), **TINY_TRAINING)
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert tokenizer.chat_template == ZEPHYR and type(tokenizer).__name__ != "Llama2Tokenizer"


def test_a_template_that_marks_no_answer_is_one_line(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    tokenizer.chat_template = "{%- for m in messages %}{%- if m['role'] == 'user' %}{{ m['content'] }}{% endif %}" \
                              "{%- endfor %}"
    model_of("qwen2", tokenizer).save_pretrained(tmp_path / "silent")
    tokenizer.save_pretrained(tmp_path / "silent")
    with pytest.raises(UsageError, match="marks no answer tokens"):
        run_stage("sft", model_name_or_path=str(tmp_path / "silent"), train_file=[str(checkpoints["sft"])],
                  output_dir=str(tmp_path / "sft"), **TINY_TRAINING)


def test_a_checkpoint_that_needs_its_own_code_is_refused_in_one_line(checkpoints, tmp_path):
    from trl import ModelConfig

    from llama2_hf import Llama2ForCausalLM
    from llama2_hf.stages.common import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_family", "auto_map": {
        "AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyForCausalLM"}}))
    (tmp_path / "configuration_mine.py").write_text("from transformers import PretrainedConfig\n\n\n"
                                                    "class MyConfig(PretrainedConfig):\n    model_type = 'my_family'\n")
    with pytest.raises(UsageError, match=r"policy .*: it needs code shipped with the checkpoint \(trust_remote_code"):
        load_model(Llama2ForCausalLM, ModelConfig(model_name_or_path=str(tmp_path)), role="policy")
