"""`llama2-hf demo`: a tiny Llama 2 and tokenizer built on the spot, trained for a minute on CPU, that chats.

It exercises the model family end to end (tokenizer training, chat format, training step, KV-cache generation,
save/load) without any download.
"""

from __future__ import annotations

import argparse
import logging
import random

import torch
from tqdm.auto import trange

from .configuration_llama2 import Llama2Config
from .modeling_llama2 import Llama2ForCausalLM
from .tokenization_llama2 import encode_chat_with_mask, encode_dialog, train_llama2_tokenizer

logger = logging.getLogger(__name__)


def arithmetic_dialogs(n: int, seed: int = 0) -> list[list[dict]]:
    """Chats asking for the sum of two small numbers, answered correctly."""
    rng = random.Random(seed)
    dialogs = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        dialogs.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}])
    return dialogs


def run_demo(output_dir: str | None = None, steps: int = 300, seed: int = 0) -> dict:
    """Train the tiny chat model and return sample answers and the final loss."""
    torch.manual_seed(seed)
    dialogs = arithmetic_dialogs(2000, seed)
    corpus = [f"[INST] {d[0]['content']} [/INST] {d[1]['content']}" for d in dialogs]
    tokenizer = train_llama2_tokenizer(corpus, vocab_size=400)
    model = Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=len(tokenizer)))
    encoded = [encode_chat_with_mask(tokenizer, d) for d in dialogs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in trange(steps, desc="demo training"):
        batch = [encoded[(step * 32 + i) % len(encoded)] for i in range(32)]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [tokenizer.eos_token_id] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([[t if m else -100 for t, m in zip(e.input_ids, e.assistant_mask)]
                               + [-100] * (width - len(e.input_ids)) for e in batch])
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    answers = {}
    for a, b in [(2, 3), (4, 4), (7, 1)]:
        question = f"What is {a} plus {b}?"
        prompt = torch.tensor([encode_dialog(tokenizer, [{"role": "user", "content": question}])])
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
        answers[question] = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    if output_dir:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return {"final_loss": loss.item(), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama2-hf demo", description=__doc__)
    parser.add_argument("--output-dir", help="save the trained tiny model and tokenizer here")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = run_demo(args.output_dir, args.steps, args.seed)
    print(f"final answer-only loss: {result['final_loss']:.3f}")
    for q, a in result["answers"].items():
        print(f"[INST] {q} [/INST] {a}")
    return 0
