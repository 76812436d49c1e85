"""Auto-class registration in-process, and remote-code loading in a fresh process without our package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import llama2_hf
from llama2_hf import (
    Llama2Config,
    Llama2ForCausalLM,
    Llama2ForRewardModel,
    Llama2ForSequenceClassification,
    Llama2Model,
    Llama2Tokenizer,
)


def _save_all(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = Llama2Config.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=0)
    lm = Llama2ForCausalLM(cfg).eval()
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    rm = Llama2ForRewardModel.from_pretrained(tmp_path / "lm").eval()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return lm, rm


def test_auto_classes_return_ours(tmp_path, tiny_tokenizer):
    _save_all(tmp_path, tiny_tokenizer)
    assert type(AutoConfig.from_pretrained(tmp_path / "lm")) is Llama2Config
    assert type(AutoModel.from_pretrained(tmp_path / "lm")) is Llama2Model
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "lm")) is Llama2ForCausalLM
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")) is Llama2ForSequenceClassification
    assert type(AutoTokenizer.from_pretrained(tmp_path / "lm")) is Llama2Tokenizer
    auto_map = json.loads((tmp_path / "lm" / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    for name in ("configuration_llama2.py", "modeling_llama2.py", "tokenization_llama2.py"):
        assert (tmp_path / "lm" / name).exists(), name


REMOTE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["llama2_hf"] = None  # our package must not be importable: only the copied remote code may run
    import torch
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer)
    lm_dir, rm_dir, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    x = torch.tensor([ids])
    out = {}
    tok = AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)
    out["tokenizer_class"] = type(tok).__name__
    out["chat_ids"] = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], return_dict=False)
    with torch.no_grad():
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, trust_remote_code=True).eval()
        out["lm_class"] = type(lm).__name__
        out["lm_logits"] = lm(x).logits[0, -1, :8].tolist()
        base = AutoModel.from_pretrained(lm_dir, trust_remote_code=True).eval()
        out["base_class"] = type(base).__name__
        out["base_hidden"] = base(x).last_hidden_state[0, -1, :8].tolist()
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, trust_remote_code=True).eval()
        out["rm_class"] = type(rm).__name__
        out["rm_reward"] = rm(x).logits[0, 0].item()
    print(json.dumps(out))
""")


def test_remote_code_loads_every_head_in_fresh_process(tmp_path, tiny_tokenizer):
    lm, rm = _save_all(tmp_path, tiny_tokenizer)
    ids = tiny_tokenizer.encode("What is 7 plus 5?")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "lm"), str(tmp_path / "rm"),
                           json.dumps(ids)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(torch.tensor(out["lm_logits"]), lm(x).logits[0, -1, :8], atol=1e-6)
        assert torch.allclose(torch.tensor(out["base_hidden"]), lm.model(x).last_hidden_state[0, -1, :8], atol=1e-6)
        assert abs(out["rm_reward"] - rm(x).logits[0, 0].item()) < 1e-6
    assert out["lm_class"] == "Llama2ForCausalLM" and out["base_class"] == "Llama2Model"
    assert out["rm_class"] in ("Llama2ForSequenceClassification", "Llama2ForRewardModel")
    assert out["tokenizer_class"] == "Llama2Tokenizer"
    assert out["chat_ids"] == llama2_hf.encode_dialog(tiny_tokenizer, [{"role": "user", "content": "What is 2 plus 2?"}])
