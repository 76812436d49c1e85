"""Upload a saved model, tokenizer or reward model to the Hugging Face Hub with a generated model card.

    llama2-hf push --model_name_or_path out/sft --repo_id me/llama-2-7b-sft
    push_to_hub("out/rm-safety", "me/llama-2-7b-safety-rm")            # a folder
    push_to_hub(model, "me/tiny-chat", tokenizer=tokenizer)             # objects: saved to a temp folder first

What is uploaded: every file of the folder except trainer leftovers (`checkpoint-*/`, `runs/`, optimizer / scheduler /
RNG states, `training_args.bin`), plus a generated README.md. The folder's remote-code files and `auto_map` (written by
`save_pretrained` after `import llama2_hf`) are checked: for a `model_type: llama2` folder, a missing
`configuration_/modeling_/tokenization_llama2.py` is added from this package and missing `auto_map` entries are filled
in the uploaded copy of `config.json` / `tokenizer_config.json` (the folder itself is never modified), so users without
this package load every head with `trust_remote_code=True`.

Any transformers family gets a card of its own: a folder that is not Llama 2 (`family_of`: no `model_type: llama2`
config, no `Llama2Tokenizer`, no Llama 2 base model) is described by the stage that made it and its base model family
(from `config.json`'s `architectures` / `model_type`, or the adapter's base), with the base model when the run records
name one, and none of Llama 2's license, tags or remote code: the card sets no `license` (the base model's license
applies; set `license:` in the card, e.g. `other` with `license_name`/`license_link`, before making the repo
public), and nothing is added to the upload (the family's classes ship with transformers).

The card's stage, data (with content hashes), hyperparameters, evaluation table and library versions come from the
folder's `run.json` when present: the run record every stage writes (`llama2_hf.runner.RunRecord`: `stage`, `args`,
`inputs`, `outputs`, `metrics`, `versions`). The base model is followed through `model_name_or_path` (and the other
model arguments) from one stage folder's record to the previous one's, up to a Hub id. The Hub endpoint is `HF_ENDPOINT` (or `endpoint=`); the token is `token=`, else `HF_TOKEN` or
the stored login.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData

from .configuration_llama2 import LLAMA2_AUTO_MAP
from .runner import RUN_RECORD, UsageError

logger = logging.getLogger(__name__)

# Stage name -> (card sentence, extra tags). Aliases let run.json files written by the CLI subcommands map here.
STAGES: dict[str, tuple[str, list[str]]] = {
    "base": ("a pretrained Llama 2 base model", []),
    "convert": ("a Llama 2 checkpoint converted from Meta's original weights", []),
    "sft": ("a Llama 2 model after supervised fine-tuning on chat data with the loss on answer tokens only "
            "(paper §3.1)", ["sft", "chat"]),
    "rm": ("a Llama 2 reward model: the chat model with its next-token head replaced by a scalar head, trained with "
           "the binary ranking loss with a rating margin (paper §3.2.2)", ["reward-model"]),
    "rs": ("a Llama 2-Chat model fine-tuned on its best-of-K samples as scored by the reward models (rejection "
           "sampling, paper §3.2.3)", ["rlhf", "rejection-sampling", "chat"]),
    "ppo": ("a Llama 2-Chat model optimised with PPO against the safety-gated reward with a KL penalty "
            "(paper §3.2.3)", ["rlhf", "ppo", "chat"]),
    "gatt": ("a Llama 2-Chat model fine-tuned with Ghost Attention data for multi-turn instruction following "
             "(paper §3.3)", ["gatt", "chat"]),
    "distill": ("a Llama 2-Chat model after targeted safety context distillation (paper §4.2.4)",
                ["safety", "context-distillation", "chat"]),
    "tokenizer": ("the Llama 2 SentencePiece BPE tokenizer with the Llama 2-Chat format", []),
}
STAGE_ALIASES = {"pretrain": "base", "convert-meta": "convert", "train-rm": "rm", "reward": "rm",
                 "reward-model": "rm", "rejection-sample": "rs", "rejection_sampling": "rs",
                 "rejection-sampling": "rs", "safety-distill": "distill", "safety_distill": "distill"}

# The same stages for a model of another family ({family}: "Qwen2", "Mistral", ...): the method, not Llama 2's weights.
FAMILY_STAGES: dict[str, str] = {
    "base": "a pretrained {family} base model",
    "convert": "a {family} checkpoint",
    "sft": "a {family} model after supervised fine-tuning on chat data with the loss on answer tokens only "
           "(Llama 2 paper §3.1)",
    "rm": "a {family} reward model: the chat model with its next-token head replaced by a scalar head, trained with "
          "the binary ranking loss with a rating margin (Llama 2 paper §3.2.2)",
    "rs": "a {family} chat model fine-tuned on its best-of-K samples as scored by the reward models (rejection "
          "sampling, Llama 2 paper §3.2.3)",
    "ppo": "a {family} chat model optimised with PPO against the safety-gated reward with a KL penalty "
           "(Llama 2 paper §3.2.3)",
    "gatt": "a {family} chat model fine-tuned with Ghost Attention data for multi-turn instruction following "
            "(Llama 2 paper §3.3)",
    "distill": "a {family} chat model after targeted safety context distillation (Llama 2 paper §4.2.4)",
    "tokenizer": "the tokenizer of a {family} model, with its chat template",
}
_LLAMA2_HUB_ID = re.compile(r"llama[-_ ]?2", re.IGNORECASE)

ADAPTER_CONFIG = "adapter_config.json"  # a peft (LoRA / QLoRA) output: adapter weights only
REQUIRED_AUTO_MAP_KEYS = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")
# Trainer output that is state for resuming, not part of the model (and pickles the Hub flags as unsafe).
EXCLUDE_PATTERNS = ("checkpoint-*", "runs", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin",
                    "trainer_state.json", "*.lock", ".git", "__pycache__")
# Hyperparameters shown in the card's table when a run config has many fields; the full config goes in a details block.
KEY_HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps", "global_batch_size",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "train_on", "margin",
    "safety_aux_loss_coef", "kl_coef", "beta", "cliprange", "num_samples", "temperature", "top_p", "seed",
)
MODEL_INPUT_KEYS = ("base_model", "model", "model_name_or_path", "policy", "sft_model", "init_model")
# Arguments that name inputs or folders: listed as the card's data (from the record's inputs), not as hyperparameters.
INPUT_LIKE_KEYS = (*MODEL_INPUT_KEYS, "tokenizer", "tokenizer_name_or_path", "tokenizer_path", "train_file",
                   "eval_file", "mix_with", "prompts", "prompts_file", "dialogues", "dialogues_file", "helpfulness_rm",
                   "safety_rm", "helpfulness_reward_model", "safety_reward_model", "value_model", "dataset",
                   "datasets", "data_dir", "input_dir", "output_dir", "logging_dir")
RECORD_KEYS = ("stage", "args", "inputs", "outputs", "metrics", "versions", "world_size", "seconds")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".gz", ".model")
_MAX_PROVENANCE_HOPS = 16


def normalize_stage(stage: str) -> str:
    """Canonical stage name (`train-rm` -> `rm`); unknown names are kept as given."""
    key = stage.strip().lower()
    return STAGE_ALIASES.get(key, key)


def read_run_info(folder: str | os.PathLike) -> dict:
    """The run record (`run.json`) of a stage output as `{"stage", "config", "inputs", "hashes", "outputs",
    "metrics", "versions", "other"}` ({} when absent): `config` is the record's resolved `args`, `inputs` maps each
    input name to its path or Hub id and `hashes` to its sha256 (when the record has one).

    Raises UsageError naming the file and field when run.json is not a run record.
    """
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a run record (a JSON object with {', '.join(RECORD_KEYS[:6])}), got "
                         f"{type(raw).__name__}")
    info = {"stage": raw.get("stage"), "config": raw.get("args") or {}, "inputs": {}, "hashes": {},
            "outputs": raw.get("outputs") or {}, "metrics": raw.get("metrics") or {},
            "versions": raw.get("versions") or {}}
    for name in ("config", "outputs", "metrics", "versions"):
        if not isinstance(info[name], dict):
            key = "args" if name == "config" else name
            raise UsageError(f"{path}: field {key!r} must be a JSON object, got {type(info[name]).__name__}")
    if info["stage"] is not None and not isinstance(info["stage"], str):
        raise UsageError(f"{path}: field 'stage' must be a string, got {info['stage']!r}")
    inputs = raw.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise UsageError(f"{path}: field 'inputs' must be a JSON object, got {type(inputs).__name__}")
    for name, entry in inputs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UsageError(f"{path}: inputs.{name} must be {{\"path\": ..., \"sha256\": ...}}, got {entry!r}")
        info["inputs"][name] = entry["path"]
        if entry.get("sha256"):
            info["hashes"][name] = entry["sha256"]
    info["other"] = {k: v for k, v in raw.items() if k not in RECORD_KEYS}
    return info


def _is_hub_id(value) -> bool:
    """A string that names a Hub repo rather than a local path or data file."""
    return (isinstance(value, str) and _HUB_ID.fullmatch(value) is not None and not os.path.exists(value)
            and not value.endswith(_FILE_SUFFIXES))


def find_base_model(folder: str | os.PathLike, run_info: Mapping | None = None) -> str | None:
    """The Hub id this model derives from, following local model paths through their run.json files.

    E.g. ppo/run.json names rs/, whose run.json names sft/, whose run.json names meta-llama/Llama-2-7b-hf.
    """
    info = read_run_info(folder) if run_info is None else run_info
    seen = {Path(folder).resolve()}
    for _ in range(_MAX_PROVENANCE_HOPS):
        candidates = [info.get("inputs", {}).get(k) for k in MODEL_INPUT_KEYS]
        candidates += [info.get("config", {}).get(k) for k in MODEL_INPUT_KEYS]
        candidates = [c for c in candidates if isinstance(c, str) and c]
        hub_ids = [c for c in candidates if _is_hub_id(c)]
        if hub_ids:
            return hub_ids[0]
        local = [Path(c).resolve() for c in candidates if Path(c).is_dir()]
        local = [p for p in local if p not in seen and (p / RUN_RECORD).is_file()]
        if not local:
            return None
        seen.add(local[0])
        info = read_run_info(local[0])
    logger.warning("stopped following run.json provenance after %d hops", _MAX_PROVENANCE_HOPS)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from e


def _count_parameters(folder: Path) -> int | None:
    """Parameter count from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return "`" + json.dumps(value, default=str) + "`"
    return str(value)


