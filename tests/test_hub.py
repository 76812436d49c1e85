"""Hub upload end to end against a local fake Hub (tests/fake_hub.py): `llama2-hf push`, the Python helper and
transformers' own `push_to_hub`, then a fresh process without our package reloads every repo with
`trust_remote_code=True` and must reproduce the logits, greedy tokens, reward and chat ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

import llama2_hf
from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2ForRewardModel, encode_dialog
from llama2_hf.cli import main as cli_main
from llama2_hf.hub import build_model_card, collect_upload, push_to_hub, read_run_info

from fake_hub import FakeHub, hub_env, subprocess_env

CHAT = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "7 plus 5 equals 12."}]
# run records as the stages write them (llama2_hf.runner.RunRecord)
SFT_RUN = {"stage": "sft", "args": {"learning_rate": 2e-5, "num_train_epochs": 2, "packing": True,
                                    "model_name_or_path": "meta-llama/Llama-2-7b-hf", "train_file": ["data/sft.jsonl"],
                                    "output_dir": "out/sft"},
           "inputs": {"train_0": {"path": "data/sft.jsonl", "sha256": "ab" * 32},
                      "model": {"path": "meta-llama/Llama-2-7b-hf", "hub": True}},
           "outputs": {"model": "."}, "metrics": {"train_loss": 1.25, "eval": {"loss": 1.5}},
           "versions": {"transformers": "5.23.0", "trl": "1.16.0"}, "world_size": 2, "seconds": 12.5}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, tiny_tokenizer):
    """A tiny SFT model folder (with tokenizer, run.json and trainer leftovers) and a reward-model folder."""
    root = tmp_path_factory.mktemp("hub_artefacts")
    torch.manual_seed(0)
    cfg = Llama2Config.from_preset("tiny", vocab_size=len(tiny_tokenizer), pad_token_id=0)
    lm = Llama2ForCausalLM(cfg).eval()
    lm.save_pretrained(root / "sft")
    tiny_tokenizer.save_pretrained(root / "sft")
    (root / "sft" / "run.json").write_text(json.dumps(SFT_RUN))
    (root / "sft" / "README.md").write_text("trainer's auto card")
    (root / "sft" / "checkpoint-1").mkdir()
    (root / "sft" / "checkpoint-1" / "optimizer.pt").write_bytes(b"not uploaded")
    (root / "sft" / "training_args.bin").write_bytes(b"not uploaded")
    rm = Llama2ForRewardModel.from_pretrained(root / "sft").eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a fresh head is small: make the reward clearly non-zero
    rm.save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    # the reward model's record names the local SFT folder as its model: the card follows it to the Hub base model
    (root / "rm" / "run.json").write_text(json.dumps({
        "stage": "train-rm", "metrics": {"accuracy": 0.625}, "outputs": {"model": "."}, "versions": {},
        "args": {"margin": "small", "model_name_or_path": str(root / "sft"),
                 "train_file": ["data/prefs.jsonl", "Anthropic/hh-rlhf"]},
        "inputs": {"train_0": {"path": "data/prefs.jsonl", "sha256": "cd" * 32},
                   "train_1": {"path": "Anthropic/hh-rlhf", "hub": True},
                   "model": {"path": str(root / "sft"), "sha256": "ef" * 32}}}))
    return {"root": root, "lm": lm, "rm": rm, "tokenizer": tiny_tokenizer}


@pytest.fixture(scope="module")
def pushed(artefacts, tmp_path_factory):
    """Runs every upload path once against one fake Hub; yields (hub, artefacts)."""
    mp = pytest.MonkeyPatch()
    root, tok = artefacts["root"], artefacts["tokenizer"]
    with FakeHub() as hub:
        hub_env(mp, hub, tmp_path_factory.mktemp("hf_home_push"))
        try:
            # 1. the CLI on a stage output folder
            assert cli_main(["push", "--model_name_or_path", str(root / "sft"), "--repo_id", "alice/tiny-sft",
                             "--hub_token", hub.token, "--output_dir", str(root / "push-sft")]) == 0
            # 2. the Python helper on a reward-model folder, private
            push_to_hub(root / "rm", "alice/tiny-rm", private=True, token=hub.token)
            # 3. transformers' own push_to_hub of the objects
            artefacts["lm"].push_to_hub("alice/tiny-hf", token=hub.token)
            tok.push_to_hub("alice/tiny-hf", token=hub.token)
            # 4. the Python helper on objects
            push_to_hub(artefacts["rm"], "alice/tiny-rm-obj", tokenizer=tok, stage="rm", token=hub.token)
            yield hub, artefacts
        finally:
            mp.undo()


def test_cli_card_files_and_auto_map(pushed):
    hub, _ = pushed
    files = hub.files("alice/tiny-sft")
    assert {"config.json", "model.safetensors", "configuration_llama2.py", "modeling_llama2.py",
            "tokenization_llama2.py", "tokenizer.json", "tokenizer_config.json", "run.json", "README.md"} <= set(files)
    assert not any(p.startswith("checkpoint-") or p == "training_args.bin" for p in files)
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"} <= set(auto_map)
    tokenizer_map = json.loads(files["tokenizer_config.json"])["auto_map"]["AutoTokenizer"]
    assert "tokenization_llama2.Llama2Tokenizer" in tokenizer_map

    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["license"] == "llama2" and meta["library_name"] == "transformers"
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf" and meta["pipeline_tag"] == "text-generation"
    assert {"llama2", "sft", "custom_code"} <= set(meta["tags"])
    assert "- **Stage:** `sft`" in card and "trainer's auto card" not in card
    assert "| learning_rate | 2e-05 |" in card and "| eval.loss | 1.5 |" in card and "| train_loss | 1.25 |" in card
    assert f"train_0: `data/sft.jsonl` (sha256 `{'ab' * 8}`)" in card and "| output_dir |" not in card
    assert "## Framework versions" in card and "- trl: 1.16.0" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-sft", trust_remote_code=True)' in card


def test_push_stage_record_holds_no_token(pushed):
    hub, artefacts = pushed
    out = artefacts["root"] / "push-sft"
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "push" and "hub_token" not in record["args"] and hub.token not in json.dumps(record)
    assert record["metrics"]["commit_url"].startswith(hub.url) and record["outputs"] == {"card": "README.md"}
    assert (out / "README.md").read_bytes() == hub.files("alice/tiny-sft")["README.md"]


def test_reward_model_card_follows_provenance_and_repo_is_private(pushed):
    hub, _ = pushed
    card = hub.files("alice/tiny-rm")["README.md"].decode()
    meta = _front_matter(card)
    # run.json of rm/ names the local sft/ folder, whose run.json names the Hub base model
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "- **Stage:** `rm`" in card and "| accuracy | 0.625 |" in card and "| margin | small |" in card
    assert "train_1: `Anthropic/hh-rlhf`" in card and "| model_name_or_path |" not in card
    assert meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert "AutoModelForSequenceClassification" in card
    assert hub.repos["alice/tiny-rm"].private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("alice/tiny-rm", token=False)
    obj_files = hub.files("alice/tiny-rm-obj")
    assert json.loads(obj_files["config.json"])["architectures"] == ["Llama2ForRewardModel"]
    assert "tokenizer.json" in obj_files and "- **Stage:** `rm`" in obj_files["README.md"].decode()


def test_transformers_push_to_hub_keeps_remote_code(pushed):
    hub, _ = pushed
    files = hub.files("alice/tiny-hf")
    assert {"modeling_llama2.py", "configuration_llama2.py", "tokenization_llama2.py"} <= set(files)
    assert "AutoModelForSequenceClassification" in json.loads(files["config.json"])["auto_map"]


def test_repush_unchanged_folder_makes_no_commit(pushed, tmp_path):
    hub, artefacts = pushed
    mp = pytest.MonkeyPatch()
    hub_env(mp, hub, tmp_path / "hf_home")
    try:
        n_commits = len(hub.repos["alice/tiny-sft"].commits)
        push_to_hub(artefacts["root"] / "sft", "alice/tiny-sft", token=hub.token)
        # preupload reports each file's git oid and the client drops unchanged files: nothing to commit
        assert len(hub.repos["alice/tiny-sft"].commits) == n_commits
    finally:
        mp.undo()


RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llama2_hf"] = None  # only the remote code from the fake Hub may run
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    ids, chat = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    x = torch.tensor([ids])
    out = {}
    with torch.no_grad():
        for repo in ("alice/tiny-sft", "alice/tiny-hf"):
            tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
            lm = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
            gen = lm.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            out[repo] = {"tok": type(tok).__name__, "chat_ids": tok.apply_chat_template(chat, return_dict=False),
                         "logits": lm(x).logits[0].tolist(), "generated": gen[0].tolist()}
        for repo in ("alice/tiny-rm", "alice/tiny-rm-obj"):
            rm = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
            out[repo] = {"class": type(rm).__name__, "reward": rm(x).logits[0, 0].item()}
    print(json.dumps(out))
""")


