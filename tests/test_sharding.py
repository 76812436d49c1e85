"""What `accelerate launch` with the sharding recipes really gives the Trainer-based stages on CPU.

accelerate 1.15 turns an FSDP config into FSDP only on accelerator devices: `AcceleratorState.__init__`
(accelerate/state.py) switches `distributed_type` to FSDP inside a branch taken for MULTI_GPU / MLU / SDAA / MUSA /
NPU / XPU / HPU / NEURON, and a CPU launch is MULTI_CPU, so the `fsdp_plugin` the Trainer builds is dropped and the
model is wrapped in DistributedDataParallel, without a warning, although `accelerate launch` exported
ACCELERATE_USE_FSDP=true. The first test pins that behaviour (every rank holds the whole model), so a future accelerate
that shards on CPU shows up here. Sharded training on CPU is exercised with torch's `fully_shard` directly
(tests/test_fsdp.py). DeepSpeed ZeRO-3 needs CUDA or its CPU accelerator with oneCCL: only the recipe is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port

RECIPES = REPO_ROOT / "recipes" / "accelerate"


def test_fsdp_recipe_on_cpu_falls_back_to_ddp(tmp_path):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([accelerate, "launch", "--config_file", str(RECIPES / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(free_port()), str(REPO_ROOT / "tests" / "scripts" /
                                                                        "trainer_sharding_probe.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["accelerate_use_fsdp_env"] == "true"  # the launcher asked
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and not rank["trainer_fsdp"]
        assert rank["wrapper"] == "DistributedDataParallel"
        assert rank["local_bytes"] == rank["full_bytes"]  # not sharded: a sharded rank would hold <= 0.6x


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