def _flatten(metrics: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """A nested mapping as (dotted.name, value) rows."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value).replace('|', chr(92) + '|')} |".replace("\n", " ") for name, value in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Family:
    """The model family a folder belongs to: `llama2` (Llama 2 weights, license and remote code), its display name
    ("Qwen2", "Mistral", "Llama2") and its config's `model_type` (None when no config is readable)."""

    llama2: bool
    name: str
    model_type: str | None = None


def family_of(folder: str | os.PathLike, config: dict | None = None, adapter: dict | None = None,
              base_model: str | None = None) -> Family:
    """The family of a saved model, adapter or tokenizer: read from `config.json` (for an adapter: its local base
    folder's), named after its architecture (`Qwen2ForCausalLM` -> "Qwen2"), else its `model_type`, else the
    tokenizer class. Llama 2 is a `model_type: llama2` config, a `Llama2Tokenizer`, or a transformers Llama (or
    unknown) model whose base model is a Llama 2 Hub id (meta-llama/Llama-2-7b-hf)."""
    folder = Path(folder)
    tok_path = folder / "tokenizer_config.json"
    tok_class = str(_read_json(tok_path).get("tokenizer_class") or "") if tok_path.is_file() else ""
    source = config if config is not None or not (folder / "config.json").is_file() else _read_json(
        folder / "config.json")
    base = (adapter or {}).get("base_model_name_or_path")
    if source is None and isinstance(base, str) and (Path(base) / "config.json").is_file():
        source = _read_json(Path(base) / "config.json")
    model_type = (source or {}).get("model_type")
    llama2 = (model_type == "llama2" or tok_class == "Llama2Tokenizer"
              or (model_type in (None, "llama") and bool(base_model) and _LLAMA2_HUB_ID.search(base_model) is not None))
    architectures = (source or {}).get("architectures") or []
    name = architectures[0].split("For")[0] if architectures else model_type
    if not name and tok_class not in ("", "TokenizersBackend", "PreTrainedTokenizerFast"):
        name = tok_class.removesuffix("Fast").removesuffix("Tokenizer")
    return Family(llama2, name or ("Llama 2" if llama2 else "transformers"), model_type)


def build_model_card(folder: str | os.PathLike, repo_id: str, stage: str | None = None,
                     base_model: str | None = None) -> str:
    """README.md text for `folder`: YAML front matter for the Hub, then stage, model, data, hyperparameters,
    evaluation and usage. `stage` / `base_model` override what run.json says."""
    folder = Path(folder)
    info = read_run_info(folder)
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    adapter = _read_json(folder / ADAPTER_CONFIG) if (folder / ADAPTER_CONFIG).is_file() else None
    is_reward = bool(config) and any("SequenceClassification" in a or "RewardModel" in a
                                     for a in config.get("architectures") or [])
    if adapter is not None:
        is_reward = adapter.get("task_type") == "SEQ_CLS"
    is_model = config is not None or adapter is not None
    stage = normalize_stage(stage or info.get("stage") or ("rm" if is_reward else "base" if is_model else "tokenizer"))
    description, stage_tags = STAGES.get(stage, (f"a Llama 2 model produced by the `{stage}` stage", []))
    base_model = base_model or find_base_model(folder, info)
    adapter_base = (adapter or {}).get("base_model_name_or_path")
    if base_model is None and adapter_base:  # the adapter's base: a Hub id, or a local folder with its own run.json
        base_model = adapter_base if _is_hub_id(adapter_base) else (
            find_base_model(adapter_base) if Path(adapter_base).is_dir() else None)
    family = family_of(folder, config, adapter, base_model)
    if not family.llama2:
        description = FAMILY_STAGES.get(stage, f"a {{family}} model produced by the `{stage}` stage")
        description = description.replace("{family}", family.name)

    inputs = info.get("inputs", {})
    datasets = sorted({v for k, vs in inputs.items() if k not in MODEL_INPUT_KEYS
                       for v in (vs if isinstance(vs, list) else [vs]) if _is_hub_id(v)})
    tok_config = folder / "tokenizer_config.json"
    remote_code = (config or {}).get("model_type") == "llama2" or (
        tok_config.is_file() and "Llama2Tokenizer" in str(_read_json(tok_config).get("tokenizer_class")))
    family_tags = ["llama2", "llama-2", "llama2_hf"] if family.llama2 else [
        "llama2_hf", *([family.model_type] if family.model_type else [])]
    card_data = ModelCardData(  # another family: no license (the base model's applies; see the module docstring)
        license="llama2" if family.llama2 else None, library_name="peft" if adapter is not None else "transformers",
        base_model=base_model,
        pipeline_tag=None if not is_model else "text-classification" if is_reward else "text-generation",
        tags=[*family_tags, *(["custom_code"] if remote_code else []), *stage_tags, *(["lora"] if adapter else [])],
        datasets=datasets or None)

    name = repo_id.split("/")[-1]
    method = ("the Llama 2 / Llama 2-Chat method of Touvron et al. 2023, arXiv:2307.09288, in the Hugging Face "
              "ecosystem" if family.llama2 else "the Llama 2 / Llama 2-Chat method of Touvron et al. 2023, "
              f"arXiv:2307.09288, applied to a {family.name} model in the Hugging Face ecosystem")
    parts = [f"---\n{card_data.to_yaml()}\n---", f"# {name}", f"This is {description}, made with `llama2_hf` "
             f"({method})." + (f" Base model: `{base_model}`." if base_model else "")]
    facts = [f"- **Stage:** `{stage}`"]
    if not family.llama2:
        facts.append(f"- **Base model family:** {family.name}"
                     + (f" (`model_type: {family.model_type}`)" if family.model_type else "")
                     + (f", base model `{base_model}`" if base_model else ""))
    if adapter is not None:
        facts.append(f"- **Adapter:** {adapter.get('peft_type', 'LoRA')} (r={adapter.get('r')}, "
                     f"alpha={adapter.get('lora_alpha')}) on `{adapter.get('base_model_name_or_path')}`; only the "
                     "adapter weights are in this repository")
    if config is not None:
        n_params = _count_parameters(folder)
        arch = ", ".join(config.get("architectures") or ["?"])
        shape = (f"{config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
                 f"{config.get('num_attention_heads')} attention heads ({config.get('num_key_value_heads')} KV heads), "
                 f"vocabulary {config.get('vocab_size')}, context {config.get('max_position_embeddings')}")
        facts.append(f"- **Architecture:** `{arch}` ({config.get('model_type')}): {shape}"
                     + (f", {n_params:,} parameters" if n_params else ""))
    parts.append("\n".join(facts))

    parts.append("## Training data")
    if inputs:
        hashes = info.get("hashes", {})
        parts.append("\n".join(f"- {k}: `{_fmt(v).strip('`')}`"
                                + (f" (sha256 `{hashes[k][:16]}`)" if k in hashes else "") for k, v in inputs.items()))
    else:
        parts.append("Not recorded (no `inputs` in run.json).")

    run_config = info.get("config", {})
    parts.append("## Hyperparameters")
    if run_config:
        # nested sections (e.g. {"ppo": {...}}) as dotted names; inputs are listed above, not as hyperparameters
        scalars = [(k, v) for k, v in _flatten(run_config) if v is not None and not isinstance(v, list)
                   and k.split(".")[-1] not in INPUT_LIKE_KEYS]
        rows = scalars if len(scalars) <= 30 else [(k, v) for k, v in scalars
                                                   if k.split(".")[-1] in KEY_HYPERPARAMETERS]
        parts.append(_table(("hyperparameter", "value"), rows))
        if len(rows) < len(_flatten(run_config)):
            parts.append("<details><summary>Full run configuration</summary>\n\n```json\n"
                         + json.dumps(run_config, indent=2, default=str) + "\n```\n</details>")
    else:
        parts.append("Not recorded (no `args` in run.json).")

    parts.append("## Evaluation")
    metrics = _flatten(info.get("metrics", {}))
    parts.append(_table(("metric", "value"), metrics) if metrics else "No evaluation recorded in run.json.")
    if info.get("versions"):
        parts.append("## Framework versions\n\n" + "\n".join(f"- {k}: {v}" for k, v in info["versions"].items()))
    if info.get("other"):
        parts.append("<details><summary>Other run information</summary>\n\n```json\n"
                     + json.dumps(info["other"], indent=2, default=str) + "\n```\n</details>")

    parts.append("## Usage")
    if remote_code or family.llama2:
        parts.append("The model code ships in this repository (`*_llama2.py`): `trust_remote_code=True` runs it, so "
                     "read it first or pin a `revision`. With `pip install llama2_hf` and `import llama2_hf`, no "
                     "remote code is needed.")
    else:
        parts.append(f"transformers' own {family.name} classes load it: no remote code and no `llama2_hf` needed.")
    tokenizer_repo = repo_id if tok_config.is_file() else base_model or repo_id
    if adapter is not None:
        snippet = _adapter_snippet(repo_id, adapter_base if _is_hub_id(adapter_base) else base_model or adapter_base,
                                   is_reward, tokenizer_repo)
    else:
        snippet = _usage_snippet(repo_id, config, is_reward, tokenizer_repo)
    parts.append(snippet if family.llama2 else snippet.replace(", trust_remote_code=True", ""))
    if family.llama2:
        parts.append("## License\n\nLlama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta "
                     "Platforms, Inc. All Rights Reserved. Use of this model is subject to that license and Meta's "
                     "acceptable use policy.")
    else:
        parts.append("## License\n\nNot set by `llama2_hf`: this model derives from "
                     + (f"`{base_model}`" if base_model else f"a {family.name} base model") + ", whose license "
                     "applies. Set `license:` in the front matter above (the base model's, or `other` with "
                     "`license_name` and `license_link`) before publishing.")
    return "\n\n".join(parts) + "\n"


def _adapter_snippet(repo_id: str, base: str | None, is_reward: bool, tokenizer_repo: str) -> str:
    auto = "AutoModelForSequenceClassification" if is_reward else "AutoModelForCausalLM"
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoTokenizer, " + auto + "\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_repo}", trust_remote_code=True)\n'
            f'base = {auto}.from_pretrained("{base}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n```')


