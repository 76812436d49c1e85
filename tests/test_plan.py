"""`llama2-hf plan`: memory per rank of every shipped recipe, the accounting checked by hand, bad input refused.

The FSDP accounting is also checked against the bytes the CPU FSDP2 ranks hold (tests/test_fsdp.py)."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from llama2_hf.cli import main as cli_main
from llama2_hf.configuration_llama2 import Llama2Config
from llama2_hf.errors import UsageError
from llama2_hf.plan import (
    GIB,
    activation_bytes_per_token,
    kv_cache_bytes,
    model_shape,
    peak,
    plan_recipe,
    read_recipe,
    report,
    training_state,
)

RECIPES = sorted(p for p in (REPO_ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")


def test_parameter_counts_of_the_released_sizes_from_meta_models():
    # Llama-2-7b-hf: 6,738,415,616 parameters; 70b: 68,976,648,192 (the checkpoints' safetensors index totals / 2)
    assert model_shape("meta-llama/Llama-2-7b-hf").params == 6_738_415_616
    assert model_shape("out/llama-2-70b-sft").params == 68_976_648_192
    seven = model_shape("meta-llama/Llama-2-7b-hf")
    assert seven.layer_params == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert seven.root_params == 2 * 32000 * 4096 + 4096  # embeddings, head, final norm
    # the reward model: the head is 4096 x 1 instead of 32000 x 4096
    assert model_shape("out/llama-2-7b-rm", reward_head=True).params == 6_738_415_616 - 32000 * 4096 + 4096
    lora = model_shape("x-7b", lora_r=16, targets=["q_proj", "v_proj"])
    assert lora.lora == 32 * 2 * 16 * (4096 + 4096)


def test_training_state_by_strategy_by_hand():
    shape = model_shape("llama-2-7b")
    n = shape.params
    assert training_state(shape, "fsdp", 8) == {"weights": 4 * n / 8, "gradients": 4 * n / 8, "optimizer": 8 * n / 8}
    assert sum(training_state(shape, "zero3", 8).values()) == 16 * n / 8
    assert training_state(shape, "ddp", 8) == {"weights": 4 * n, "gradients": 8 * n, "optimizer": 8 * n}
    qlora = training_state(model_shape("llama-2-7b", lora_r=16, targets=["q_proj"]), "ddp", 1, lora=True,
                           four_bit=True, nested_quant=True)
    # 4-bit linears (0.5 byte + 8-bit absmax per 64 + float32 per 256 blocks), float32 embeddings/head/norms, adapters
    frozen = shape.quantizable * (0.5 + 1 / 64 + 4 / 64 / 256) + 4 * (n - shape.quantizable)
    adapters = 32 * 16 * (4096 + 4096)
    assert qlora == pytest.approx({"weights": frozen + 4 * adapters, "gradients": 4 * adapters,
                                   "optimizer": 8 * adapters})


def test_activation_and_kv_cache_formulas_by_hand():
    shape = model_shape("llama-2-7b")
    h, i = 4096, 11008
    per_layer = 8 * h + 2 * (4 * h + 4 * h) + 2 * (h + 4 * i)
    assert activation_bytes_per_token(shape, False) == 32 * per_layer
    assert activation_bytes_per_token(shape, True) == 32 * 4 * h + per_layer
    # 70B GQA: 8 KV heads of 128; 2 x 80 layers x 1024 x 2 bytes per token per row
    assert kv_cache_bytes(model_shape("llama-2-70b"), rows=3, tokens=100) == 2 * 80 * 1024 * 2 * 3 * 100
    assert kv_cache_bytes(shape, rows=1, tokens=10**6) == kv_cache_bytes(shape, rows=1, tokens=4096)  # the context


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plan_runs_for_every_shipped_recipe(path, capsys):
    assert cli_main(["plan", "--config", str(path), "--num_gpus", "8", "--gpu_memory_gb", "80"]) == 0
    out = capsys.readouterr().out
    assert f"{path}" in out and "verdict:" in out and "ddp" in out and "fsdp" in out and "zero3" in out


def test_ppo_70b_plan_parts(capsys):
    recipe = read_recipe(str(REPO_ROOT / "recipes" / "ppo" / "llama2-70b.yaml"))
    assert recipe.stage == "ppo" and recipe.launcher == "fsdp"
    rollout, update = plan_recipe(recipe, 8, "fsdp")
    lm, rm = model_shape("llama-2-70b"), model_shape("llama-2-70b-rm", reward_head=True)
    # policy (the LM) and critic (a copy of the helpfulness RM) trained, both sharded over 8 ranks
    assert update.parts["weights"] == pytest.approx(4 * (lm.params + rm.params) / 8)
    assert update.parts["optimizer"] == pytest.approx(8 * (lm.params + rm.params) / 8)
    # two float32 reward models on every rank, the float32 reference sharded
    assert update.parts["frozen models"] == pytest.approx(2 * 4 * rm.params + 4 * lm.params / 8)
    # the rollout gathers the full float32 policy; the KV cache of 32 rows x (512 + 512) tokens in bf16
    assert rollout.parts["in flight"] == 4 * lm.params
    assert rollout.parts["kv cache"] == 2 * 80 * 1024 * 2 * 32 * 1024
    text, fits = report(recipe, 8, 80)
    assert not fits and "largest part frozen models" in text  # 2 x 257 GiB of replicated reward models


def test_a_recipe_that_does_not_fit_names_changes_that_do():
    recipe = read_recipe(str(REPO_ROOT / "recipes" / "sft" / "llama2-7b.yaml"))
    assert peak(plan_recipe(recipe, 8, "fsdp")) < 72 * GIB
    text, fits = report(recipe, 1, 80)  # one GPU: full fine-tuning needs 16 bytes x 6.7B parameters
    assert not fits
    assert "LoRA" in text and "QLoRA" in text and "GPUs: peak" in text


def test_plan_of_a_local_model_folder_reads_its_config(tmp_path):
    config = Llama2Config.from_preset("tiny")
    config.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path / 'model'}\nmax_length: 64\nper_device_train_batch_size: 2\n")
    plan = read_recipe(str(recipe), "sft")
    (phase,) = plan_recipe(plan, 1, "ddp")
    shape = model_shape(str(tmp_path / "model"))
    assert shape.params == sum(p.numel() for p in __import__("llama2_hf").Llama2ForCausalLM(config).parameters())
    assert phase.parts["weights"] == 4 * shape.params


def test_other_families_are_sized_as_themselves(tmp_path):
    """Qwen2.5 7B (the `recipes/qwen2.5-7b/` model, its Hub id or a recipe's output folder named after it) counted by
    hand from its published shapes: per layer q/k/v with biases, o, the SwiGLU MLP and two norms; embeddings and an
    untied output head of 152,064 x 3,584; a reward model trades the head for one score row. A folder of another
    family is read with its own config class; a family plan has no shapes for is refused, not sized as Llama 2."""
    h, kv, ffn, vocab, layers = 3584, 4 * 128, 18944, 152064, 28
    per_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h
    assert per_layer * layers == 6_525_618_176  # Qwen2.5-7B's published "non-embedding" 6.53B
    total = per_layer * layers + h + 2 * vocab * h
    assert model_shape("Qwen/Qwen2.5-7B").params == total == 7_615_616_512
    assert model_shape("out/qwen2.5-7b-rm", reward_head=True).params == total - vocab * h + h
    seven = model_shape("Qwen/Qwen2.5-7B-Instruct")
    assert (seven.layers, seven.hidden, seven.kv_width, seven.ffn) == (layers, h, kv, ffn)

    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "mistral")
    assert model_shape(str(tmp_path / "mistral")).params == sum(p.numel() for p in MistralForCausalLM(config).parameters())
    with pytest.raises(UsageError, match=r"mistralai/Mistral-7B-v0.1: plan knows .* not this mistral model"):
        model_shape("mistralai/Mistral-7B-v0.1")


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope.yaml"], "nope.yaml: no such file"),
    (["--config", "recipes/sft/llama2-7b.yaml", "--num_gpus", "0"], "must be > 0"),
    (["--config", "recipes/sft/llama2-7b.yaml", "--gpu_memory_gb", "lots"], "invalid float value: 'lots'"),
    (["--config", "recipes/sft/llama2-7b.yaml", "--headroom", "1.5"], "--headroom is a fraction"),
    (["--config", "recipes/sft/llama2-7b.yaml", "--stage", "convert-meta"], "plan knows the stages"),
    (["--num_gpus", "8"], "the following arguments are required: --config"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert cli_main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("llama2-hf plan: error:")


def test_unknown_recipe_key_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# llama2-hf sft --config r.yaml\nmodel_name_or_path: llama-2-7b\nlearning_rat: 1.0e-05\n")
    assert cli_main(["plan", "--config", str(recipe)]) == 2
    assert "'learning_rat' is not an argument of `llama2-hf sft`; did you mean 'learning_rate'?" in \
        capsys.readouterr().err
