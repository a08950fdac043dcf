"""Tokenizers: a tiny byte-level BPE for tests and tiny presets, and loading a saved one.

The released checkpoint ships Qwen3's tokenizer files; `load_tokenizer` reads those as well. The tiny
tokenizer mirrors the parts of Qwen3's that the prompts rely on: byte-level BPE (every string encodes),
`<|endoftext|>` as pad, `<|im_end|>` as eos, and chat/think markers that are never split. `<image>` is
deliberately not a token: `prompts.tokenize_prompt` maps placeholders to reserved ids itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .config import PUBLISHED_T2I_PREFIX
from .prompts import UNCOND_TEXT

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
# As in Qwen3 these are added (never split) but not "special": decoding with skip_special_tokens keeps them.
THINK_TOKENS = ("<think>", "</think>")
CHAT_TOKENS = SPECIAL_TOKENS + THINK_TOKENS


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; the full vocab (specials included) has at most vocab_size ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(CHAT_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte tokens + {len(CHAT_TOKENS)} chat "
                         f"tokens need at least {minimum}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),  # the think tokens are added after training
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..2, matched before BPE so they never split
        initial_alphabet=alphabet,  # all 256 bytes, so any string can be encoded
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def load_tokenizer(directory: str | Path):
    """Load a saved tokenizer (ours or the checkpoint's Qwen3 one) and check the chat tokens are single ids."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    split = [t for t in CHAT_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if split:
        raise ValueError(f"tokenizer in {str(directory)!r} splits the chat tokens {split}; the prompts need each "
                         "of them as a single id")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "cube", "sphere", "line", "dot")
_SIZES = ("small", "large", "tiny", "big", "medium")
_COUNTS = ("one", "two", "three", "four", "five", "1", "2", "3", "4", "5")
_RELATIONS = ("to the left of", "to the right of", "above", "below", "next to", "inside", "on top of")


def default_corpus() -> list[str]:
    """A few hundred short sentences covering the prompt templates and the synthetic-scene vocabulary."""
    corpus = [
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        PUBLISHED_T2I_PREFIX, UNCOND_TEXT, "Image 1: Image 2: Image 3:",
        "What is in the image? Describe the image. How many objects are there? What color is it?",
        "Change the color of the object. Make it larger. Remove the background. Add a shape.",
        "Yes. No. There is a picture of a scene with objects on a plain background.",
    ]
    for colour, shape, size in itertools.product(_COLOURS, _SHAPES, _SIZES):
        corpus.append(f"a {size} {colour} {shape}")
    for (c1, s1), rel, (c2, s2) in zip(itertools.product(_COLOURS, _SHAPES), itertools.cycle(_RELATIONS),
                                       itertools.product(reversed(_COLOURS), reversed(_SHAPES)), strict=False):
        corpus.append(f"The {c1} {s1} is {rel} the {c2} {s2}.")
    for count, colour, shape in zip(itertools.cycle(_COUNTS), itertools.cycle(_COLOURS), _SHAPES * 3,
                                    strict=False):
        corpus.append(f"There are {count} {colour} {shape}s. How many {shape}s are there? {count}")
    return corpus