def test_reload_from_fake_hub_in_fresh_process(pushed, tmp_path):
    hub, artefacts = pushed
    lm, rm, tok = artefacts["lm"], artefacts["rm"], artefacts["tokenizer"]
    ids = encode_dialog(tok, CHAT)
    # the private reward repo needs the token: it is given to the fresh process as HF_TOKEN
    env = subprocess_env(hub, tmp_path / "hf_home", token=hub.token)
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(ids), json.dumps(CHAT)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = torch.tensor([ids])
    with torch.no_grad():
        ref_logits = lm(x).logits[0]
        ref_generated = lm.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)[0]
        ref_reward = rm(x).logits[0, 0].item()
    for repo in ("alice/tiny-sft", "alice/tiny-hf"):
        assert out[repo]["tok"] == "Llama2Tokenizer"
        assert out[repo]["chat_ids"] == ids
        torch.testing.assert_close(torch.tensor(out[repo]["logits"]), ref_logits, atol=1e-6, rtol=0)
        assert out[repo]["generated"] == ref_generated.tolist()
    assert abs(ref_reward) > 1e-3
    for repo in ("alice/tiny-rm", "alice/tiny-rm-obj"):
        assert out[repo]["class"] in ("Llama2ForRewardModel", "Llama2ForSequenceClassification")
        assert abs(out[repo]["reward"] - ref_reward) < 1e-6
    assert not [u for u in hub.unhandled if "/api/agent-harnesses" not in u[1]], hub.unhandled