def _usage_snippet(repo_id: str, config: dict | None, is_reward: bool, tokenizer_repo: str) -> str:
    tok = f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_repo}", trust_remote_code=True)\n'
    if config is None:
        return ("```python\nfrom transformers import AutoTokenizer\n\n" + tok
                + 'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], '
                  'return_dict=False)\n```')
    if is_reward:
        return ("```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, "
                "AutoTokenizer\n\n" + tok
                + f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}", trust_remote_code=True)\n'
                  'messages = [{"role": "user", "content": "How do I boil an egg?"},\n'
                  '            {"role": "assistant", "content": "Put it in boiling water for 8 minutes."}]\n'
                  "ids = torch.tensor([tokenizer.apply_chat_template(messages, return_dict=False)])\n"
                  "reward = model(ids).logits[0, 0].item()  # higher is better\n```")
    return ("```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n" + tok
            + f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
              'ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], '
              "return_dict=False)])\n"
              "out = model.generate(ids, max_new_tokens=64, do_sample=True, temperature=0.6, top_p=0.9)\n"
              "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n```")


def _excluded(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in rel.parts for pattern in EXCLUDE_PATTERNS)


def remote_code_fixes(folder: str | os.PathLike) -> dict[str, bytes]:
    """Files to add or replace in the upload so a `model_type: llama2` folder loads with `trust_remote_code=True`:
    missing remote-code modules (from this package) and `config.json` / `tokenizer_config.json` with a full auto_map.
    Empty when the folder is complete or is not a llama2 folder."""
    folder = Path(folder)
    fixes: dict[str, bytes] = {}
    config_path, tok_path = folder / "config.json", folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    tok_config = _read_json(tok_path) if tok_path.is_file() else None
    if config is not None and config.get("model_type") != "llama2":
        return fixes
    if config is None and (tok_config is None or "Llama2Tokenizer" not in str(tok_config.get("tokenizer_class"))):
        return fixes
    needed = set()
    if config is not None:
        auto_map = dict(config.get("auto_map") or {})
        required = (*REQUIRED_AUTO_MAP_KEYS, "AutoTokenizer") if tok_config is not None else REQUIRED_AUTO_MAP_KEYS
        missing = [k for k in required if k not in auto_map]
        if missing:
            auto_map.update({k: LLAMA2_AUTO_MAP[k] for k in missing})
            fixes["config.json"] = (json.dumps({**config, "auto_map": auto_map}, indent=2) + "\n").encode()
            logger.info("config.json: adding auto_map entries %s in the uploaded copy", missing)
        needed |= {"configuration_llama2.py", "modeling_llama2.py", "fused_linear_ce.py"}
    if tok_config is not None:
        tok_map = dict(tok_config.get("auto_map") or {})
        if "AutoTokenizer" not in tok_map:
            tok_map["AutoTokenizer"] = LLAMA2_AUTO_MAP["AutoTokenizer"]
            fixes["tokenizer_config.json"] = (json.dumps({**tok_config, "auto_map": tok_map}, indent=2)
                                              + "\n").encode()
            logger.info("tokenizer_config.json: adding the AutoTokenizer auto_map entry in the uploaded copy")
        needed.add("tokenization_llama2.py")
    package_dir = Path(__file__).resolve().parent
    for name in sorted(needed):
        if not (folder / name).is_file():
            fixes[name] = (package_dir / name).read_bytes()
            logger.info("%s: missing from the folder, uploading this package's copy", name)
    return fixes


