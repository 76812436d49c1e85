"""Any transformers chat model in `eval`, `push` and LoRA training: a tiny Qwen2 (ChatML) and a tiny Mistral
(`[INST]` without a system role) are evaluated on every task with their own tokenizer class and chat template, get a
model card that describes their stage and family without Llama 2's license, tags or remote code, and train LoRA
adapters on their family's attention projections (peft's per-family default) that peft loads back."""

from __future__ import annotations

import json

import pytest
import torch

from llama2_hf.chat_format import chat_format_for
from llama2_hf.cli import main as cli
from llama2_hf.errors import UsageError
from llama2_hf.evaluation.base import ensure_pad_token, format_context
from llama2_hf.evaluation.prompts import chat_prompt
from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING
from test_eval_tasks import tiny_classifier  # noqa: F401  (fixture)
from test_families import checkpoints, tokenizer_of  # noqa: F401  (fixture)

SYSTEM = "You are a careful assistant."
TASK_PROMPT = "Q: What is the capital of France?\nA: Paris.\n\nQ: Why is the sky blue?"


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,adds_bos", [("qwen2", False), ("mistral", False), ("mistral", True)])
def test_chat_contexts_are_the_chat_formats_prompt_ids(family, adds_bos):
    """A chat-variant context encodes (as the engine encodes it, special tokens on) to exactly the chat format's
    generation-prompt ids: the system prompt in its role (Qwen2) or merged into the user turn (Mistral), BOS once even
    when the tokenizer adds it itself. Without chat the context is the plain few-shot text."""
    tokenizer = tokenizer_of(family)
    if adds_bos:
        tokenizer.add_bos_token = True
        assert tokenizer.encode("a")[0] == tokenizer.bos_token_id
    chat_format = chat_format_for(tokenizer)
    for system in (None, SYSTEM):
        context = format_context(TASK_PROMPT, True, system, tokenizer)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": TASK_PROMPT}]
        assert tokenizer.encode(context) == chat_format.prompt_ids(messages)
        assert "[INST]" not in context if family == "qwen2" else "<<SYS>>" not in context
    if family == "qwen2":
        assert format_context(TASK_PROMPT, True, SYSTEM, tokenizer) == (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{TASK_PROMPT}<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert format_context(TASK_PROMPT, False, None, tokenizer) == TASK_PROMPT


def test_llama2_chat_context_is_unchanged(tiny_tokenizer):
    assert format_context(TASK_PROMPT, True, SYSTEM, tiny_tokenizer) == chat_prompt(TASK_PROMPT, SYSTEM)
    assert format_context(TASK_PROMPT, True, None, None) == chat_prompt(TASK_PROMPT)


def test_chat_without_a_template_is_one_line():
    tokenizer = tokenizer_of("qwen2")
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="it has no chat template") as e:
        format_context(TASK_PROMPT, True, None, tokenizer)
    assert "\n" not in str(e.value)


def test_pad_token_without_unk_is_eos():
    tokenizer = tokenizer_of("qwen2")  # no unk token
    assert tokenizer.pad_token is None and tokenizer.unk_token is None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    mistral = tokenizer_of("mistral")
    ensure_pad_token(mistral)
    assert mistral.pad_token == "<unk>"  # evaluation's rule: UNK first, as lm-eval
    bare = tokenizer_of("qwen2")
    bare.eos_token = None
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        ensure_pad_token(bare)


