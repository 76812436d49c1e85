"""Parity of the model family with transformers' reference Llama, cache/generation behaviour, heads, save/load."""

from __future__ import annotations

import pytest
import torch
import transformers

from llama2_hf import (
    Llama2Config,
    Llama2ForCausalLM,
    Llama2ForRewardModel,
    Llama2ForSequenceClassification,
    Llama2Model,
    compute_intermediate_size,
)


def reference_copy(model: Llama2ForCausalLM, attn: str) -> transformers.LlamaForCausalLM:
    """The same weights in transformers' own LlamaForCausalLM."""
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "auto_map")}
    ref = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**fields), attn_implementation=attn)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_transformers_llama(attn, kv_heads):
    torch.manual_seed(0)
    cfg = Llama2Config.from_preset("tiny", num_key_value_heads=kv_heads)
    ours = Llama2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    ref = reference_copy(ours, attn)
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-5
        got = ours(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_identical_with_without_cache_and_reference(attn):
    torch.manual_seed(1)
    cfg = Llama2Config.from_preset("tiny")
    ours = Llama2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    ref = reference_copy(ours, attn)
    prompt = torch.randint(3, cfg.vocab_size, (2, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = ours.generate(prompt, **kw)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, ours.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, ref.generate(prompt, **kw))
    assert torch.equal(cached, ours.generate(prompt, cache_implementation="static", **kw))


def test_gradients_match_reference_and_checkpointing():
    torch.manual_seed(2)
    cfg = Llama2Config.from_preset("tiny")
    ours = Llama2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    ref = reference_copy(ours, "sdpa").train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ours.train()
    loss = ours(ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    ours.zero_grad()
    ours.activation_checkpointing_enable()
    ours(ids, labels=ids).loss.backward()
    for n, p in ours.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_packed_rows_do_not_attend_across_samples():
    torch.manual_seed(3)
    model = Llama2ForCausalLM._from_config(Llama2Config.from_preset("tiny"), attn_implementation="sdpa").eval()
    a, b = torch.randint(3, 512, (1, 9)), torch.randint(3, 512, (1, 6))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, use_cache=False).logits
        la, lb = model(a).logits, model(b).logits
    assert (out[:, :9] - la).abs().max() <= 1e-5
    assert (out[:, 9:] - lb).abs().max() <= 1e-5


def test_save_load_identical_and_hf_llama_checkpoint(tmp_path):
    torch.manual_seed(4)
    cfg = Llama2Config.from_preset("tiny")
    model = Llama2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 11))
    model.save_pretrained(tmp_path / "ours")
    again = Llama2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # A transformers `LlamaForCausalLM` checkpoint (model_type "llama", the meta-llama/Llama-2-*-hf layout), sharded.
    ref = reference_copy(model, "sdpa")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    loaded = Llama2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(loaded.config, Llama2Config)
    with torch.no_grad():
        assert (loaded(ids).logits - ref(ids).logits).abs().max() <= 1e-5


def test_reward_model_from_causal_lm_reads_last_non_pad_token(tmp_path):
    torch.manual_seed(5)
    lm = Llama2ForCausalLM(Llama2Config.from_preset("tiny", pad_token_id=0)).eval()
    lm.save_pretrained(tmp_path)
    rm = Llama2ForRewardModel.from_pretrained(tmp_path).eval()
    assert rm.config.num_labels == 1 and rm.score.weight.shape == (1, 64)
    for name, p in lm.model.state_dict().items():
        assert torch.equal(p, rm.model.state_dict()[name])
    seq = torch.randint(3, 512, (1, 8))
    right = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask_r, mask_l = (right != 0).long(), (left != 0).long()
    alone = rm.rewards(seq)
    assert alone.shape == (1,)
    # Right padding: identical computation up to the last real token.
    assert torch.allclose(rm.rewards(right, mask_r), alone, atol=1e-5)
    # Left padding: positions shift unless given, so compare with explicit position ids.
    with torch.no_grad():
        pos = (mask_l.cumsum(-1) - 1).clamp(min=0)
        out = rm(left, attention_mask=mask_l, position_ids=pos).logits.squeeze(-1)
    assert torch.allclose(out, alone, atol=1e-5)
    # Without an attention mask, the pad id locates the last token.
    assert torch.allclose(rm.rewards(right), alone, atol=1e-5)
    # The hidden state the head reads is the decoder's at the last real token.
    with torch.no_grad():
        h = lm.model(seq).last_hidden_state[:, -1]
    assert torch.allclose(rm.score(h).squeeze(-1), alone, atol=1e-5)


