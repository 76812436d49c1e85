"""The typed call of a stage (`Stage.call`): instances of its own dataclasses in any order, the missing ones at their
defaults, a foreign one refused; `with_fields` sets fields of configs built once. `llama2-hf <stage>` and
`stages.run_stage` reach `main` through it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llama2_hf import runner
from llama2_hf.errors import UsageError
from llama2_hf.records import RunRecord
from llama2_hf.runner import Stage, with_fields


@dataclass
class Data:
    train_file: list[str] = field(default_factory=list)


@dataclass
class Training:
    output_dir: str = ""
    learning_rate: float = 1e-3

    def __post_init__(self):
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")


@dataclass
class Other:
    x: int = 0


def recording_stage(calls: list) -> Stage:
    def main(data: Data, training: Training) -> RunRecord:
        calls.append((data, training, runner._REDO.get()))
        return RunRecord(stage="toy", args={}, inputs={}, outputs={}, metrics={}, versions={})

    return Stage("toy", "a stage of two dataclasses", (Data, Training), main)


def test_call_takes_instances_in_any_order_and_defaults_the_missing_ones():
    calls: list = []
    stage = recording_stage(calls)
    record = stage.call(Training(output_dir="out"), Data(train_file=["t.jsonl"]))
    assert record.stage == "toy"
    assert calls[-1] == (Data(train_file=["t.jsonl"]), Training(output_dir="out"), False)
    stage.call(Training(output_dir="out"))
    assert calls[-1][:2] == (Data(), Training(output_dir="out"))  # the missing one at its defaults
    stage.call(redo=True)
    assert calls[-1] == (Data(), Training(), True)  # the redo choice reaches the run's bookkeeping
    assert runner._REDO.get() is False  # and ends with the call


def test_call_refuses_an_instance_of_another_type():
    stage = recording_stage([])
    with pytest.raises(TypeError, match=r"stage 'toy' takes instances of Data, Training, got a Other"):
        stage.call(Data(), Other())
    with pytest.raises(TypeError, match=r"takes instances of Data, Training, got a dict"):
        stage.call({"train_file": ["t.jsonl"]})
    with pytest.raises(TypeError, match=r"got the class Training"):
        stage.call(Training)
    with pytest.raises(TypeError, match=r"stage 'toy': two instances of Data"):
        stage.call(Data(), Data())


def test_with_fields_sets_fields_on_their_own_instances():
    configs = (Data(train_file=["a"]), Training(output_dir="x", learning_rate=0.5))
    wired = with_fields(configs, output_dir="v1/rm", train_file=["b"])
    assert wired == (Data(train_file=["b"]), Training(output_dir="v1/rm", learning_rate=0.5))
    assert configs == (Data(train_file=["a"]), Training(output_dir="x", learning_rate=0.5))  # untouched
    kept = Other(3)
    assert with_fields((kept, Training()), output_dir="o")[0] is kept  # an instance without those fields is kept
    with pytest.raises(ValueError, match="learning_rate must be >= 0"):  # the instance's own checks run again
        with_fields(configs, learning_rate=-1.0)


def test_with_fields_refuses_an_unknown_name_with_the_closest_one():
    with pytest.raises(UsageError, match=r"'output_dri' is not a field of Data, Training; did you mean 'output_dir'"):
        with_fields((Data(), Training()), output_dri="o")
    with pytest.raises(UsageError, match=r"'zzz' is not a field of Data, Training$"):
        with_fields((Data(), Training()), zzz=1)


def test_run_stage_and_the_command_line_go_through_the_typed_call(monkeypatch, tmp_path):
    from llama2_hf.stages import cli_main, run_stage
    from llama2_hf.stages.reward_eval import RewardEvalArguments

    seen = []

    def call(self, *instances, redo=False):
        seen.append((self.name, instances, redo))
        return None

    monkeypatch.setattr(Stage, "call", call)
    run_stage("eval-rm", model_name_or_path="m", name="helpfulness RM", output_dir=str(tmp_path), redo=True)
    name, instances, redo = seen[-1]
    assert name == "eval-rm" and redo is True
    assert instances[0].name == "helpfulness RM" and instances[1].model_name_or_path == "m"
    assert cli_main("eval-rm", ["--model_name_or_path", "m", "--name", "safety RM", "--output_dir", str(tmp_path),
                                "--redo"]) == 0
    name, instances, redo = seen[-1]
    assert redo is True and isinstance(instances[0], RewardEvalArguments) and instances[0].name == "safety RM"


def test_eval_rm_is_called_with_its_name_field(stage_inputs, tmp_path):
    """eval-rm's `name` field is a field like any other in a typed call (keyword routing once collided with it)."""
    from trl import ModelConfig

    from llama2_hf.stages.reward_eval import STAGE, RewardEvalArguments

    configs = (RewardEvalArguments(eval_file=[str(stage_inputs["prefs"])], use_cpu=True, eval_batch_size=8),
               ModelConfig())
    wired = with_fields(configs, model_name_or_path=str(stage_inputs["helpfulness_rm"]),
                        output_dir=str(tmp_path / "e"), name="helpfulness RM before v1")
    record = STAGE.call(*reversed(wired))
    assert record.stage == "eval-rm" and record.args["name"] == "helpfulness RM before v1"
    assert record.args["model_name_or_path"] == str(stage_inputs["helpfulness_rm"])
    assert RunRecord.read(tmp_path / "e").args == record.args
    assert STAGE.call(*wired).seconds == record.seconds  # the same typed call again: the finished run's record
    assert configs[0].output_dir == "" and configs[1].model_name_or_path is None  # configs built once stay as built