def test_incomplete_folder_gets_remote_code_and_auto_map(artefacts, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(artefacts["root"] / "sft", folder)
    (folder / "modeling_llama2.py").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_llama2.Llama2Config"}
    (folder / "config.json").write_text(json.dumps(config))
    files = collect_upload(folder, "alice/old")
    assert files["modeling_llama2.py"] == (Path(llama2_hf.__file__).parent / "modeling_llama2.py").read_bytes()
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_llama2.Llama2ForCausalLM"
    assert json.loads((folder / "config.json").read_text())["auto_map"] == config["auto_map"]  # folder untouched


def test_bad_inputs_raise_clear_errors(tmp_path, artefacts):
    with pytest.raises(ValueError, match="no such folder"):
        collect_upload(tmp_path / "missing", "alice/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json, adapter_config.json or tokenizer_config.json"):
        collect_upload(tmp_path / "empty", "alice/x")
    (tmp_path / "empty" / "run.json").write_text(json.dumps({"stage": "sft", "metrics": [1, 2]}))
    with pytest.raises(ValueError, match="field 'metrics' must be a JSON object"):
        read_run_info(tmp_path / "empty")
    with pytest.raises(ValueError, match="tokenizer= is for model objects"):
        push_to_hub(artefacts["root"] / "sft", "alice/x", tokenizer=artefacts["tokenizer"])
    assert cli_main(["push", "--model_name_or_path", str(tmp_path / "missing"), "--repo_id", "alice/x",
                     "--dry_run", "true"]) == 2


def test_card_flattens_nested_config(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({
        "stage": "ppo", "args": {"model_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
                                 "ppo": {"learning_rate": 1e-6, "kl_coef": 0.01}},
        "inputs": {"prompts": {"path": "data/p.jsonl", "sha256": "00" * 32}},
        "metrics": {"reward": {"mean": 0.25}}}))
    card = build_model_card(tmp_path, "alice/ppo")
    assert _front_matter(card)["base_model"] == "meta-llama/Llama-2-7b-chat-hf"
    assert "| ppo.learning_rate | 1e-06 |" in card and "| ppo.kl_coef | 0.01 |" in card
    assert "prompts: `data/p.jsonl`" in card and "| reward.mean | 0.25 |" in card and "rlhf" in card


def test_lora_adapter_folder_card(artefacts, tmp_path):
    from peft import LoraConfig, get_peft_model

    lm = Llama2ForCausalLM.from_pretrained(artefacts["root"] / "sft")  # name_or_path: the local SFT folder
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    artefacts["tokenizer"].save_pretrained(tmp_path / "adapter")
    files = collect_upload(tmp_path / "adapter", "alice/lora")
    assert "adapter_model.safetensors" in files and "tokenization_llama2.py" in files
    card = files["README.md"].decode()
    meta = _front_matter(card)
    # the adapter names a local folder; its run.json leads to the Hub base model
    assert meta["library_name"] == "peft" and meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert {"lora", "custom_code"} <= set(meta["tags"]) and "(r=4, alpha=8)" in card
    assert 'base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf"' in card
    assert 'PeftModel.from_pretrained(base, "alice/lora")' in card


def test_tokenizer_only_card(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    card = build_model_card(tmp_path / "tok", "alice/tok")
    meta = _front_matter(card)
    assert "pipeline_tag" not in meta and "- **Stage:** `tokenizer`" in card
    assert 'AutoTokenizer.from_pretrained("alice/tok", trust_remote_code=True)' in card