@pytest.mark.parametrize("family,tokenizer_class", [("qwen2", "Qwen2Tokenizer"), ("mistral", "TokenizersBackend")])
def test_eval_cli_runs_every_task_on_a_family(checkpoints, shared_data, tiny_classifier, tmp_path,  # noqa: F811
                                             monkeypatch, family, tokenizer_class):
    """`llama2-hf eval` on a tiny Qwen2 / Mistral checkpoint: MMLU and GSM8K as plain few-shot text, TruthfulQA and
    ToxiGen in the model's own chat format with a system prompt; judges of another family; exit 0."""
    import llama2_hf.stages.evaluate as stage

    seen = {}
    real = stage._tokenizer

    def spy(name_or_path):
        seen["tokenizer"] = real(name_or_path)
        return seen["tokenizer"]

    monkeypatch.setattr(stage, "_tokenizer", spy)
    classifier, _, _ = tiny_classifier
    out = tmp_path / "eval"
    code = cli(["eval", "--model_name_or_path", str(checkpoints[family]), "--output_dir", str(out),
                "--tasks", "mmlu", "gsm8k", "truthfulqa", "toxigen", "--data_dir", str(shared_data), "--limit", "1",
                "--mmlu_subjects", "anatomy", "--gsm8k_max_new_tokens", "4", "--truthfulqa_max_new_tokens", "4",
                "--toxigen_max_new_tokens", "4", "--toxigen_groups", "asian", "--truth_judge",
                str(checkpoints["mistral"]), "--info_judge", str(checkpoints["qwen2"]), "--toxigen_classifier",
                str(classifier), "--chat_tasks", "truthfulqa", "toxigen", "--system_prompt", SYSTEM,
                "--batch_size", "2", "--progress", "false", "--use_cpu", "true"])
    assert code == 0
    tokenizer = seen["tokenizer"]
    assert type(tokenizer).__name__ == tokenizer_class and tokenizer.pad_token is not None
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"mmlu", "gsm8k", "truthfulqa", "toxigen"}
    rows = [json.loads(line) for line in (out / "results.samples.jsonl").read_text().splitlines()]
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    gsm8k = by_task["gsm8k"][0]["prompt"]
    assert gsm8k.startswith("Q: ") and "<|im_start|>" not in gsm8k and "[INST]" not in gsm8k  # base protocol
    head, tail = {"qwen2": (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n", "<|im_start|>assistant\n"),
                  "mistral": (f"<s>[INST] {SYSTEM}\n\n", " [/INST]")}[family]
    chat_rows = [r for r in by_task["truthfulqa"] if r["part"] == "generation"] + by_task["toxigen"]
    assert len(chat_rows) == 2
    for row in chat_rows:  # the chat variants: one user turn of the family's template, the system prompt in it
        assert row["prompt"].startswith(head) and row["prompt"].endswith(tail)
    assert 0 <= report["results"]["toxigen"]["toxic_mean"] <= 1


def test_eval_tokenizer_is_the_checkpoints_own_class(checkpoints, stage_inputs):  # noqa: F811
    """A Llama-architecture checkpoint with its own template is read by AutoTokenizer (not as Llama 2); a Llama 2
    checkpoint keeps `Llama2Tokenizer` with UNK as pad."""
    from llama2_hf import Llama2Tokenizer
    from llama2_hf.evaluation.base import load_tokenizer

    llama = load_tokenizer(str(checkpoints["llama"]))
    assert not isinstance(llama, Llama2Tokenizer) and "<|assistant|>" in llama.chat_template
    llama2 = load_tokenizer(str(stage_inputs["policy"]))
    assert isinstance(llama2, Llama2Tokenizer) and llama2.pad_token == llama2.unk_token


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------

def test_lora_targets_per_family(checkpoints, stage_inputs, tmp_path):  # noqa: F811
    from trl import ModelConfig

    from llama2_hf.stages.common import LLAMA2_LORA_TARGET_MODULES, peft_config

    assert peft_config(ModelConfig(model_name_or_path=str(checkpoints["qwen2"]))) is None  # use_peft off
    llama2 = peft_config(ModelConfig(model_name_or_path=str(stage_inputs["policy"]), use_peft=True))
    assert llama2.target_modules == set(LLAMA2_LORA_TARGET_MODULES)
    qwen = peft_config(ModelConfig(model_name_or_path=str(checkpoints["qwen2"]), use_peft=True))
    assert qwen.target_modules is None  # peft's per-family default, applied when it wraps the model
    given = peft_config(ModelConfig(model_name_or_path=str(stage_inputs["policy"]), use_peft=True,
                                    lora_target_modules=["q_proj", "k_proj"]))
    assert given.target_modules == {"q_proj", "k_proj"}  # given: kept
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_family"}))
    with pytest.raises(UsageError, match="lora_target_modules: unset, and peft has no default for model_type "
                                         "'my_family'"):
        peft_config(ModelConfig(model_name_or_path=str(tmp_path), use_peft=True))


@pytest.fixture(scope="module")
def lora_outputs(checkpoints, tmp_path_factory):  # noqa: F811
    """`sft --use_peft` (no lora_target_modules) on each family, run once."""
    root = tmp_path_factory.mktemp("lora")
    for family in ("qwen2", "mistral"):
        run_stage("sft", model_name_or_path=str(checkpoints[family]), train_file=[str(checkpoints["sft"])],
                  output_dir=str(root / family), use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2,
                  **TINY_TRAINING)
    return root


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sft_lora_adapts_the_family_attention_and_loads_with_peft(checkpoints, lora_outputs, family):  # noqa: F811
    from peft import PeftModel
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = lora_outputs / family
    adapter = json.loads((out / "adapter_config.json").read_text())
    expected = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family])
    assert set(adapter["target_modules"]) == expected == {"q_proj", "v_proj"}
    weights = load_file(out / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_" in k}
    assert adapted == expected and all(".self_attn." in k for k in weights)
    trained_b = [v for k, v in weights.items() if "lora_B" in k]
    assert trained_b and all(v.abs().sum() > 0 for v in trained_b)  # B starts at zero: the adapters trained
    base = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(loaded) == len(trained_b)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain)  # the adapter changes the outputs


# ---------------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------------

def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


