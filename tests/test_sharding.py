"""What `accelerate launch` with the sharding recipes gives the Trainer-based stages on CPU.

accelerate 1.15 turns an FSDP config into FSDP only on accelerator devices (a CPU launch is MULTI_CPU and the Trainer
would wrap the whole model in DDP on every rank), so the SFT and reward trainers apply the config themselves with
FSDP2 (`llama2_hf.distributed`). The launch test checks that each rank really holds about half of the parameters,
that training matches a 1-process run with the same global batch, and that the saved folder is a normal full model.
DeepSpeed ZeRO-3 needs CUDA or its CPU accelerator with oneCCL: only the recipe is checked.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO_ROOT, accelerate_launch
from llama2_hf.runner import RunRecord
from llama2_hf.stages import run_stage

RECIPES = REPO_ROOT / "recipes" / "accelerate"

# 2 processes x 2 rows = 1 process x 2 rows x 2 accumulation steps: the same global batch of 4 rows per step.
# The recipe's `mixed_precision: bf16` reaches the Trainer as bf16 autocast over fp32 weights: the 1-process
# reference computes in bf16 too.
SFT_ARGS = {"max_steps": 2, "per_device_train_batch_size": 2, "global_batch_size": 4, "max_length": 64,
            "logging_steps": 1, "save_strategy": "steps", "save_steps": 1, "learning_rate": 1e-3, "bf16": True}


def _argv(fields: dict) -> list[str]:
    argv = []
    for key, value in fields.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def _losses(record: RunRecord) -> list[float]:
    return [h["loss"] for h in record.metrics["log_history"] if "loss" in h]


def _relative_distance(weights: dict, reference: dict, initial: dict) -> float:
    """|update - reference update| / |reference update| over all tensors."""
    diff = sum(((weights[k] - reference[k]).double() ** 2).sum() for k in initial)
    norm = sum(((reference[k] - initial[k]).double() ** 2).sum() for k in initial)
    return float((diff / norm) ** 0.5)


def test_sft_fsdp_recipe_shards_on_two_cpu_processes(stage_inputs, tmp_path):
    from safetensors.torch import load_file

    from llama2_hf import Llama2ForCausalLM

    fields = {"model_name_or_path": stage_inputs["policy"], "train_file": [stage_inputs["sft"]],
              "use_cpu": True, "report_to": "none", "disable_tqdm": True, **SFT_ARGS}
    reference = run_stage("sft", **{**fields, "output_dir": str(tmp_path / "one"), "report_to": [],
                                    "model_name_or_path": str(stage_inputs["policy"]),
                                    "train_file": [str(stage_inputs["sft"])]})
    assert reference.metrics["distributed"]["sharding"] == "none"

    out = tmp_path / "fsdp"
    proc = accelerate_launch(["sft", *_argv({**fields, "output_dir": out})], config_file=RECIPES / "fsdp.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    memory = record.metrics["distributed"]
    assert record.world_size == 2 and memory["sharding"] == "fsdp2" and memory["world_size"] == 2
    assert memory["param_bytes_full"] == reference.metrics["distributed"]["param_bytes_full"]
    assert len(memory["param_bytes_per_rank"]) == 2
    for local in memory["param_bytes_per_rank"]:
        assert local <= 0.6 * memory["param_bytes_full"], memory  # DDP would hold 1.0x on each rank
    assert sum(memory["param_bytes_per_rank"]) == memory["param_bytes_full"]  # every byte on exactly one rank

    losses, expected = _losses(record), _losses(reference)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Same rows, same initial weights, same precision: the first step's loss is the 1-process loss up to reduction order.
    assert losses[0] == pytest.approx(expected[0], rel=1e-4)
    assert losses[1] == pytest.approx(expected[1], rel=1e-3)  # after one optimizer step on reduce-scattered grads

    # save_model wrote a normal full folder on rank 0: it loads, and it is the trained model
    model = Llama2ForCausalLM.from_pretrained(out)
    initial = load_file(stage_inputs["policy"] / "model.safetensors")
    trained = {k: v for k, v in model.state_dict().items() if k in initial}
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial if "norm" not in k)
    single = load_file(tmp_path / "one" / "model.safetensors")
    fsdp = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in fsdp.items()} == {k: v.shape for k, v in single.items()}
    assert all(v.dtype == torch.float32 for v in fsdp.values())  # bf16 compute, fp32 master weights
    # Two AdamW steps from the same start: the update equals the 1-process update (Adam divides by sqrt(v) + 1e-5,
    # so near-zero gradients amplify reduction-order noise element-wise; the whole update agrees to 2 %).
    assert _relative_distance(fsdp, single, initial) < 0.02

    # saved under the model's own class: its code and auto_map, not torch's FSDP wrapper class and sources
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama2.Llama2ForCausalLM"
    assert (out / "modeling_llama2.py").is_file() and not list(out.glob("_fsdp*.py"))

    # Trainer checkpoints hold the full weights and the full optimizer state (keyed by parameter name)
    optim = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    exp_avg = optim["state"]["model.embed_tokens.weight"]["exp_avg"]
    assert exp_avg.shape == initial["model.embed_tokens.weight"].shape
    assert load_file(out / "checkpoint-1" / "model.safetensors").keys() == single.keys()


def test_train_rm_fsdp_recipe_shards_on_two_cpu_processes(stage_inputs, tmp_path):
    """The reward trainer under the same recipe: sharded, the same first-step loss as one process, evaluation over
    the sharded model, a full reward-model folder saved. It starts from a reward-model folder, so both runs start
    from the same head."""
    from safetensors.torch import load_file

    from llama2_hf import Llama2ForRewardModel

    fields = {"model_name_or_path": str(stage_inputs["helpfulness_rm"]), "train_file": [str(stage_inputs["prefs"])],
              "eval_file": [str(stage_inputs["prefs"])], "use_cpu": True, "disable_tqdm": True,
              **SFT_ARGS, "save_strategy": "no", "max_length": 128}
    reference = run_stage("train-rm", **{**fields, "output_dir": str(tmp_path / "one"), "report_to": []})
    out = tmp_path / "fsdp"
    proc = accelerate_launch(["train-rm", *_argv({**fields, "output_dir": out, "report_to": "none"})],
                             config_file=RECIPES / "fsdp.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    memory = record.metrics["distributed"]
    assert memory["sharding"] == "fsdp2" and len(memory["param_bytes_per_rank"]) == 2
    assert all(local <= 0.6 * memory["param_bytes_full"] for local in memory["param_bytes_per_rank"]), memory
    losses, expected = _losses(record), _losses(reference)
    assert losses[0] == pytest.approx(expected[0], rel=1e-4)
    assert record.metrics["eval"]["eval_count_better"] == 6  # every eval pair scored once across the ranks
    assert record.metrics["eval"]["eval_loss"] == pytest.approx(reference.metrics["eval"]["eval_loss"], rel=1e-3)

    model = Llama2ForRewardModel.from_pretrained(out)
    initial = load_file(stage_inputs["helpfulness_rm"] / "model.safetensors")
    assert not torch.equal(model.score.weight, initial["score.weight"])
    assert _relative_distance(load_file(out / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors"),
                              initial) < 0.02


def test_fsdp_settings_are_read_from_the_launch_environment(monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` exports on a CPU launch (MULTI_CPU) is turned back into
    accelerate's plugin; one process, or a launch without FSDP, gives None."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llama2_hf.distributed import fsdp_plugin

    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
                       "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "Llama2DecoderLayer"}.items():
        monkeypatch.setenv(key, value)
    cpu = SimpleNamespace(num_processes=2, state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    plugin = fsdp_plugin(cpu)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["Llama2DecoderLayer"]
    assert fsdp_plugin(SimpleNamespace(num_processes=1, state=cpu.state)) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin(cpu) is None


def test_shard_model_names_the_missing_layer_class(tiny_model_factory):
    from types import SimpleNamespace

    from llama2_hf.distributed import shard_model

    plugin = SimpleNamespace(fsdp_version=2, transformer_cls_names_to_wrap=["GPT2Block"], reshard_after_forward=True)
    with pytest.raises(ValueError, match=r"no module of \['GPT2Block'\] in Llama2ForCausalLM"):
        shard_model(tiny_model_factory(), plugin)


def test_fsdp_recipe_parses_as_fsdp2_per_decoder_layer():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(RECIPES / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Llama2DecoderLayer"
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the next stage loads a plain folder


def test_deepspeed_recipe_selects_zero3():
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    config = load_config_from_file(str(RECIPES / "deepspeed_zero3.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True
    # accelerate's plugin built from those fields carries stage 3 into the DeepSpeed config it hands the engine
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], zero3_init_flag=ds["zero3_init_flag"],
                             zero3_save_16bit_model=ds["zero3_save_16bit_model"],
                             offload_optimizer_device=ds["offload_optimizer_device"],
                             offload_param_device=ds["offload_param_device"])
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert sys.modules["deepspeed"].__version__
