"""The paper's reward models (helpfulness, safety; §3.2.2) as a thin subclass of TRL's `RewardTrainer`.

What it adds to TRL: preference rows in our schema (`llama2_hf.data`) tokenized as full Llama 2-Chat dialogs ending
with EOS (the reward is read at that last token); the Table 27 margin m(rating) fed through TRL's `margin` column
(TRL's loss is `-log sigmoid(r_c - r_r - m)`, i.e. `llama2_hf.losses.margin_ranking_loss`); an optional safety
auxiliary loss (the paper, §A.3.4 and Table 29, reports adding one to the Safety RM but gives neither its form nor its
weight: both are ours, see `safety_aux_loss_coef`); metrics per rating (Table 8 layout), per safety bin, reward
mean/std and unsafe-response recall; initialisation from a causal-LM checkpoint; the paper's optimiser and schedule as
defaults.

    trainer = Llama2RewardTrainer(model=sft_model_or_path, args=Llama2RewardConfig(output_dir="rm"),
                                  train_dataset=preferences, processing_class=tokenizer)
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from datasets import Dataset, IterableDataset
from trl import RewardConfig, RewardTrainer

from ..collators import ChunkSortedSampler, DataCollatorForRatedPreference
from ..data import (
    ON_INVALID,
    ON_OVERLENGTH,
    DataReport,
    check_policies,
    prepare_preference_dataset,
    response_safety,
)
from ..distributed import FullyShardedTrainerMixin
from ..loading import load_pretrained, reward_pad_token
from ..losses import resolve_margins, safety_auxiliary_loss
from ..modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel
from ..rm_eval import preference_metrics
from .sft import (
    GRADIENT_ACCUMULATION_HELP, apply_global_batch_size, carry_checkpointing_default, example_limit, load_tokenizer,
)

logger = logging.getLogger(__name__)


@dataclass
class Llama2RewardConfig(RewardConfig):
    """`RewardConfig` with the paper's RM recipe as defaults (§3.2.2, optimiser as pretraining §2.2).

    The paper does not say which Table 27 margin the final RMs used (default here: `small`, the best average in
    Table 28). For the safety auxiliary loss it states only that one was added to the Safety RM (§A.3.4) and its
    effect in Table 29 (Meta Safety average accuracy 63.7 -> 64.5, unsafe-response recall 73.0 -> 90.4 at score
    0.5); the form (`llama2_hf.losses.safety_auxiliary_loss`) and the weight (`safety_aux_loss_coef`, off by default,
    1.0 in the safety recipes) are our choices.
    Use `Llama2RewardConfig.for_model_size("70b", ...)` for the 70B learning rate.
    """

    _VALID_DICT_FIELDS = RewardConfig._VALID_DICT_FIELDS + ["margin"]

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak LR (1e-5; 5e-6 for 70B: paper §3.2.2)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr",
                                   metadata={"help": "Cosine decay to lr_scheduler_kwargs.min_lr_rate (§3.2.2)."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 0.1},
        metadata={"help": "Scheduler options; min_lr_rate 0.1: cosine down to a tenth of the peak (§3.2.2)."})
    warmup_steps: float = field(default=0.03, metadata={
        "help": "Warmup, as a fraction of the steps if < 1 (0.03: paper §3.2.2), at least min_warmup_steps."})
    min_warmup_steps: int = field(default=5, metadata={"help": "Lower bound of the warmup (5 steps: §3.2.2)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (1: longer over-fits, §3.2.2)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (0.9: §2.2)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95: §2.2)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5: §2.2)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (0.1: §2.2)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (1.0: §2.2)."})
    max_length: int | None = field(default=4096, metadata={"help": "Longest dialog in tokens (the 4096 context)."})
    global_batch_size: int | None = field(default=512, metadata={
        "help": "Pairs per optimizer step over all processes (512: paper §3.2.2); sets gradient_accumulation_steps. "
                "None leaves gradient_accumulation_steps as given."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": GRADIENT_ACCUMULATION_HELP})
    # Typed `str` for the command line (argparse would run a `dict` type on the string default); a JSON map is
    # parsed in __post_init__ (`_VALID_DICT_FIELDS`), and Python callers may pass the dict itself.
    margin: str = field(default="small", metadata={
        "help": "m(rating) of paper Eq. 2: a Table 27 preset ('none', 'small', 'large') or a JSON map "
                "{rating: margin} for all four ratings."})
    safety_aux_loss_coef: float = field(default=0.0, metadata={
        "help": "Weight of the safety auxiliary loss on responses with a safety label (0: off). The paper (§A.3.4, "
                "Table 29) says a safety auxiliary loss was added to the Safety RM but gives neither its form nor "
                "its weight: both are ours (binary cross-entropy of sigmoid(reward) against the response's "
                "safe/unsafe label, added to the ranking loss with this weight)."})
    sort_microbatches_by_length: bool = field(default=True, metadata={
        "help": "Order the pairs of each optimizer step longest first, so micro-batches pad less (same random set "
                "per step and the same loss: our choice, the paper does not discuss batching)."})
    unsafe_threshold: float = field(default=0.5, metadata={
        "help": "sigmoid(reward) below this flags a response unsafe, for the unsafe_recall metric (0.5: Tab 29)."})
    on_invalid: str = field(default="error", metadata={
        "help": "Invalid rows (missing fields, unknown rating, identical or empty responses, bad roles): 'error' or "
                "'drop' (counted and logged).", "choices": list(ON_INVALID)})
    on_overlength: str = field(default="error", metadata={
        "help": "Dialogs over max_length: 'error', 'truncate' (keep the end, where the reward is read) or 'drop'.",
        "choices": list(ON_OVERLENGTH)})

    def __post_init__(self):
        apply_global_batch_size(self)
        carry_checkpointing_default(self)
        super().__post_init__()
        checked = resolve_margins(self.margin)  # fails early on an unknown preset or an incomplete map
        if isinstance(self.margin, dict):
            self.margin = checked
        check_policies(self.on_invalid, self.on_overlength)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """`warmup_steps` (a fraction of the steps when < 1), but at least `min_warmup_steps` (paper: 3%, >= 5)."""
        return min(num_training_steps, max(super().get_warmup_steps(num_training_steps), self.min_warmup_steps))

    @classmethod
    def for_model_size(cls, size: str, **kwargs) -> "Llama2RewardConfig":
        """The config for a Llama 2 size: peak LR 5e-6 for 70B, 1e-5 for the others (paper §3.2.2)."""
        kwargs.setdefault("learning_rate", 5e-6 if size.lower() == "70b" else 1e-5)
        return cls(**kwargs)


def is_causal_lm(model) -> bool:
    """Whether `model` is a causal LM (next-token head) of this package or of any transformers family."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(model, Llama2ForCausalLM) or type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def new_reward_model(causal_lm):
    """A reward model of the causal LM's family with its config (`num_labels=1`) and freshly initialised weights: a
    `Llama2ForRewardModel` for a `Llama2ForCausalLM`, else the sequence classifier of the LM's own family
    (`AutoModelForSequenceClassification`), whose `architectures` then name that class. A PEFT model gives the
    reward model of its base model."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    if isinstance(base, Llama2ForCausalLM):
        config.architectures = ["Llama2ForRewardModel"]
        return Llama2ForRewardModel(config)
    from transformers import AutoModelForSequenceClassification

    reward_model = AutoModelForSequenceClassification.from_config(config)
    reward_model.config.architectures = [type(reward_model).__name__]
    return reward_model


def reward_model_from_causal_lm(causal_lm):
    """A reward model whose decoder is a copy of the causal LM's (§3.2.2: RMs start from chat checkpoints); the
    next-token head is replaced by a freshly initialised scalar head `score`. A `Llama2ForCausalLM` gives a
    `Llama2ForRewardModel`; a causal LM of another family the sequence classifier of its own family
    (`AutoModelForSequenceClassification`, `num_labels=1`; see `new_reward_model`)."""
    reward_model = new_reward_model(causal_lm)
    reward_model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    param = next(causal_lm.parameters())
    return reward_model.to(device=param.device, dtype=param.dtype)


class Llama2RewardTrainer(FullyShardedTrainerMixin, RewardTrainer):
    """TRL's `RewardTrainer` for the paper's helpfulness / safety reward models.

    `model`: a reward model (`Llama2ForRewardModel`, or a transformers sequence classifier with `num_labels=1`); a
    causal LM of any family (converted with `reward_model_from_causal_lm`); or a path/id of either (a causal-LM
    checkpoint gets a new head; a checkpoint that is not `model_type: llama2` loads as its own family). Dialogues are
    laid out in the tokenizer's chat format (`llama2_hf.chat_format`); the pad token is one that never ends a
    dialogue (`llama2_hf.loading.reward_pad_token`), so the head reads every row's last real token. Datasets follow the preference schema of
    `llama2_hf.data` (or are already prepared by `prepare_preference_dataset`). Preparation reports are in
    `trainer.data_reports[name]`. Logged metrics add `accuracy_<rating>`, `accuracy_<safety bin>`, `reward_std`,
    `unsafe_recall` / `unsafe_precision` (pairs with safety labels) and `safety_aux_loss` (when enabled); the
    `accuracy` key is the exact accuracy over the pairs of the logging window (or of the whole eval set). Under an
    FSDP accelerate config on CPU the model is sharded with FSDP2 (`llama2_hf.distributed.FullyShardedTrainerMixin`).
    """

    _tag_names = ["trl", "reward-trainer", "llama2_hf"]

    def __init__(self, model, args: Llama2RewardConfig | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | dict[str, Dataset] | None = None, processing_class=None,
                 data_collator=None, **kwargs):
        if args is None:
            name = (model if isinstance(model, str) else model.config._name_or_path or "llama2").rstrip("/")
            args = Llama2RewardConfig(output_dir=f"{name.split('/')[-1]}-Reward")
        if not isinstance(args, Llama2RewardConfig):
            raise TypeError(f"args must be a Llama2RewardConfig, got {type(args).__name__}")
        if processing_class is None:
            processing_class = load_tokenizer(model)
        if isinstance(model, str):
            init_kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {})}
            if kwargs.get("quantization_config") is not None:
                init_kwargs["quantization_config"] = kwargs.pop("quantization_config")
            model = load_pretrained(Llama2ForRewardModel, model, "reward model", new_head=True, **init_kwargs)
        elif is_causal_lm(model):
            model = reward_model_from_causal_lm(model)
        # A pad that never ends a dialogue (Llama 2: unk, as every dialog ends with EOS): transformers' heads read the
        # reward at the rightmost token that is not the pad (TRL copies the pad id into the model's config).
        reward_pad_token(processing_class)
        if data_collator is None:
            data_collator = DataCollatorForRatedPreference(processing_class.pad_token_id, args.pad_to_multiple_of)
        self.data_reports: dict[str, DataReport] = {}
        self._example_limit = example_limit(model, args.max_length)
        self._pairs: dict[str, list[torch.Tensor]] = defaultdict(list)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._shard_for_launch()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Tokenize preference rows as full dialogs, with the margin of each pair's rating (policies applied)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError("Llama2RewardTrainer needs a map-style datasets.Dataset")
        if {"chosen_ids", "rejected_ids", "margin", "rating_id"} <= set(dataset.column_names):  # already prepared
            return dataset
        dataset, report = prepare_preference_dataset(
            dataset, processing_class, max_length=self._example_limit, margins=args.margin, on_invalid=args.on_invalid,
            on_overlength=args.on_overlength, num_proc=args.dataset_num_proc, name=dataset_name)
        self.data_reports[dataset_name] = report
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "rating_id", "safety_bin", "length"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.args.sort_microbatches_by_length or "length" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        step = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ChunkSortedSampler(dataset["length"], step, seed=seed)

    def _get_eval_sampler(self, eval_dataset):
        # Evaluation order does not change the metrics: longest first pads least (single process only).
        if self.args.world_size > 1 or "length" not in eval_dataset.column_names:
            return super()._get_eval_sampler(eval_dataset)
        lengths = torch.as_tensor(eval_dataset["length"])
        return torch.argsort(lengths, descending=True, stable=True).tolist()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's margin ranking loss (+ the optional safety auxiliary loss); keeps each pair's rewards and labels
        for the per-rating / per-bin metrics."""
        mode = "train" if self.model.training else "eval"
        rating_id, safety_bin = inputs.pop("rating_id", None), inputs.pop("safety_bin", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        rewards = outputs.logits.squeeze(-1)  # (2B,): chosen rows, then rejected rows
        unknown = torch.full((rewards.shape[0] // 2,), -1, device=rewards.device)  # a collator without pair labels
        rating_id = unknown if rating_id is None else rating_id
        safety_bin = unknown if safety_bin is None else safety_bin
        if self.args.safety_aux_loss_coef:
            aux = safety_auxiliary_loss(rewards, torch.cat(response_safety(safety_bin)))
            loss = loss + self.args.safety_aux_loss_coef * aux
            gathered = self.accelerator.gather_for_metrics(aux.detach())
            self._metrics[mode]["safety_aux_loss"].append(gathered.mean().item())
        chosen, rejected = rewards.detach().float().chunk(2)
        pairs = torch.stack([chosen, rejected, rating_id.float(), safety_bin.float()], dim=1)  # (B, 4)
        self._pairs[mode].append(self.accelerator.gather_for_metrics(pairs).cpu())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if self._pairs[mode]:
            pairs = torch.cat(self._pairs[mode])
            self._pairs[mode].clear()
            metrics = preference_metrics(pairs[:, 0], pairs[:, 1], pairs[:, 2].long(), pairs[:, 3].long(),
                                         self.args.unsafe_threshold)
            self._metrics[mode].pop("accuracy", None)  # TRL's mean of batch accuracies; ours is exact
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: v for k, v in metrics.items()})
        super().log(logs, start_time)
