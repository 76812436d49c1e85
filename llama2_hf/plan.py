"""`llama2-hf plan`: the memory one rank needs to run a recipe, per stage, before any GPU is rented.

    llama2-hf plan --config recipes/ppo/llama2-70b.yaml --num_gpus 8 --gpu_memory_gb 80

The recipe is read as its stage reads it (its keys checked against the stage's fields, the fields it leaves out at
their defaults); the stage comes from the launch line in the recipe's header (`--stage` overrides it), the launcher
(DDP, FSDP or ZeRO-3) from the `--config_file recipes/accelerate/<name>.yaml` there. Parameter counts are exact: every
model is built on the meta device from its config (a `config.json` in the recipe's model folder, of any family; else
a model of `KNOWN_CONFIGS` named in the path, e.g. Qwen2.5 7B; else the released Llama 2 size named in the path:
`Llama2Config.from_preset`; a name of another family plan has no shapes for is refused). The figures are bytes per rank, for each strategy and phase:

- weights, gradients, optimizer state of the trained models (AdamW: two float32 moments per trainable parameter).
  DDP replicates all three (plus DDP's gradient buckets, one more float32 copy of the gradients: torch's default
  `gradient_as_bucket_view=False`); FSDP2 shards the float32 weights, gradients and moments over the ranks (what
  `llama2_hf.distributed.shard_model` does, checked against the CPU FSDP2 runs in tests/test_fsdp.py); ZeRO-3 with bf16
  shards bf16 weights and gradients and a float32 master copy with the two moments (2 + 2 + 12 bytes per parameter,
  Rajbhandari et al. 2020). LoRA trains float32 adapters over a frozen base held in the recipe's `dtype`; QLoRA holds
  the base's decoder linears in 4-bit NF4 (0.5 byte per weight plus one absmax per 64, itself 8-bit with one float32
  per 256 blocks under `use_bnb_nested_quant`), the rest in `dtype`.
- in flight under FSDP: the root unit (embeddings, final norm, head: kept gathered through forward and backward) and
  three decoder layers in float32 (the one computing, the one prefetched, the unsharded gradient before its
  reduce-scatter); under ZeRO-3, two layers in bf16.
- frozen models: PPO's reference policy (sharded like the policy; none with LoRA: the disabled adapter is the
  reference) and the two reward models, replicated on every rank in `reward_dtype`; the sampling stages' model.
- activations of one micro-batch (training) or of one prefill layer (sampling). Per token and decoder layer, with
  bf16 autocast and a fused attention kernel (no T x T scores): 8h bytes for the float32 inputs of the two RMSNorms,
  2 (4h + 4 h_kv) for attention (normed input, q and k before and after RoPE, v, output) and 2 (h + 4i) for SwiGLU
  (normed input, gate, up, silu(gate), product), h the width, h_kv the key/value width, i the FFN width. With
  activation checkpointing only the float32 layer inputs (4h per layer) are kept, plus one layer recomputed. The LM
  loss is chunked (`fused_linear_ce`): three float32 logit chunks of 128 MiB.
- the sampler's KV cache: 2 (keys, values) x layers x h_kv x 2 bytes (bf16: the recipes compute in bf16) x rows x
  tokens, tokens = `--prompt_length` (an assumption: the recipes do not bound prompts) + `max_new_tokens`, at most the
  context; rows = prompts per generation batch x samples per prompt. Under FSDP the rollout gathers the policy's full
  float32 weights once (`generation.full_weights_for_generation`); ZeRO-3 gathers layer by layer.

A recipe fits when its peak is at most `--headroom` (default 90 %) of the card: the rest is the CUDA context, the
allocator's fragmentation and the communication buffers. When it does not fit, the plan lists changes that do.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .runner import UsageError, one_line_errors, run_command

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4, None: 4}
STRATEGIES = ("ddp", "fsdp", "zero3")
LAUNCHERS = {"cpu.yaml": "ddp", "ddp.yaml": "ddp", "fsdp.yaml": "fsdp", "multi_node.yaml": "fsdp",
             "deepspeed_zero3.yaml": "zero3"}
SIZE_IN_NAME = re.compile(r"(?<![0-9a-z])(7|13|34|70)b(?![0-9a-z])")
LOGIT_CHUNKS_BYTES = 3 * 2**27  # fused_linear_ce: a float32 logits chunk, its softmax and its gradient
# stage -> (kind, the recipe field giving rows per micro-batch or generation batch)
STAGE_KINDS = {"pretrain": "train", "sft": "train", "train-rm": "train", "rejection-sample": "rejection",
               "ppo": "ppo", "gatt": "sample", "distill": "sample", "refusals": "sample", "eval": "sample",
               "push": "none"}


@dataclass(frozen=True)
class ModelShape:
    """Exact parameter counts of one model, from its meta-device build."""

    params: int
    quantizable: int  # weights of the decoder layers' linears (what 4-bit loading quantizes)
    layer_params: int  # one decoder layer
    root_params: int  # outside the decoder layers (embeddings, final norm, head)
    lora: int  # adapter parameters at the recipe's rank and target modules (0 without LoRA)
    layers: int
    hidden: int
    kv_width: int
    ffn: int
    context: int


@dataclass
class Phase:
    """Bytes per rank of one phase of a stage under one strategy, by component."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Recipe:
    path: str
    stage: str
    values: dict  # every field of the stage: the recipe's value, else the field's default
    launcher: str | None  # ddp / fsdp / zero3 from the header's accelerate config, None if it names none