def collect_upload(folder: str | os.PathLike, repo_id: str, stage: str | None = None, base_model: str | None = None,
                   model_card: bool = True) -> dict[str, bytes | Path]:
    """`{path_in_repo: local file or bytes}`: what `push_to_hub` uploads for `folder` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"model {folder}: no such folder (expected a folder written by save_pretrained)")
    if not any((folder / name).is_file() for name in ("config.json", ADAPTER_CONFIG, "tokenizer_config.json")):
        raise UsageError(f"{folder}: has no config.json, {ADAPTER_CONFIG} or tokenizer_config.json; save the model, "
                         "adapter or tokenizer with save_pretrained first")
    files: dict[str, bytes | Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not _excluded(rel):
            files[rel.as_posix()] = path
    files.update(remote_code_fixes(folder))
    if model_card:
        if "README.md" in files:
            logger.warning("%s/README.md is replaced by the generated model card (pass model_card=False / "
                           "--model_card false to upload it as is)", folder)
        files["README.md"] = build_model_card(folder, repo_id, stage=stage, base_model=base_model).encode()
    return files


def push_to_hub(path_or_model, repo_id: str, *, tokenizer=None, stage: str | None = None,
                base_model: str | None = None, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None, model_card: bool = True, endpoint: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload a model / tokenizer / reward model in one commit. Returns the commit URL.

    `path_or_model`: a folder written by `save_pretrained` (a stage's output dir), or an object with
    `save_pretrained` (model or tokenizer; `tokenizer=` is saved next to a model), saved to a temporary folder first.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        if tokenizer is not None:
            raise UsageError("tokenizer= is for model objects; a folder is uploaded as it is (save the tokenizer "
                             "into it)")
        return _push_folder(Path(path_or_model), repo_id, stage=stage, base_model=base_model, private=private,
                            token=token, commit_message=commit_message, model_card=model_card, endpoint=endpoint)
    if not hasattr(path_or_model, "save_pretrained"):
        raise UsageError(f"path_or_model must be a folder or an object with save_pretrained, got "
                         f"{type(path_or_model).__name__}")
    with tempfile.TemporaryDirectory(prefix="llama2_hf_push_") as tmp:
        path_or_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return _push_folder(Path(tmp), repo_id, stage=stage, base_model=base_model, private=private, token=token,
                            commit_message=commit_message, model_card=model_card, endpoint=endpoint)


def _push_folder(folder: Path, repo_id: str, *, stage, base_model, private, token, commit_message, model_card,
                 endpoint) -> str:
    files = collect_upload(folder, repo_id, stage=stage, base_model=base_model, model_card=model_card)
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                  for p, src in files.items()]
    stage_name = normalize_stage(stage or read_run_info(folder).get("stage") or "model")
    info = api.create_commit(repo_id, operations,
                             commit_message=commit_message or f"Upload {stage_name} with llama2_hf")
    logger.info("uploaded %d files to %s", len(operations), info.commit_url)
    return info.commit_url


__all__ = ["FAMILY_STAGES", "STAGES", "Family", "build_model_card", "collect_upload", "family_of", "find_base_model",
           "push_to_hub", "read_run_info", "remote_code_fixes"]