LLAMA2_MARKS = ("llama2", "llama-2", "custom_code")
QWEN_SFT_RUN = {"stage": "sft", "args": {"learning_rate": 2e-5, "model_name_or_path": "Qwen/Qwen2.5-7B",
                                         "train_file": ["data/sft.jsonl"]},
                "inputs": {"train_0": {"path": "data/sft.jsonl", "sha256": "ab" * 32},
                           "model": {"path": "Qwen/Qwen2.5-7B", "hub": True}},
                "outputs": {"model": "."}, "metrics": {"train_loss": 1.25}, "versions": {}}

RELOAD_PLAIN = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("alice/qwen-sft")
tokenizer = AutoTokenizer.from_pretrained("alice/qwen-sft")
assert "llama2_hf" not in sys.modules
print(json.dumps([type(model).__name__, type(tokenizer).__name__]))
"""


def test_push_of_another_family_has_its_own_card_and_no_remote_code(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """A Qwen2 SFT folder pushed to the fake Hub: uploaded as it is (no *_llama2.py, no auto_map), a card naming the
    stage, the Qwen2 family and the base model from the run record, no Llama 2 license or tags; a fresh process
    without llama2_hf loads it with transformers' own classes, no trust_remote_code."""
    import shutil
    import subprocess
    import sys

    from fake_hub import FakeHub, hub_env, subprocess_env

    folder = tmp_path / "qwen-sft"
    shutil.copytree(checkpoints["qwen2"], folder)
    (folder / "run.json").write_text(json.dumps(QWEN_SFT_RUN))
    with FakeHub() as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        assert cli(["push", "--model_name_or_path", str(folder), "--repo_id", "alice/qwen-sft", "--hub_token",
                    hub.token]) == 0
        files = hub.files("alice/qwen-sft")
        assert not any(name.endswith("_llama2.py") or name == "fused_linear_ce.py" for name in files)
        for name in ("config.json", "tokenizer_config.json"):
            assert files[name] == (folder / name).read_bytes() and b"auto_map" not in files[name]
        card = files["README.md"].decode()
        meta = _front_matter(card)
        assert "license" not in meta and meta["base_model"] == "Qwen/Qwen2.5-7B"
        assert {"llama2_hf", "qwen2", "sft"} <= set(meta["tags"]) and not set(LLAMA2_MARKS) & set(meta["tags"])
        assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
        assert "This is a Qwen2 model after supervised fine-tuning" in card
        assert "- **Base model family:** Qwen2 (`model_type: qwen2`), base model `Qwen/Qwen2.5-7B`" in card
        assert "trust_remote_code" not in card and "LLAMA 2 Community License" not in card
        assert "derives from `Qwen/Qwen2.5-7B`, whose license applies" in card
        assert 'AutoModelForCausalLM.from_pretrained("alice/qwen-sft")' in card
        env = subprocess_env(hub, tmp_path / "fresh_home")
        env["PYTHONPATH"] = ""
        done = subprocess.run([sys.executable, "-c", RELOAD_PLAIN], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == ["Qwen2ForCausalLM", "Qwen2Tokenizer"]


def test_family_adapter_and_tokenizer_cards_and_no_remote_code(checkpoints, lora_outputs, tmp_path):  # noqa: F811
    from llama2_hf.hub import build_model_card, collect_upload, family_of, remote_code_fixes

    for folder in (checkpoints["qwen2"], checkpoints["mistral"], checkpoints["llama"], lora_outputs / "mistral"):
        assert remote_code_fixes(folder) == {}
    files = collect_upload(lora_outputs / "mistral", "alice/mistral-lora")
    assert "adapter_model.safetensors" in files and not any(n.endswith("_llama2.py") for n in files)
    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "license" not in meta
    assert {"lora", "sft", "mistral"} <= set(meta["tags"]) and not set(LLAMA2_MARKS) & set(meta["tags"])
    assert "This is a Mistral model after supervised fine-tuning" in card and "(r=4, alpha=8)" in card
    assert "trust_remote_code=True" not in card and "derives from a Mistral base model" in card
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(checkpoints["qwen2"]).save_pretrained(tmp_path / "tok")
    card = build_model_card(tmp_path / "tok", "alice/qwen-tok")
    assert "This is the tokenizer of a Qwen2 model, with its chat template" in card
    assert "license" not in _front_matter(card) and "trust_remote_code" not in card
    # A transformers Llama with its own template is a Llama card; one whose base is Llama 2 keeps Llama 2's.
    assert family_of(checkpoints["llama"]).llama2 is False and family_of(checkpoints["llama"]).name == "Llama"
    assert family_of(checkpoints["llama"], base_model="meta-llama/Llama-2-7b-hf").llama2 is True
    card = build_model_card(checkpoints["llama"], "alice/llama", stage="sft", base_model="meta-llama/Llama-2-7b-hf")
    assert _front_matter(card)["license"] == "llama2"