def _field_defaults(stage) -> dict:
    out = {}
    for cls in stage.dataclass_types:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def read_recipe(path: str, stage_name: str | None = None) -> Recipe:
    """The recipe's values for its stage (UsageError for a missing file, an unknown stage or key)."""
    from .runner import _check_recipe_keys
    from .stages import get_stage

    if not Path(path).is_file():
        raise UsageError(f"--config {path}: no such file")
    header = "\n".join(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    if stage_name is None:
        named = re.search(r"(?:llama2_hf\.cli|llama2-hf)\s+([a-z][a-z-]*)", header)
        if named is None:
            raise UsageError(f"--config {path}: its header names no `llama2-hf <stage>` launch line; pass --stage")
        stage_name = named.group(1)
    if stage_name not in STAGE_KINDS:
        raise UsageError(f"plan knows the stages {sorted(STAGE_KINDS)}, not {stage_name!r}")
    stage = get_stage(stage_name)
    values = {**_field_defaults(stage), **_check_recipe_keys(stage, path)}
    values.pop("env", None)
    launcher = re.search(r"recipes/accelerate/([\w.-]+\.yaml)", header)
    return Recipe(path, stage_name, values, LAUNCHERS.get(launcher.group(1)) if launcher else None)


# Shapes of the other families' recipe models (recipes/qwen2.5-7b/), from their published config.json: a Hub id is
# not read at plan time (offline), and a recipe's output folders (`out/qwen2.5-7b-sft`) do not exist yet.
KNOWN_CONFIGS = {
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 tie_word_embeddings=False)),
}
OTHER_FAMILIES = ("qwen", "mistral", "mixtral", "gemma", "phi", "falcon", "olmo", "deepseek", "yi-", "internlm")


