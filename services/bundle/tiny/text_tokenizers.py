"""Tokenizers built offline: a trained byte-level BPE for the LLM, byte-only CLIP and Roberta for the decoders."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from services.bundle.release import STOP_STRING, add_release_tokens

_WORDS = (
    "the a an of to and in is it that for on with as this was are be at by from or have not but what all "
    "were when we there can your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know image picture photo video clip sound audio music voice dog cat bird car tree sky sea city man "
    "woman child red blue green white black small large happy playing running sitting standing beautiful "
    "generate show me here is please describe"
).split()
_TEMPLATE_PIECES = ("### Human:", "### Assistant:", "\n###", "###", " Human: ", "\n### Assistant: ")


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        sentence = sentence.capitalize() + rng.choice([".", "?", "!", ","])
        out.append(f"{rng.choice(_TEMPLATE_PIECES)} {sentence}")
    return out


def build_base_tokenizer(seed: int, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Vicuna stand-in: a trained byte-level BPE (every string encodes) with BOS added like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama's tokenizer: BOS in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        model_max_length=2048, padding_side="right",
    )
    if len(fast.encode(STOP_STRING, add_special_tokens=False)) != 1:
        raise RuntimeError(f"tiny tokenizer: {STOP_STRING!r} (the stop token) must encode to one id")
    return fast


def build_llm_tokenizer(out_dir: Path, seed: int, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    fast = build_base_tokenizer(seed, vocab_size)
    add_release_tokens(fast)
    fast.save_pretrained(str(out_dir))
    return fast


def _byte_unicode() -> list[str]:
    """The printable stand-ins that byte-level BPE vocabularies use for the 256 byte values (GPT-2 scheme)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_tokenizer_files(out_dir: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single bytes (no merges); enough to tokenize the unconditional ``""``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def write_roberta_tokenizer_files(out_dir: Path) -> tuple[Path, Path]:
    """A Roberta BPE vocabulary of single bytes, for the CLAP text encoder of AudioLDM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in _byte_unicode():
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path
