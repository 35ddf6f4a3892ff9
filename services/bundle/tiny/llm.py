"""Tiny Llama (head_dim 32, the smallest vLLM's CPU attention accepts) and a PEFT LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.bundle.release import LORA_TARGETS

HIDDEN_SIZE = 128
NUM_HEADS = 4
LORA_RANK = 8


def build_llm(out_dir: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def build_lora(out_dir: Path, base: LlamaForCausalLM, seed: int) -> None:
    """A LoRA on q/k/v/o like the release's (r=32, alpha=32 there), with non-zero B so it changes outputs."""
    torch.manual_seed(seed + 1)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out_dir))
    # get_peft_model injected layers into `base`; take them out so the caller's model stays the base model.
    peft_model.unload()