@functools.cache
def _meta_counts(config_json: str, reward_head: bool, lora_key: tuple) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .configuration_llama2 import Llama2Config
    from .modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel

    values = json.loads(config_json)
    with torch.device("meta"):
        if values.get("model_type") == "llama2":
            config = Llama2Config.from_dict(values)
            model = (Llama2ForRewardModel if reward_head else Llama2ForCausalLM)(copy.deepcopy(config))
        else:  # another family: its own classes (the reward model: one label, as the stages load it)
            if reward_head:
                values = {**{k: v for k, v in values.items() if k not in ("id2label", "label2id")}, "num_labels": 1}
            config = AutoConfig.for_model(**values)
            model = (AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM).from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    rank, targets = lora_key
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(rank * (m.in_features + m.out_features) for name, m in model.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    layer_params = sum(p.numel() for p in layer.parameters())
    return ModelShape(params=params, quantizable=sum(m.weight.numel() for m in linears), layer_params=layer_params,
                      root_params=params - layer_params * config.num_hidden_layers, lora=lora,
                      layers=config.num_hidden_layers, hidden=config.hidden_size,
                      kv_width=config.num_key_value_heads * (getattr(config, "head_dim", None)
                                                             or config.hidden_size // config.num_attention_heads),
                      ffn=config.intermediate_size,
                      context=config.max_position_embeddings)


def model_config(name_or_path: str):
    """The config of a model folder (its config.json: Llama 2 or any family), else of the model its name names: a
    `KNOWN_CONFIGS` model, or the released Llama 2 size in the name. A name of another family that is not known is
    refused rather than sized as Llama 2."""
    from transformers import AutoConfig

    from .configuration_llama2 import Llama2Config

    folder = Path(str(name_or_path))
    if (folder / "config.json").is_file():
        if json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "llama2":
            return Llama2Config.from_json_file(str(folder / "config.json"))
        return AutoConfig.from_pretrained(str(folder))
    name = str(name_or_path).lower()
    for key, (model_type, values) in KNOWN_CONFIGS.items():
        if key in name:
            return AutoConfig.for_model(model_type, **values)
    family = next((f for f in OTHER_FAMILIES if f in name), None)
    if family is not None:
        raise UsageError(f"{name_or_path}: plan knows the shapes of Llama 2 sizes and {sorted(KNOWN_CONFIGS)}, not "
                         f"this {family.strip('-')} model: give a local folder with its config.json")
    size = SIZE_IN_NAME.search(name)
    if size is None:
        raise UsageError(f"{name_or_path}: not a folder with a config.json, and its name gives no Llama 2 size "
                         "(7b, 13b, 34b, 70b)")
    return Llama2Config.from_preset(size.group(0))


def shape_of(config, reward_head: bool = False, lora_r: int = 0, targets: Sequence[str] = ()) -> ModelShape:
    """Parameter counts of a config's causal LM (or reward model), built on the meta device: `Llama2Config` with this
    package's classes, any other family with the Auto classes."""
    return _meta_counts(config.to_json_string(use_diff=False), reward_head, (lora_r, tuple(sorted(targets or ()))))


def model_shape(name_or_path: str, reward_head: bool = False, lora_r: int = 0,
                targets: Sequence[str] = ()) -> ModelShape:
    return shape_of(model_config(name_or_path), reward_head, lora_r, targets)


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool) -> float:
    """Activation bytes kept for backward per token of a micro-batch (module docstring: the formula)."""
    h, kv, i = shape.hidden, shape.kv_width, shape.ffn
    per_layer = 8 * h + 2 * (4 * h + 4 * kv) + 2 * (h + 4 * i)
    if checkpointing:
        return 4 * h * shape.layers + per_layer
    return per_layer * shape.layers


def training_state(shape: ModelShape, strategy: str, num_gpus: int, dtype: str = "float32", lora: bool = False,
                   four_bit: bool = False, nested_quant: bool = False, extra_trainable: int = 0) -> dict[str, float]:
    """Weights, gradients and optimizer state per rank of one trained model (module docstring: the accounting).
    `extra_trainable`: parameters trained in full beside LoRA adapters (`lora_modules_to_save`)."""
    if lora:
        frozen = shape.params
        base = DTYPE_BYTES[dtype] * frozen
        if four_bit:
            per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if nested_quant else 4 / 64)
            base = per_weight * shape.quantizable + DTYPE_BYTES[dtype] * (frozen - shape.quantizable)
        trainable = shape.lora + extra_trainable
        # Adapters are small: every launcher replicates them (LoRA is launched with DDP).
        return {"weights": base + 4 * trainable, "gradients": 4 * trainable, "optimizer": 8 * trainable}
    n = shape.params
    if strategy == "ddp":
        return {"weights": DTYPE_BYTES[dtype] * n, "gradients": 2 * 4 * n, "optimizer": 8 * n}
    if strategy == "fsdp":
        return {"weights": 4 * n / num_gpus, "gradients": 4 * n / num_gpus, "optimizer": 8 * n / num_gpus}
    return {"weights": 2 * n / num_gpus, "gradients": 2 * n / num_gpus, "optimizer": 12 * n / num_gpus}


def _in_flight(shape: ModelShape, strategy: str, lora: bool) -> float:
    """Gathered units of a sharded model during its forward and backward (module docstring)."""
    if lora or strategy == "ddp":
        return 0.0
    if strategy == "fsdp":
        return 4.0 * (shape.root_params + 3 * shape.layer_params)
    return 2.0 * 2 * shape.layer_params


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int) -> float:
    return 2.0 * shape.layers * shape.kv_width * 2 * rows * min(tokens, shape.context)


def _replicated_weights(shape: ModelShape, dtype: str, v: dict) -> float:
    """A model as one process loads it to sample: its `dtype`, or 4-bit decoder linears with `load_in_4bit`."""
    if v.get("use_peft") and v.get("load_in_4bit"):
        return training_state(shape, "ddp", 1, dtype, True, True, bool(v.get("use_bnb_nested_quant")))["weights"]
    return DTYPE_BYTES[dtype] * shape.params


