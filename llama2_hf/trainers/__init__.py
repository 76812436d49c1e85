"""TRL trainers for the Llama 2-Chat stages: SFT (paper §3.1) and the reward models (§3.2.2)."""

from .reward import Llama2RewardConfig, Llama2RewardTrainer, reward_model_from_causal_lm
from .sft import Llama2SFTConfig, Llama2SFTTrainer

__all__ = ["Llama2RewardConfig", "Llama2RewardTrainer", "Llama2SFTConfig", "Llama2SFTTrainer",
           "reward_model_from_causal_lm"]
