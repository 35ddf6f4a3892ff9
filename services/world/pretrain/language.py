"""The language model stand-in (Vicuna's part): a Llama trained on the world's text.

Its tokenizer is a byte-level BPE trained on the world's text with BOS in front like Llama's, and the release's
38 added tokens appended in the release's order (so ``###`` is one token, the stop id, and the signal tokens are
plain added tokens as in NExT-GPT). Signal-token rows are trained later, by NExT-GPT's own stages.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.bundle.release import STOP_STRING, add_release_tokens
from services.world.pretrain.loop import LoopConfig, device, local_shard, train_part
from services.world.attributes import ATTRIBUTES, CLASSES, WORLD_MODALITIES, Attributes, caption
from services.world.text import ANSWERS, QUESTIONS, text_corpus, turn

WORLD_LM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
MAX_TOKENS = 64


def build_world_tokenizer(corpus: list[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=2048, padding_side="right")
    if len(fast.encode(STOP_STRING, add_special_tokens=False)) != 1:
        raise RuntimeError(f"world tokenizer: {STOP_STRING!r} (the stop token) must encode to one id")
    add_release_tokens(fast)
    return fast


def build_world_lm(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    heads = WORLD_LM["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=len(tokenizer), num_key_value_heads=heads, head_dim=WORLD_LM["hidden_size"] // heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32", **WORLD_LM,
    )
    return LlamaForCausalLM(config)


def pretrain_language(cfg: LoopConfig, workdir: Path, out: Path, batch_size: int = 64, corpus_size: int = 20_000,
                      progress: bool = True) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(cfg.seed)
    corpus = text_corpus(cfg.seed, corpus_size)
    tokenizer = build_world_tokenizer(corpus)
    model = build_world_lm(tokenizer)
    encoded = tokenizer(corpus, max_length=MAX_TOKENS, truncation=True, padding="max_length", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(ids), (batch_size,), generator=generator))
        # Cut the batch to its longest text (the corpus is padded to MAX_TOKENS, most texts are half that): the
        # same loss for a fraction of the compute, so the recipe affords the steps copying needs.
        length = int(mask[pick].sum(dim=1).max())
        x, m = ids[pick, :length].to(device()), mask[pick, :length].to(device())
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        labels = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        return {"nll": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)}

    train_part("language", model, step_loss, cfg, workdir, progress=progress)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return model, tokenizer


@torch.inference_mode()
def answer_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, count: int = 240,
                    seed: int = 1_000_003) -> dict[str, float]:
    """Held-out check of the language stand-in: questions about things described in words, on class combinations
    and phrasings drawn with a seed no corpus uses. Per attribute, the fraction whose greedy answer word is right
    (the answer's frame, "It is" / "It is moving", is given); "repeat", the fraction of "Say X again." answered
    with exactly X."""
    rng = random.Random(seed)
    right: dict[str, list[bool]] = {}
    model.eval()
    for i in range(count):
        modality = WORLD_MODALITIES[i % len(WORLD_MODALITIES)]
        attrs = Attributes(**{name: rng.choice(CLASSES[name]) for name in ATTRIBUTES[modality]})
        thing = caption(modality, attrs)
        name = rng.choice(ATTRIBUTES[modality])
        answer = ANSWERS[name].format(value=getattr(attrs, name))
        frame = turn(rng.choice(QUESTIONS[name]).format(thing=thing), answer[:answer.rfind(" ")])
        prompt = frame[:frame.rfind("\n###")]
        logits = model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)).logits
        word = tokenizer.decode([int(logits[0, -1].argmax())]).strip()
        right.setdefault(name, []).append(word == getattr(attrs, name))
        if i % 4 == 0:
            ids = tokenizer(turn(f"Say {thing} again.", "")[:-len(" \n###")], return_tensors="pt").input_ids
            out = model.generate(ids.to(model.device), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            said = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
            right.setdefault("repeat", []).append(said.rstrip(".").lower() == thing)
    return {name: sum(v) / len(v) for name, v in right.items()}