def plan_recipe(recipe: Recipe, num_gpus: int, strategy: str, prompt_length: int = 512) -> list[Phase]:
    """The phases of `recipe`'s stage on `num_gpus` ranks under `strategy`, bytes per rank by component."""
    v = recipe.values
    kind = STAGE_KINDS[recipe.stage]
    if kind == "none":
        return [Phase("upload", {})]  # reads the folder and uploads it: nothing on the accelerators
    lora = bool(v.get("use_peft"))
    rank, targets = (int(v.get("lora_r") or 0), v.get("lora_target_modules") or ()) if lora else (0, ())
    dtype = str(v.get("dtype") or "float32")
    compute_bytes = 2 if (v.get("bf16") or dtype in ("bfloat16", "float16")) else DTYPE_BYTES[dtype]
    checkpointing = bool(v.get("activation_checkpointing"))
    max_new = int(v.get("max_new_tokens") or 0)

    def trained(shape: ModelShape, reward_head: bool = False) -> dict[str, float]:
        # `lora_modules_to_save: [score]` trains the reward head (hidden x 1) in full beside the adapters
        extra = shape.hidden if reward_head and "score" in (v.get("lora_modules_to_save") or ()) else 0
        parts = training_state(shape, strategy, num_gpus, dtype, lora, bool(v.get("load_in_4bit")),
                               bool(v.get("use_bnb_nested_quant")), extra)
        return {**parts, "in flight": _in_flight(shape, strategy, lora)}

    def activations(shape: ModelShape, rows: int, tokens: int, lm_head: bool) -> float:
        return rows * tokens * activation_bytes_per_token(shape, checkpointing) + (LOGIT_CHUNKS_BYTES if lm_head else 0)

    def sampling(shape: ModelShape, rows: int, tokens: int) -> dict[str, float]:
        # the prefill holds one layer's activations at a time (no gradients), in the compute dtype
        per_layer = activation_bytes_per_token(shape, False) / shape.layers * compute_bytes / 4
        return {"activations": rows * tokens * per_layer, "kv cache": kv_cache_bytes(shape, rows, tokens)}

    def reward_models() -> float:
        paths = [p for p in (v.get("helpfulness_reward_model"), v.get("safety_reward_model")) if p]
        return sum(DTYPE_BYTES[v.get("reward_dtype", "float32")] * model_shape(p, reward_head=True).params
                   for p in paths)

    if kind == "train":
        reward_head = recipe.stage == "train-rm"
        shape = model_shape(v["model_name_or_path"], reward_head, rank, targets)
        rows = int(v["per_device_train_batch_size"]) * (2 if reward_head else 1)  # a pair: chosen and rejected
        return [Phase("training", {**trained(shape, reward_head),
                                   "activations": activations(shape, rows, int(v["max_length"]), not reward_head)})]
    shape = model_shape(v["model_name_or_path"], False, rank, targets)
    if kind == "sample":  # one replica per process
        rows = int(v.get("prompt_batch_size") or v.get("batch_size") or 1)
        tokens = prompt_length + max_new if max_new else shape.context
        return [Phase("sampling", {"frozen models": _replicated_weights(shape, dtype, v),
                                   **sampling(shape, rows, tokens)})]
    tokens = min(prompt_length + max_new, shape.context)
    if kind == "rejection":  # every process samples with a whole policy, then the Trainer fine-tunes it
        rows = int(v["prompt_batch_size"]) * int(v["num_samples"])
        sample = {"weights": _replicated_weights(shape, dtype, v), "frozen models": reward_models(),
                  **sampling(shape, rows, tokens)}
        train = {**trained(shape), "activations": activations(shape, int(v["per_device_train_batch_size"]),
                                                               int(v["max_length"]), True)}
        return [Phase("sampling", sample), Phase("training", train)]
    # PPO: policy and critic trained; the reference and the reward models frozen
    critic_source = v.get("value_model_name_or_path") or (
        v.get("helpfulness_reward_model") if v.get("value_model_init") == "reward_model" else v["model_name_or_path"])
    critic = model_shape(critic_source, reward_head=True)
    policy, critic_state = trained(shape), training_state(critic, strategy, num_gpus)
    states = {k: policy[k] + critic_state[k] for k in ("weights", "gradients", "optimizer")}
    frozen = reward_models()
    if not lora:  # the reference: a frozen copy of the policy, sharded like it (LoRA: the disabled adapter)
        full = DTYPE_BYTES[dtype] * shape.params
        frozen += full if strategy == "ddp" else full / num_gpus
    gathered = 4.0 * shape.params if strategy == "fsdp" and not lora else policy["in flight"]
    # Gradients are freed after each optimizer step (set to None): the rollout holds weights and moments only.
    rollout = {**states, "gradients": 0.0, "frozen models": frozen, "in flight": gathered,
               **sampling(shape, int(v["prompt_batch_size"]), tokens)}
    update = {**states, "frozen models": frozen, "in flight": policy["in flight"] + _in_flight(critic, strategy, False),
              "activations": int(v["micro_batch_size"]) * tokens * activation_bytes_per_token(shape, False)
              + LOGIT_CHUNKS_BYTES}
    return [Phase("rollout", rollout), Phase("update", update)]


