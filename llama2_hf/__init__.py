"""llama2_hf: the Llama 2 / Llama 2-Chat method (Touvron et al. 2023) in the Hugging Face ecosystem.

Importing the package registers the model family with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, `AutoTokenizer`) for `model_type="llama2"`, and
marks the classes for remote code so that `save_pretrained` / `push_to_hub` write the code and a full `auto_map`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .configuration_llama2 import (
    LLAMA2_AUTO_MAP,
    Llama2Config,
    compute_intermediate_size,
)
from .console import drop_library_notices
from .modeling_llama2 import (
    Llama2ForCausalLM,
    Llama2ForRewardModel,
    Llama2ForSequenceClassification,
    Llama2Model,
    Llama2PreTrainedModel,
)
from .tokenization_llama2 import (
    Llama2Tokenizer,
    encode_chat_with_mask,
    encode_dialog,
    train_llama2_tokenizer,
    validate_messages,
)

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(Llama2Config.model_type, Llama2Config, exist_ok=True)
    AutoModel.register(Llama2Config, Llama2Model, exist_ok=True)
    AutoModelForCausalLM.register(Llama2Config, Llama2ForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(Llama2Config, Llama2ForSequenceClassification, exist_ok=True)
    AutoTokenizer.register(Llama2Config, fast_tokenizer_class=Llama2Tokenizer, exist_ok=True)
    Llama2Config.register_for_auto_class()
    Llama2Model.register_for_auto_class("AutoModel")
    Llama2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    Llama2ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    Llama2ForRewardModel.register_for_auto_class("AutoModelForSequenceClassification")
    Llama2Tokenizer.register_for_auto_class("AutoTokenizer")


_register()
drop_library_notices()  # importing the package imports neither bitsandbytes nor DeepSpeed: in place before they print

__all__ = [
    "LLAMA2_AUTO_MAP", "Llama2Config", "Llama2ForCausalLM", "Llama2ForRewardModel", "Llama2ForSequenceClassification",
    "Llama2Model", "Llama2PreTrainedModel", "Llama2Tokenizer", "compute_intermediate_size", "encode_chat_with_mask",
    "encode_dialog", "train_llama2_tokenizer", "validate_messages",
]
