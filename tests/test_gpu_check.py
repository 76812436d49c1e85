"""benchmarks/gpu_check.py --tiny on CPU, so the one-command GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_gpu_check_tiny_prints_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"name"')]
    assert lines == [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    by_name: dict[str, list[dict]] = {}
    for line in lines:
        by_name.setdefault(line["name"], []).append(line)
    assert {line["dtype"] for line in by_name["parity"]} == {"float32", "bfloat16"}
    for line in by_name["parity"]:  # same weights, same maths: the same logits as transformers' Llama
        assert line["ok"] and line["max_abs_diff"] <= line["tolerance"]
    full, lora = by_name["train_step"]
    assert (full["mode"], lora["mode"]) == ("full", "lora") and lora["trainable_params"] < full["trainable_params"]
    for line in (full, lora):
        assert line["tokens_per_s"] > 0 and 0 < line["mfu"] < 1 and line["peak_memory_gb"] > 0
        assert abs(line["loss"] - 6.24) < 0.2  # ln(512) = 6.238: an untrained model over the tiny vocabulary
    if "skipped" in by_name["trainer_step"][0]:  # no TRL: the line says why
        assert "TRL" in by_name["trainer_step"][0]["skipped"]
    else:
        assert {(x["trainer"], x["impl"]) for x in by_name["trainer_step"]} == {
            (t, i) for t in ("sft", "reward") for i in ("trl", "llama2_hf")}
        assert all(x["ours_over_trl"] > 0 for x in by_name["trainer_step_ratio"])
    (sampling,) = by_name["sampling"]
    assert sampling["new_tokens"] == 4 * 8 and sampling["tokens_per_s"] > 0  # no EOS: every row runs to the end
    (ppo,) = by_name["ppo_iteration"]
    assert ppo["seconds"] >= ppo["generation_s"] + ppo["training_s"] > 0
    assert by_name["done"][0]["seconds"] < 120