# ----------------------------------------------------------------------------------- the RLHF loop's typed configs

TINY_PPO = {"use_cpu": True, "batch_size": 4, "mini_batch_size": 4, "num_iterations": 1}
TINY_ROLLOUT = {"prompt_batch_size": 4, "max_new_tokens": 4, "temperature": 1.3}
PPO_FOLDERS = {"model_name_or_path": "v1/rs", "prompts_file": ["v1/pairs/prompts.jsonl"], "output_dir": "v1/ppo",
               "helpfulness_reward_model": "v1/rm_helpfulness", "safety_reward_model": None}


def test_the_loop_takes_field_values_or_typed_configs_alike(tmp_path):
    from llama2_hf.iterate import IterateConfig
    from llama2_hf.records import resolved_args
    from llama2_hf.stages.common import RewardArguments
    from llama2_hf.stages.rlhf_loop import _Loop
    from llama2_hf.trainers.ppo_config import Llama2PPOConfig, PPOSampling

    config = IterateConfig(output_dir=str(tmp_path), seed=7)
    by_values = _Loop(config, None, {"ppo": {**TINY_PPO, **TINY_ROLLOUT, "reward_batch_size": 16}})
    typed = _Loop(config, None, {"ppo": (RewardArguments(reward_batch_size=16), Llama2PPOConfig(**TINY_PPO),
                                         PPOSampling(**TINY_ROLLOUT))})
    assert typed.configs["ppo"][1].seed == 7  # left at its default: the loop's seed, as for field values
    calls = [with_fields(loop.stage_configs("ppo"), **PPO_FOLDERS) for loop in (by_values, typed)]
    assert resolved_args(*calls[0]) == resolved_args(*calls[1])  # the same call either way
    assert typed.settings["ppo"]["temperature"] == 1.3 and "output_dir" not in typed.settings["ppo"]
    assert by_values.settings["ppo"] == {**TINY_PPO, **TINY_ROLLOUT, "reward_batch_size": 16, "seed": 7}  # as given
    assert _Loop(config, None, {"ppo": Llama2PPOConfig(**TINY_PPO, seed=3)}).configs["ppo"][1].seed == 3


def test_the_loop_refuses_typed_configs_that_set_a_wired_field_or_meet_a_recipe(tmp_path):
    from llama2_hf.iterate import IterateConfig
    from llama2_hf.stages.rlhf_loop import _Loop
    from llama2_hf.stages.reward_eval import RewardEvalArguments
    from llama2_hf.trainers.ppo_config import Llama2PPOConfig

    config = IterateConfig(output_dir=str(tmp_path))
    with pytest.raises(UsageError, match=r"ppo settings: \['output_dir'\] are set by the loop"):
        _Loop(config, None, {"ppo": (Llama2PPOConfig(**TINY_PPO, output_dir="elsewhere"),)})
    with pytest.raises(UsageError, match=r"eval-rm settings: \['name'\] are set by the loop"):
        _Loop(config, None, {"eval-rm": (RewardEvalArguments(name="mine"),)})
    with pytest.raises(TypeError, match=r"stage 'ppo' takes instances of PPOArguments, Llama2PPOConfig"):
        _Loop(config, None, {"ppo": (RewardEvalArguments(),)})
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text("num_iterations: 2\n")
    with pytest.raises(UsageError, match=r"ppo settings: typed configs and the recipe .*ppo.yaml both given"):
        _Loop(IterateConfig(output_dir=str(tmp_path), ppo_recipe=str(recipe)), None,
              {"ppo": (Llama2PPOConfig(**TINY_PPO),)})
    loop = _Loop(config, None, {"eval-rm": (RewardEvalArguments(eval_batch_size=4),)})
    configs = with_fields(loop.stage_configs("eval-rm"), name="helpfulness RM after v1", output_dir="o")
    assert configs[0].name == "helpfulness RM after v1" and configs[0].eval_batch_size == 4
