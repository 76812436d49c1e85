"""SFT and reward training on 2 CPU processes (DDP over gloo) with `accelerate launch`: ranks end identical."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sft_and_reward_training_ddp_two_cpu_processes(tmp_path, tiny_tokenizer, tiny_model_factory):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    model_dir = tmp_path / "lm"
    tiny_model_factory().save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    sft_rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                              {"role": "assistant", "content": f"{a} plus {a} equals {2 * a}."}]} for a in range(16)]
    pref_rows = [{"prompt": f"Is {a} even?", "chosen": "yes" if a % 2 == 0 else "no",
                  "rejected": "no" if a % 2 == 0 else "yes", "rating": "better"} for a in range(16)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft_rows))
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in pref_rows))
    out = tmp_path / "out"
    out.mkdir()
    # ECOSYSTEM_NOTES: only `--multi_gpu` with use_cpu starts two CPU processes (gloo); `--cpu` silently starts one.
    # the checkout on the script's path too (it imports llama2_hf whether or not the package is installed)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH")]))}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), str(model_dir), str(tmp_path / "sft.jsonl"), str(tmp_path / "pref.jsonl"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["sft_steps"] == 3 and r["rm_steps"] == 3
        assert r["sft_changed"] and r["rm_changed"]
    assert ranks[0]["sft"] == ranks[1]["sft"]  # gradients were all-reduced: identical parameters on both ranks
    assert ranks[0]["rm"] == ranks[1]["rm"]
