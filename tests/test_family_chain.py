"""The whole Llama 2-Chat chain for models that are not Llama 2: a tiny Qwen2 (ChatML with generation marks) and a
tiny Mistral (`[INST]` without a system role) go sft -> helpfulness and safety reward models -> rejection-sample ->
ppo -> gatt data -> sft on it -> eval in one process, and every model output loads with the Auto classes in a process
that never imports this package, still its own family (model type, architecture, tokenizer class, chat template). The
same chain for Qwen2 under a 2-process `accelerate launch`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2_hf.runner import RunRecord
from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING, accelerate_launch, preference_rows, write_jsonl
from test_families import checkpoint_tokenizer, family_rows, load_elsewhere, model_of

FAMILIES = {"qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Tokenizer"),
            "mistral": ("MistralForCausalLM", "MistralForSequenceClassification", None)}
INSTRUCTION = "Always answer as a pirate."
SAMPLING = {"max_new_tokens": 6, "prompt_batch_size": 4}
TINY_PPO = {"use_cpu": True, "num_iterations": 1, "batch_size": 4, "mini_batch_size": 2, "save_steps": 0,
            "report_to": [], "max_new_tokens": 6, "prompt_batch_size": 4}


def checkpoint(root: Path, family: str) -> Path:
    """A saved tiny base checkpoint of `family` with its tokenizer (as the family's own tokenizer class reads it)."""
    folder = root / family
    tokenizer = checkpoint_tokenizer(family, folder)
    model_of(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_chain_data")
    prompts = [{"id": f"p{i}", "prompt": f"What is {i} plus {i + 1}?", "is_safety_prompt": i % 4 == 0}
               for i in range(8)]
    dialogues = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                               {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                               {"role": "user", "content": "And minus one?"}]} for i in range(4)]
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (root / "mmlu" / "dev" / "astronomy_dev.csv").write_text(header + "".join(f"q{i}?,a,b,c,d,0\n" for i in range(5)))
    (root / "mmlu" / "test" / "astronomy_test.csv").write_text(
        header + "What is the sun?,a star,a planet,a moon,a comet,0\nWhat is the moon?,a star,a satellite,a comet,b,1\n")
    return {"sft": write_jsonl(root / "sft.jsonl", family_rows(16)),
            "prefs": write_jsonl(root / "prefs.jsonl", preference_rows(12)),
            "safety": write_jsonl(root / "safety.jsonl", [{**r, "is_safety_prompt": True, "safety_label": "both_safe"}
                                                          for r in preference_rows(12, seed=1)]),
            "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "dialogues": write_jsonl(root / "dialogues.jsonl", dialogues), "eval_data": root}


def run_chain(family: str, base: Path, data: dict, out: Path, stage) -> None:
    """The chain through `stage(name, **fields)`: in this process, or one `accelerate launch` per stage."""
    stage("sft", model_name_or_path=base, train_file=[data["sft"]], output_dir=out / "sft", **TINY_TRAINING)
    for kind, mix in (("helpfulness", "prefs"), ("safety", "safety")):
        stage("train-rm", model_name_or_path=out / "sft", train_file=[data[mix]], output_dir=out / f"rm_{kind}",
              **TINY_TRAINING)
    rms = {"helpfulness_reward_model": out / "rm_helpfulness", "safety_reward_model": out / "rm_safety",
           "reward_batch_size": 4}
    stage("rejection-sample", model_name_or_path=out / "sft", prompts_file=[data["prompts"]], num_samples=2,
          select_unfinished=True, output_dir=out / "rs", **rms, **SAMPLING, **TINY_TRAINING)
    stage("ppo", model_name_or_path=out / "rs", prompts_file=[data["prompts"]], output_dir=out / "ppo", **rms,
          **TINY_PPO)
    stage("gatt", model_name_or_path=out / "ppo", dialogues_file=[data["dialogues"]], instructions=[INSTRUCTION],
          output_dir=out / "gatt", **SAMPLING)
    stage("sft", model_name_or_path=out / "ppo", train_file=[out / "gatt"], train_on="last", on_invalid="drop",
          output_dir=out / "chat", **TINY_TRAINING)
    stage("eval", model_name_or_path=out / "chat", tasks=["mmlu"], mmlu_subjects=["astronomy"], mmlu_num_fewshot=1,
          limit=2, batch_size=2, data_dir=data["eval_data"], progress=False, output_dir=out / "eval")


def check_chain(family: str, base: Path, out: Path) -> None:
    lm, rm, tokenizer_class = FAMILIES[family]
    links = {"rm_helpfulness": "sft", "rm_safety": "sft", "rs": "sft", "ppo": "rs", "gatt": "ppo", "chat": "ppo",
             "eval": "chat"}
    for name, source in links.items():
        assert RunRecord.read(out / name).args["model_name_or_path"] == str(out / source), name
    gatt_rows = [json.loads(line) for line in (out / "gatt" / "gatt.jsonl").read_text().splitlines()]
    assert len(gatt_rows) == 4
    for row in gatt_rows:  # the instruction as a system message: `sft` puts it where the template has room for it
        assert row["messages"][0] == {"role": "system", "content": INSTRUCTION}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert "mmlu" in results["results"]
    # (kind, model folder, tokenizer folder): the critic's folder holds weights only, the policy's its tokenizer
    outputs = [("lm", out / "sft"), ("rm", out / "rm_safety"), ("lm", out / "rs"), ("lm", out / "ppo"),
               ("rm", out / "ppo" / "value_model", out / "ppo"), ("lm", out / "chat")]
    seen = load_elsewhere(outputs)
    template = json.loads((base / "tokenizer_config.json").read_text()).get("chat_template") or \
        (base / "chat_template.jinja").read_text()
    for kind, path, *_ in outputs:
        info = seen[str(path)]
        assert info["model_type"] == family, path
        assert info["class"] == (rm if kind == "rm" else lm), path
        assert info["template"] == template, path
        if tokenizer_class:
            assert info["tokenizer"] == tokenizer_class, path
        assert "Llama2" not in info["tokenizer"], path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_chain_in_one_process(family, data, tmp_path):
    base = checkpoint(tmp_path, family)
    out = tmp_path / "out"
    run_chain(family, base, data, out, lambda name, **fields: run_stage(
        name, **{k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                 for k, v in fields.items()}))
    check_chain(family, base, out)


def _argv(fields: dict) -> list[str]:
    argv = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list) and not value:
            argv += [f"--{key}", "none"] if key == "report_to" else []
            continue
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


@pytest.mark.slow
def test_the_chain_under_two_processes(data, tmp_path):
    base = checkpoint(tmp_path, "qwen2")
    out = tmp_path / "out"

    def launch(name, **fields):
        proc = accelerate_launch([name, *_argv(fields)], num_processes=2, timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-4000:]}"
        assert RunRecord.read(fields["output_dir"]).world_size == 2, name

    run_chain("qwen2", base, data, out, launch)
    check_chain("qwen2", base, out)
