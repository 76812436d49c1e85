"""Shared fixtures: offline environment, the real data in ../shared/data, a tiny tokenizer and tiny models."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

# Nothing in the tests may wait on the network (ECOSYSTEM_NOTES: offline flags; remote code lands in HF_HOME).
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
               # Threads that busy-wait make tiny models 10x slower on a shared 2-core machine.
               "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

from llama2_hf import Llama2Config, Llama2ForRewardModel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLAMA2_HF_DATA", REPO_ROOT.parent / "shared" / "data"))
LLAMA2_TOKENIZER_MODEL = SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"

# Tiny models are dominated by per-op overhead: one thread is faster, and several test processes share the cores.
torch.set_num_threads(1)


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A small English-like corpus with digits, punctuation and chat tags, enough to train a ~512-piece BPE."""
    rng = random.Random(seed)
    words = ("the a an assistant user answer question model helpful safe sorry cannot help with that please "
             "what is how many apples does have give me write poem about cat dog sun moon tennis french napoleon "
             "yes no plus minus equals number hello world thanks you are i am it".split())
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(f"[INST] What is {a} plus {b}? [/INST] {a} plus {b} equals {a + b}. {sent.capitalize()}.")
        lines.append(f"<<SYS>>\n{sent}\n<</SYS>>\n\n{sent}!  {sent}?")
    return lines


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer_model() -> Path:
    if not LLAMA2_TOKENIZER_MODEL.is_file():
        pytest.skip(f"official Llama 2 tokenizer.model not found at {LLAMA2_TOKENIZER_MODEL}")
    return LLAMA2_TOKENIZER_MODEL


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_model):
    """Meta's official 32k tokenizer (from ../shared/data)."""
    from llama2_hf import Llama2Tokenizer

    return Llama2Tokenizer.from_sentencepiece(llama2_tokenizer_model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece Llama 2-style tokenizer trained in-process (no files needed)."""
    from llama2_hf import train_llama2_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_llama2_tokenizer(tiny_corpus(), vocab_size=512, output_dir=out)


@pytest.fixture
def tiny_model_factory(tiny_tokenizer):
    """`make(**config_overrides) -> Llama2ForCausalLM`: tiny preset (GQA, 2 layers) with the tiny tokenizer's vocab,
    seeded so two calls give the same weights."""
    from llama2_hf import Llama2Config, Llama2ForCausalLM

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        cfg = Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer), **overrides)
        return Llama2ForCausalLM(cfg).eval()

    return make


class TargetTokenReward:
    """A learnable programmatic reward of the pipeline's contract: the share of a response's tokens that belong to a
    fixed set of 64 token ids (about 7% of the tokens of a random tiny model's answers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.target = set(random.Random(0).sample(range(3, len(tokenizer)), 64))
        self.calls = 0

    def __call__(self, prompts, responses, **columns):
        self.calls += 1
        out = []
        for r in responses:
            ids = self.tokenizer.encode(r, add_special_tokens=False)
            out.append(sum(i in self.target for i in ids) / max(1, len(ids)))
        return out


@pytest.fixture
def tok(tiny_tokenizer):
    """The tiny tokenizer with a pad token (unk), as batching stages need; restored afterwards."""
    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token
    yield tiny_tokenizer
    tiny_tokenizer.pad_token = None


def write_rlhf_cli_inputs(folder: Path, tokenizer, policy, prompts: list[dict]) -> list[str]:
    """Save what the RLHF commands read (policy + tokenizer, two random reward models, a prompts JSONL) under
    `folder`; return the shared command-line arguments that point at them."""
    policy.save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    for seed, name in ((1, "helpful"), (2, "safety")):
        torch.manual_seed(seed)
        config = Llama2Config.from_preset("tiny", vocab_size=len(tokenizer))
        Llama2ForRewardModel(config).save_pretrained(folder / name)
    with open(folder / "prompts.jsonl", "w") as f:
        for row in prompts:
            f.write(json.dumps(row) + "\n")
    return ["--model", str(folder / "policy"), "--prompts", str(folder / "prompts.jsonl"),
            "--helpfulness-rm", str(folder / "helpful"), "--safety-rm", str(folder / "safety"),
            "--output-dir", str(folder / "out")]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} equals {a + b}."}]})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ratings = ("significantly_better", "better", "slightly_better", "negligibly_better")
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} equals {a + b}.",
                     "rejected": f"{a} plus {b} equals {a + b + 1 + i % 3}.", "rating": ratings[i % 4],
                     "safety_label": None, "is_safety_prompt": False})
    return rows


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Folders and files the stage runners read, built once: `policy` (tiny causal LM + tokenizer), `helpfulness_rm`
    and `safety_rm` (tiny random reward models + tokenizer), `sft` / `prefs` / `prompts` JSONL files."""
    from llama2_hf import Llama2ForCausalLM

    root = tmp_path_factory.mktemp("stage_inputs")
    tiny_tokenizer.pad_token = None
    torch.manual_seed(0)
    config = Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer))
    Llama2ForCausalLM(config).save_pretrained(root / "policy")
    tiny_tokenizer.save_pretrained(root / "policy")
    for seed, name in ((1, "helpfulness_rm"), (2, "safety_rm")):
        torch.manual_seed(seed)
        Llama2ForRewardModel(config).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    prompts = [{"prompt": f"What is {i} plus {i + 1}?", "is_safety_prompt": i % 4 == 0} for i in range(8)]
    return {"root": root, "policy": root / "policy", "helpfulness_rm": root / "helpfulness_rm",
            "safety_rm": root / "safety_rm", "sft": write_jsonl(root / "sft.jsonl", sft_rows(24)),
            "prefs": write_jsonl(root / "prefs.jsonl", preference_rows(24)),
            "prompts": write_jsonl(root / "prompts.jsonl", prompts)}


# Arguments that make a Trainer-based stage tiny and CPU-only (one place: the tests' own choice of sizes).
TINY_TRAINING = {"use_cpu": True, "max_steps": 2, "per_device_train_batch_size": 4, "global_batch_size": None,
                 "logging_steps": 1, "report_to": [], "save_strategy": "no", "max_length": 128,
                 "disable_tqdm": True}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], num_processes: int = 2, config_file: str | Path | None = None,
                      timeout: int = 600, env: dict | None = None):
    """`accelerate launch` of `python -m llama2_hf.cli <args>` on CPU processes over gloo; returns the
    CompletedProcess (stdout/stderr captured). ECOSYSTEM_NOTES: only `--multi_gpu` with ACCELERATE_USE_CPU starts
    several CPU processes; `--cpu --num_processes 2` silently starts one. With `config_file`, its distributed type
    (FSDP, DeepSpeed) is used and the process count is overridden."""
    import shutil

    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    cmd = [accelerate, "launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port()),
            "-m", "llama2_hf.cli", *map(str, args)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


# The command line as a user runs it: a fresh process (the console script's module), output captured.

def llama2_hf(*args, cwd=None) -> subprocess.CompletedProcess:
    """`llama2-hf ARGS` in a fresh process (what a user runs), stdout and stderr captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "llama2_hf.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def one_step(stage_inputs, output_dir) -> list[str]:
    """Flags of a one-step CPU training run of the tiny policy (the sizes of conftest's TINY_TRAINING)."""
    return ["--model_name_or_path", stage_inputs["policy"], "--output_dir", output_dir, "--use_cpu", "true",
            "--bf16", "false", "--max_steps", "1", "--per_device_train_batch_size", "2", "--global_batch_size", "2",
            "--max_length", "128", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


def record(output_dir) -> dict:
    return json.loads((output_dir / "run.json").read_text())