def test_sequence_classification_head_shapes():
    cfg = Llama2Config.from_preset("tiny", num_labels=3, pad_token_id=0)
    model = Llama2ForSequenceClassification(cfg).eval()
    out = model(torch.randint(1, 512, (4, 6)))
    assert out.logits.shape == (4, 3)
    assert isinstance(model.model, Llama2Model)


def test_config_presets_and_meta_params():
    assert compute_intermediate_size(4096) == 11008
    assert compute_intermediate_size(5120) == 13824
    assert compute_intermediate_size(8192, 4096, 1.3) == 28672
    assert compute_intermediate_size(8192, 256, 1.0) == 22016
    c7, c70 = Llama2Config(), Llama2Config.from_preset("70b")
    assert (c7.hidden_size, c7.num_hidden_layers, c7.intermediate_size, c7.num_key_value_heads) == (4096, 32, 11008, 32)
    assert (c7.rms_norm_eps, c7.rope_parameters["rope_theta"], c7.max_position_embeddings) == (1e-5, 10000.0, 4096)
    assert (c70.num_key_value_heads, c70.intermediate_size, c70.num_hidden_layers) == (8, 28672, 80)
    params70 = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    from_meta = Llama2Config.from_meta_params(params70, vocab_size=32000)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(from_meta, k) == getattr(c70, k)
    with pytest.raises(ValueError, match="vocab_size=-1"):
        Llama2Config.from_meta_params(params70)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        Llama2Config(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Llama2Config.from_preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="no biases"):
        Llama2Config.from_preset("tiny", attention_bias=True)
    with pytest.raises(ValueError, match="Unknown Llama 2 preset"):
        Llama2Config.from_preset("65b")


def test_num_parameters_of_released_sizes_without_allocating():
    # Parameter counts in the fact sheet (derived from the shapes): checked from the config alone.
    def count(cfg):
        d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
        kv = cfg.num_key_value_heads * cfg.head_dim
        per_layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d
        return 2 * v * d + L * per_layer + d

    assert count(Llama2Config.from_preset("7b")) == 6_738_415_616
    assert count(Llama2Config.from_preset("13b")) == 13_015_864_320
    assert count(Llama2Config.from_preset("70b")) == 68_976_648_192
    with torch.device("meta"):
        assert Llama2ForCausalLM(Llama2Config.from_preset("7b")).num_parameters() == 6_738_415_616


def test_fused_training_loss_matches_transformers_with_ignored_labels_and_num_items():
    """In training mode the loss is computed in chunks without logits; it and every gradient equal transformers'."""
    torch.manual_seed(5)
    cfg = Llama2Config.from_preset("tiny")
    ours = Llama2ForCausalLM._from_config(cfg, attn_implementation="sdpa").train()
    ref = reference_copy(ours, "sdpa").train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 12:] = -100
    n_items = torch.tensor(25)
    out = ours(ids, labels=labels, num_items_in_batch=n_items)
    assert out.logits is None
    out.loss.backward()
    ref_loss = ref(ids, labels=labels, num_items_in_batch=n_items).loss
    ref_loss.backward()
    assert torch.allclose(out.loss, ref_loss, atol=1e-6)
    grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, atol=1e-6), n
