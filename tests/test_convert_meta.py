"""`llama2-hf convert-meta`: Meta's model-parallel checkpoint -> HF directory, checked against Meta's forward pass.

The checkpoints are written here with Meta's key names and fairscale split rules (tests/meta_reference.py), the
expected logits come from a re-implementation of `llama/model.py` with complex-number RoPE.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from meta_reference import meta_forward, random_meta_state_dict, split_model_parallel, write_meta_checkpoint
from safetensors import safe_open

from llama2_hf.cli import main as cli
from llama2_hf.convert_meta import convert_meta_checkpoint, interleaved_to_rotate_half
from llama2_hf.modeling_llama2 import Llama2ForCausalLM
from llama2_hf.runner import RunRecord, UsageError
from llama2_hf.stages import run_stage
from llama2_hf.tokenization_llama2 import Llama2Tokenizer, train_llama2_tokenizer

VOCAB = 320  # divisible by 8: the output projection is split on the vocabulary
# head_dim 16 (MHA, as 7B/13B) and 8 (GQA, 2 query heads per KV head, as 70B); 8 KV heads so 8 shards are possible.
MHA = {"dim": 128, "n_layers": 2, "n_heads": 8, "multiple_of": 32, "norm_eps": 1e-05, "vocab_size": -1}
GQA = {"dim": 128, "n_layers": 2, "n_heads": 16, "n_kv_heads": 8, "multiple_of": 32, "ffn_dim_multiplier": 1.3,
       "norm_eps": 1e-05, "vocab_size": -1}


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A SentencePiece tokenizer.model with Llama 2's trainer settings and VOCAB pieces."""
    rng = random.Random(0)
    words = ["llama", "alpaca", "rotary", "shard", "weight", "tensor", "the", "of", "and", "model", "parallel",
             "convert", "meta", "head", "query", "key", "value"]
    texts = [" ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(12)) for _ in range(300)]
    out = tmp_path_factory.mktemp("sp")
    train_llama2_tokenizer(texts, VOCAB, output_dir=out)
    return out / "tokenizer.model"


def _checkpoint(tmp_path, sp_model, params, n_shards, seed=0, **kwargs):
    """Write a Meta-format checkpoint; returns (input_dir, full Meta state dict)."""
    sd = random_meta_state_dict(params, VOCAB, seed=seed)
    src = tmp_path / "meta"
    write_meta_checkpoint(src, params, sd, n_shards, **kwargs)
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return src, sd


def _tokens(batch=2, seq=24, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_interleaved_to_rotate_half_by_hand():
    # Two heads of head_dim 4: Meta pairs rows (0,1),(2,3); rotate-half pairs (0,2),(1,3) -> order 0,2,1,3 per head.
    w = torch.arange(8, dtype=torch.float32)[:, None].expand(8, 3)
    out = interleaved_to_rotate_half(w, n_heads=2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("n_shards", [1, 2, 8])
@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_converted_model_matches_meta_forward(tmp_path, sp_model, params, n_shards):
    # 2 shards: small files, so the index path is used; 8 shards: with a rope.freqs buffer, to be ignored.
    src, sd = _checkpoint(tmp_path, sp_model, params, n_shards, rope_freqs=n_shards == 8)
    max_shard = 300_000 if n_shards == 2 else "5GB"
    out = convert_meta_checkpoint(src, tmp_path / "hf", max_shard_size=max_shard, progress=False)

    model = Llama2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens).logits
    torch.testing.assert_close(ours, meta_forward(sd, params, tokens), atol=1e-5, rtol=0)

    cfg = model.config
    n_kv = params.get("n_kv_heads", params["n_heads"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (params["n_heads"], n_kv, VOCAB)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    if n_shards == 2:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        for name in files:  # every file holds exactly the tensors the index says
            with safe_open(str(tmp_path / "hf" / name), "pt") as f:
                assert set(f.keys()) == {k for k, v in weight_map.items() if v == name}
                assert f.metadata()["format"] == "pt"
        assert set(weight_map) == set(model.state_dict())
    else:
        assert (tmp_path / "hf" / "model.safetensors").is_file() and not index.exists()


def test_tokenizer_and_generation_config_written(tmp_path, sp_model):
    import sentencepiece as spm

    src, _ = _checkpoint(tmp_path, sp_model, MHA, 1)
    (src / "tokenizer.model").rename(tmp_path / "tokenizer.model")  # Meta's layout: next to the size folders
    out = convert_meta_checkpoint(src, tmp_path / "hf", progress=False)
    tok = Llama2Tokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = "llama12 converts the shard7 of  meta"
    assert tok(text).input_ids == [1] + sp.encode(text)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["temperature"], gen["top_p"]) == (1, 2, 0.6, 0.9)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama2" and config["dtype"] == "float32"
    assert config["intermediate_size"] == 352 and config["rms_norm_eps"] == 1e-5
    # the code the auto_map names travels with the weights (remote-code loading)
    for module in {v if isinstance(v, str) else v[1] for v in config["auto_map"].values()}:
        assert (out / (module.split(".")[0] + ".py")).is_file()


def test_rope_layout_matters(tmp_path, sp_model):
    """Without the row reordering of wq/wk the logits differ from Meta's: the parity test can fail."""
    src, sd = _checkpoint(tmp_path, sp_model, GQA, 1)
    out = convert_meta_checkpoint(src, tmp_path / "hf", progress=False)
    model = Llama2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.copy_(sd[f"layers.{i}.attention.wq.weight"])
            layer.self_attn.k_proj.weight.copy_(sd[f"layers.{i}.attention.wk.weight"])
        tokens = _tokens()
        diff = (model(tokens).logits - meta_forward(sd, GQA, tokens)).abs().max()
    assert diff > 1e-3


def test_cli_bf16_rerun_and_overwrite(tmp_path, sp_model, capsys):
    src, sd = _checkpoint(tmp_path, sp_model, GQA, 2)
    out = tmp_path / "hf"
    argv = ["convert-meta", "--input_dir", str(src), "--output_dir", str(out), "--dtype", "bfloat16",
            "--progress", "false"]
    assert cli(argv) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q0 = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    expected = interleaved_to_rotate_half(sd["layers.0.attention.wq.weight"], GQA["n_heads"]).to(torch.bfloat16)
    assert q0.dtype == torch.bfloat16 and torch.equal(q0, expected)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    record = RunRecord.read(out)
    assert record.stage == "convert-meta" and record.outputs == {"model": "."}
    assert record.metrics == {"dtype": "bfloat16", "shards": 2, "layers": 2}
    assert len(record.inputs["params"]["sha256"]) == 64 and len(record.inputs["tokenizer"]["sha256"]) == 64

    assert cli(argv) == 0  # the same arguments: the record comes back, nothing is rewritten
    assert RunRecord.read(out).seconds == record.seconds
    assert cli(argv + ["--max_shard_size", "200000"]) == 2  # another conversion into a converted folder: refused
    assert "max_shard_size: '5GB' -> '200000'" in capsys.readouterr().err
    assert cli(argv + ["--overwrite", "true", "--max_shard_size", "200000"]) == 0
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert RunRecord.read(out).args["max_shard_size"] == "200000"
    assert not (tmp_path / ".hf.partial").exists() and not (tmp_path / "hf.old").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert-meta", "--help"])
    assert exit_info.value.code == 0


def test_stale_files_are_refused_then_replaced_whole(tmp_path, sp_model, capsys):
    """A folder holding another model's files is never converted into: refused, or with overwrite replaced as a
    whole (a stale pytorch_model.bin / adapter_config.json next to the new weights would be loaded instead)."""
    src, sd = _checkpoint(tmp_path, sp_model, MHA, 1)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale weights")
    (out / "adapter_config.json").write_text("{}")
    argv = ["convert-meta", "--input_dir", str(src), "--output_dir", str(out), "--progress", "false"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "is not empty (adapter_config.json, pytorch_model.bin)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "pytorch_model.bin"]  # untouched
    assert cli(argv + ["--overwrite", "true"]) == 0
    assert not (out / "pytorch_model.bin").exists() and not (out / "adapter_config.json").exists()
    model = Llama2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()).logits, meta_forward(sd, MHA, _tokens()), atol=1e-5, rtol=0)


def test_float64_checkpoint_needs_dtype_before_any_folder(tmp_path, sp_model):
    sd = {k: v.double() for k, v in random_meta_state_dict(MHA, VOCAB).items()}
    src = tmp_path / "meta"
    write_meta_checkpoint(src, MHA, sd, 1)
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    with pytest.raises(UsageError, match=r"torch.float64 weights.*pass dtype \(--dtype\)"):
        run_stage("convert-meta", input_dir=str(src), output_dir=str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf").exists()
    run_stage("convert-meta", input_dir=str(src), output_dir=str(tmp_path / "hf"), dtype="float32", progress=False)
    model = Llama2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = meta_forward({k: v.float() for k, v in sd.items()}, MHA, _tokens())
        torch.testing.assert_close(model(_tokens()).logits, ref, atol=1e-5, rtol=0)


def test_corrupt_tokenizer_is_one_clear_line(tmp_path, sp_model, capsys):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 1)
    (src / "tokenizer.model").write_bytes(b"\x00 not a sentencepiece model")
    code = cli(["convert-meta", "--input_dir", str(src), "--output_dir", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and f"{src / 'tokenizer.model'}: not a SentencePiece tokenizer.model" in err
    assert "Traceback" not in err and not (tmp_path / "hf").exists()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import llama2_hf.convert_meta as cm

marker = Path(sys.argv[3])
write = cm._SafetensorsWriter.write

def slow_write(self, name, tensor):  # the conversion of a large model, slowed down: the kill lands mid-write
    write(self, name, tensor)
    marker.touch()
    time.sleep(0.5)

cm._SafetensorsWriter.write = slow_write
from llama2_hf.stages import run_stage
run_stage("convert-meta", input_dir=sys.argv[1], output_dir=sys.argv[2], overwrite=True, progress=False,
          max_shard_size="200000")
"""


def test_kill_during_overwrite_leaves_the_old_model_loadable(tmp_path, sp_model):
    import os
    import signal
    import subprocess
    import sys
    import time

    src, old_sd = _checkpoint(tmp_path, sp_model, MHA, 1, seed=0)
    out = tmp_path / "hf"
    run_stage("convert-meta", input_dir=str(src), output_dir=str(out), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    new_src = tmp_path / "new"
    write_meta_checkpoint(new_src, MHA, random_meta_state_dict(MHA, VOCAB, seed=5), 1)
    (new_src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(new_src), str(out), str(marker)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the conversion never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any((tmp_path / ".hf.partial").iterdir())  # the new model was half written, beside the old one
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    model = Llama2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()).logits, meta_forward(old_sd, MHA, _tokens()), atol=1e-5, rtol=0)
    # a rerun cleans the half-written folder and completes
    run_stage("convert-meta", input_dir=str(new_src), output_dir=str(out), overwrite=True, progress=False)
    assert not (tmp_path / ".hf.partial").exists() and RunRecord.read(out).inputs["params"]["path"].startswith(
        str(new_src))


# ---------------------------------------------------------------------------------------------------------------------
# Inconsistent checkpoints are refused
# ---------------------------------------------------------------------------------------------------------------------

def _convert(src, tmp_path):
    return convert_meta_checkpoint(src, tmp_path / "hf", progress=False)


def test_missing_params_json(tmp_path, sp_model):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 2)
    (src / "params.json").unlink()
    with pytest.raises(ValueError, match="Missing params.json"):
        _convert(src, tmp_path)


def test_missing_unreadable_or_no_shards(tmp_path, sp_model):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 8)
    (src / "consolidated.03.pth").unlink()
    with pytest.raises(ValueError, match=r"missing \['consolidated.03.pth'\]"):
        _convert(src, tmp_path)
    (src / "consolidated.03.pth").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="consolidated.03.pth is not a loadable PyTorch state dict"):
        _convert(src, tmp_path)
    for path in src.glob("consolidated.*.pth"):
        path.unlink()
    with pytest.raises(ValueError, match="No consolidated.NN.pth"):
        _convert(src, tmp_path)


def test_shard_count_not_matching_shapes(tmp_path, sp_model):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 8)
    for i in range(2, 8):  # two files of an 8-way split look like a complete 2-way split by their names
        (src / f"consolidated.{i:02d}.pth").unlink()
    with pytest.raises(ValueError, match="tok_embeddings.weight has shape .*fits 8 shards, but 2"):
        _convert(src, tmp_path)


def test_heads_not_divisible_by_shard_count(tmp_path, sp_model):
    params = dict(MHA, n_kv_heads=1)  # MQA cannot be split over 2 ranks in Meta's code (0 local KV heads)
    src, _ = _checkpoint(tmp_path, sp_model, params, 2)
    with pytest.raises(ValueError, match=r"n_kv_heads=1, .* 2 model-parallel shards"):
        _convert(src, tmp_path)


def test_different_key_sets(tmp_path, sp_model):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 2)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(dict(params, n_layers=3)))
    with pytest.raises(ValueError, match=r"keys params.json implies \(3 layers\): missing \['layers.2.attention.wk"):
        _convert(src, tmp_path)
    (src / "params.json").write_text(json.dumps(params))
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.feed_forward.w3.weight"]
    torch.save(shard, src / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated.01.pth and consolidated.00.pth have different key sets: "
                                         r"consolidated.01.pth has missing \['layers.1.feed_forward.w3.weight'\]"):
        _convert(src, tmp_path)


def test_wrong_split_rule(tmp_path, sp_model):
    src, sd = _checkpoint(tmp_path, sp_model, MHA, 2)
    # wo is RowParallel (split on dim 1); a shard cut on dim 0 instead must be refused.
    shards = split_model_parallel(sd, 2)
    for rank, piece in enumerate(sd["layers.0.attention.wo.weight"].chunk(2, dim=0)):
        shards[rank]["layers.0.attention.wo.weight"] = piece.clone()
        torch.save(shards[rank], src / f"consolidated.{rank:02d}.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: layers.0.attention.wo.weight has shape \[64, 128\], "
                                         r"expected \[128, 64\]"):
        _convert(src, tmp_path)


def test_replicated_norms_must_agree(tmp_path, sp_model):
    src, _ = _checkpoint(tmp_path, sp_model, MHA, 2)
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1.0
    torch.save(shard, src / "consolidated.01.pth")
    with pytest.raises(ValueError, match="norm.weight must be replicated"):
        _convert(src, tmp_path)
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_vocab_must_match_tokenizer(tmp_path, sp_model):
    params = dict(MHA, vocab_size=VOCAB + 8)
    sd = random_meta_state_dict(params, VOCAB + 8)
    src = tmp_path / "meta"
    write_meta_checkpoint(src, params, sd, 1)
    with pytest.raises(ValueError, match="disagrees with the tokenizer"):
        convert_meta_checkpoint(src, tmp_path / "hf", tokenizer_path=sp_model, progress=False)
    # vocab_size -1 takes the tokenizer's: now the embedding rows disagree with it.
    write_meta_checkpoint(src, dict(MHA), sd, 1)
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \[328, 128\], expected \[320, 128\]"):
        convert_meta_checkpoint(src, tmp_path / "hf", tokenizer_path=sp_model, progress=False)