# ---------------------------------------------------------------------------------------------------------------------
# Verdict, changes that fit, the command
# ---------------------------------------------------------------------------------------------------------------------

def peak(phases: Sequence[Phase]) -> float:
    return max(phase.total for phase in phases)


def _changes(recipe: Recipe, strategy: str, num_gpus: int) -> list[tuple[str, Recipe, str, int]]:
    """Single changes to try when the recipe does not fit: (what to write, recipe, strategy, GPUs)."""
    v, kind = recipe.values, STAGE_KINDS[recipe.stage]
    out = [(f"launch with {other} ({_launcher_file(other)})", recipe, other, num_gpus)
           for other in STRATEGIES if other != strategy and not v.get("use_peft") and kind != "sample"]

    def edited(**changes) -> Recipe:
        return dataclasses.replace(recipe, values={**v, **changes})

    if kind in ("train", "rejection") and not v.get("activation_checkpointing"):
        out.append(("activation_checkpointing: true", edited(activation_checkpointing=True), strategy, num_gpus))
    for key in ("per_device_train_batch_size", "micro_batch_size", "prompt_batch_size",
                "batch_size"):
        rows = v.get(key)
        while isinstance(rows, int) and rows > 1:
            rows //= 2
            out.append((f"{key}: {rows} (more accumulation keeps the global batch)" if "train" in key or "micro"
                        in key else f"{key}: {rows}", edited(**{key: rows}), strategy, num_gpus))
    if v.get("helpfulness_reward_model") and v.get("reward_dtype", "float32") == "float32":
        out.append(("reward_dtype: bfloat16", edited(reward_dtype="bfloat16"), strategy, num_gpus))
    if kind != "sample" and not v.get("use_peft"):
        lora = {"use_peft": True, "lora_r": 16, "lora_target_modules": [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
        out.append(("LoRA (the *-lora.yaml variant: use_peft, lora_r 16 on every linear)", edited(**lora), "ddp",
                    num_gpus))
        out.append(("QLoRA (the *-qlora.yaml variant: LoRA over a 4-bit base)",
                    edited(**lora, load_in_4bit=True, use_bnb_nested_quant=True), "ddp", num_gpus))
    if kind != "sample":
        more = num_gpus * 2
        while more <= 1024:
            out.append((f"{more} GPUs", recipe, strategy, more))
            more *= 2
    return out


def _launcher_file(strategy: str) -> str:
    return {"ddp": "recipes/accelerate/ddp.yaml", "fsdp": "recipes/accelerate/fsdp.yaml",
            "zero3": "recipes/accelerate/deepspeed_zero3.yaml"}[strategy]


def fixes(recipe: Recipe, strategy: str, num_gpus: int, budget: float, prompt_length: int) -> list[str]:
    """The single changes after which the recipe fits in `budget` bytes per rank (for each batch field and for
    the GPU count, only the largest value that fits)."""
    found, seen = [], set()
    for text, changed, how, gpus in _changes(recipe, strategy, num_gpus):
        key = text.split(":")[0] if ":" in text else ("gpus" if text.endswith("GPUs") else text)
        if key in seen:
            continue
        total = peak(plan_recipe(changed, gpus, how, prompt_length))
        if total <= budget:
            seen.add(key)
            found.append(f"{text}: peak {total / GIB:.1f} GiB")
    return found


def report(recipe: Recipe, num_gpus: int, gpu_memory_gb: float, prompt_length: int = 512,
           headroom: float = 0.9) -> tuple[str, bool]:
    """The printed plan and whether the recipe fits under its own launcher (every strategy when it names none)."""
    budget = gpu_memory_gb * GIB * headroom
    plans = {s: plan_recipe(recipe, num_gpus, s, prompt_length) for s in STRATEGIES}
    lines = [(f"llama2-hf plan: {recipe.path} (stage {recipe.stage}) on {num_gpus} GPU(s) of {gpu_memory_gb:g} "
              f"GiB; GiB per rank, fits at <= {headroom:.0%} of the card"),
             ("assumptions: AdamW with float32 moments; FSDP2 float32 shards, ZeRO-3 2+2+12 bytes per parameter; "
              "bf16 autocast activations per token and layer 8h + 2(4h + 4h_kv) + 2(h + 4i), float32 layer inputs "
              f"only with checkpointing; KV cache in bf16 for prompts of {prompt_length} tokens + max_new_tokens "
              "(see `llama2_hf.plan`)")]
    names = list(dict.fromkeys(f"{p.name}: {part}" for ps in plans.values() for p in ps for part in p.parts))
    width = max([len(n) for n in names] + [24])
    lines.append(f"{'':<{width}}" + "".join(f"{s:>10}" for s in STRATEGIES))
    for name in names:
        phase, part = name.split(": ", 1)
        row = [next((p.parts.get(part, 0.0) for p in plans[s] if p.name == phase), 0.0) for s in STRATEGIES]
        lines.append(f"{name:<{width}}" + "".join(f"{x / GIB:>10.2f}" for x in row))
    lines.append(f"{'peak':<{width}}" + "".join(f"{peak(plans[s]) / GIB:>10.2f}" for s in STRATEGIES))
    lines.append(f"{'fits':<{width}}" + "".join(f"{'yes' if peak(plans[s]) <= budget else 'no':>10}"
                                                 for s in STRATEGIES))
    own = [recipe.launcher] if recipe.launcher and not recipe.values.get("use_peft") else (
        ["ddp"] if recipe.values.get("use_peft") else list(STRATEGIES))
    fits = any(peak(plans[s]) <= budget for s in own)
    how = "/".join(own)
    if not any(p.parts for p in plans[own[0]]):
        lines.append(f"verdict: {recipe.stage} places nothing on the GPUs (it reads the model folder on the CPU)")
    elif fits:
        lines.append(f"verdict: the recipe fits with {how}")
    else:
        phase = max(plans[own[0]], key=lambda p: p.total)
        part, size = max(phase.parts.items(), key=lambda kv: kv[1])
        lines.append(f"verdict: the recipe does not fit with {how} (peak in {phase.name}, largest part {part}: "
                     f"{size / GIB:.1f} GiB); single changes that fit:")
        found = fixes(recipe, own[0], num_gpus, budget, prompt_length)
        lines += [f"  - {f}" for f in found] or [("  - none of the single changes tried (other launcher, activation "
                                                  "checkpointing, smaller batches, bf16 reward models, LoRA/QLoRA, "
                                                  "more GPUs up to 1024)")]
    return "\n".join(lines), fits


@dataclass
class PlanArguments:
    """`llama2-hf plan`'s flags."""

    config: str = field(metadata={"help": "A stage's recipe (YAML)."})
    num_gpus: int = field(default=8, metadata={"help": "Ranks (GPUs) the stage runs on."})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "Memory of one GPU, GiB."})
    stage: str | None = field(default=None, metadata={
        "help": "The recipe's stage, when its header names no `llama2-hf <stage>` launch line."})
    prompt_length: int = field(default=512, metadata={
        "help": "Prompt tokens assumed for the samplers' KV cache (the recipes do not bound prompts)."})
    headroom: float = field(default=0.9, metadata={
        "help": "Fraction of the card the plan may use (the rest: CUDA context, fragmentation, buffers)."})

    def __post_init__(self):
        for name in ("num_gpus", "gpu_memory_gb", "prompt_length"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{name} must be > 0, got {value}")
        if not 0 < self.headroom <= 1:
            raise UsageError(f"--headroom is a fraction of the card, in (0, 1], got {self.headroom}")


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = one_line_errors(HfArgumentParser(PlanArguments, prog="llama2-hf plan",
                                              description=__doc__.split("\n\n")[0]))

    def body(args: list[str]) -> None:
        (ns,) = parser.parse_args_into_dataclasses(args)
        print(report(read_recipe(ns.config, ns.stage), ns.num_gpus, ns.gpu_memory_gb, ns.prompt_length,
                     ns.headroom)[0])

    return run_command("plan", sys.argv[1:] if argv is None else argv, body)


__all__ = ["ModelShape", "Phase", "PlanArguments", "Recipe", "activation_bytes_per_token", "fixes", "kv_cache_bytes",
           "main", "model_shape", "peak", "plan_recipe", "read_recipe", "report", "shape_of", "training_state"]
