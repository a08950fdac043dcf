"""Prompts in: the Qwen3 chat templates of understanding and generation, prompts -> ids with the image
placeholders expanded, truncation, training labels, padding, and `prepare_inputs`, which chains them with
the images (`images.py`) into the tensors the model's forward takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import PUBLISHED_T2I_PREFIX
from .images import ImageSource, image_patches, num_visual_tokens

if TYPE_CHECKING:
    from .config import OvisU1Config

# Reserved ids of the published code. They are negative so they can never collide with a vocab id; the
# model swaps them for visual/indicator embeddings before the embedding lookup.
IGNORE_ID = -100
IMAGE_TOKEN_ID = -200
VISUAL_ATOM_ID = -300
INDICATOR_IDS = (-301, -302, -303, -304)
IMAGE_PLACEHOLDER = "<image>"

UNCOND_TEXT = "Generate an image."


# --------------------------------------------------------------------------------------------------
# Prompts (Qwen3 chat template)
# --------------------------------------------------------------------------------------------------


Turn = tuple[str, str]  # an earlier exchange of a conversation: (question, answer)


def check_history(history) -> list[Turn]:
    """Earlier turns as a list of (question, answer) string pairs; anything else is refused."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    turns = []
    for k, turn in enumerate(history):
        if (isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2
                or not all(isinstance(x, str) for x in turn)):
            raise ValueError(f"history[{k}] must be a (question, answer) pair of strings, got {turn!r}")
        if not turn[0].strip():
            raise ValueError(f"history[{k}] has an empty question")
        if IMAGE_PLACEHOLDER in turn[1]:
            raise ValueError(f"answers are text only; found {IMAGE_PLACEHOLDER} in history[{k}]'s answer")
        turns.append((turn[0], turn[1]))
    return turns


def _user_contents(questions: Sequence[str], num_images: int) -> list[str]:
    """Each user turn's content: images sit at the questions' `<image>` placeholders, else open the first turn."""
    found = sum(q.count(IMAGE_PLACEHOLDER) for q in questions)
    if found:
        if found != num_images:
            raise ValueError(f"question has {found} {IMAGE_PLACEHOLDER} placeholders but {num_images} images "
                             "were given")
        return list(questions)
    if num_images == 1:
        first = f"{IMAGE_PLACEHOLDER}\n{questions[0]}"
    else:
        first = "".join(f"Image {i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1)) + questions[0]
    return [first, *questions[1:]]


def _user_turn(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


EMPTY_THINK = "<think>\n\n</think>\n\n"


def _chat_parts(question: str, num_images: int, enable_thinking: bool, history: Sequence[Turn]
                ) -> tuple[list[tuple[str, str]], str]:
    """([(templated user turn + assistant header, its answer) for each earlier turn], the final such turn).

    As the published formatter does, every assistant turn (earlier ones too) opens with an empty think
    block when thinking is off, and none does when it is on.
    """
    history = check_history(history)
    contents = _user_contents([q for q, _ in history] + [question], num_images)
    think = "" if enable_thinking else EMPTY_THINK
    return [(_user_turn(c) + think, a) for c, (_, a) in zip(contents, history)], _user_turn(contents[-1]) + think


def understanding_prompt(question: str, num_images: int, enable_thinking: bool = False,
                         history: Sequence[Turn] = ()) -> str:
    """Earlier turns, the user turn with the question, then the assistant header (with an empty think block
    if thinking is off). The images go into the first user turn unless the questions place `<image>`s."""
    past, final = _chat_parts(question, num_images, enable_thinking, history)
    return "".join(f"{user}{a}<|im_end|>\n" for user, a in past) + final


def generation_prompt(text: str) -> str:
    """Generation condition prompt: the user turn only (no assistant header), always with one image."""
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"generation text must not contain {IMAGE_PLACEHOLDER}: the prompt adds its single "
                         "image slot itself")
    return f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{text}<|im_end|>\n"


def t2i_prompts(prompt: str, prefix: str = PUBLISHED_T2I_PREFIX) -> tuple[str, str]:
    """(conditional, unconditional) text-to-image prompts, both used with a blank white image.

    `prefix` is the model's `generation.t2i_prefix` (the published one by default; "" for none). The
    published code joins it to the prompt as written: no space added, nothing stripped.
    """
    return generation_prompt(prefix + prompt), generation_prompt(UNCOND_TEXT)


def edit_prompt(instruction: str) -> str:
    """The conditional editing prompt: the published code strips the instruction first."""
    return generation_prompt(instruction.strip())


# --------------------------------------------------------------------------------------------------
# Prompts -> ids
# --------------------------------------------------------------------------------------------------


def require_tokenizer(model):
    """The model's tokenizer, or a ValueError saying how to give it one."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (its checkpoint folder has no tokenizer files); "
                         "set model.tokenizer before answering or generating")
    return model.tokenizer


def tokenize_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with each `<image>` mapped to IMAGE_TOKEN_ID; special tokens stay single ids."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def expand_image_tokens(ids: Sequence[int], num_visual_tokens: Sequence[int]) -> list[int]:
    """Replace the k-th IMAGE_TOKEN_ID by [indicator_0, atom * n_k, indicator_1]."""
    found = sum(1 for i in ids if i == IMAGE_TOKEN_ID)
    if found != len(num_visual_tokens):
        raise ValueError(f"prompt has {found} image placeholders but {len(num_visual_tokens)} images were given")
    out: list[int] = []
    images = iter(num_visual_tokens)
    for i in ids:
        if i == IMAGE_TOKEN_ID:
            out += [INDICATOR_IDS[0], *[VISUAL_ATOM_ID] * next(images), INDICATOR_IDS[1]]
        else:
            out.append(i)
    return out


TRUNCATE_KEEP_TAIL = 12  # text tokens kept at the end: the chat template's closing turn markers


def _kept_positions(ids: Sequence[int], max_length: int) -> list[int]:
    """Positions kept when fitting `ids` into max_length: every image token, the earliest text tokens and
    the last TRUNCATE_KEEP_TAIL text tokens.

    Image tokens (all negative ids) are never dropped, so an image span is never cut and the number of
    images still matches the pixel inputs. Text is dropped from just before the tail, so the template's
    `<|im_end|>` and assistant header survive and the model still answers rather than continues.
    """
    if len(ids) <= max_length:
        return list(range(len(ids)))
    n_image = sum(1 for i in ids if i < 0)
    if n_image > max_length:
        raise ValueError(f"image tokens alone ({n_image}) exceed max_length={max_length}; use fewer or smaller "
                         "images, or raise max_length")
    text = [pos for pos, i in enumerate(ids) if i >= 0]
    budget = max_length - n_image
    tail = min(TRUNCATE_KEEP_TAIL, budget)
    keep_text = set(text[:budget - tail]) | set(text[len(text) - tail:] if tail else [])
    kept = [pos for pos, i in enumerate(ids) if i < 0 or pos in keep_text]
    warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_length}: {len(ids) - max_length} text tokens "
                  "dropped before the closing chat-template tokens", stacklevel=3)
    return kept


def truncate(ids: Sequence[int], max_length: int) -> list[int]:
    """Fit `ids` into max_length tokens, keeping the start and every image span (warns when it cuts)."""
    return [ids[p] for p in _kept_positions(ids, max_length)]


# --------------------------------------------------------------------------------------------------
# Training labels
# --------------------------------------------------------------------------------------------------


def understanding_example(tokenizer: Any, question: str, answer: str, num_images: int,
                          enable_thinking: bool = False, history: Sequence[Turn] = ()
                          ) -> tuple[list[int], list[int]]:
    """(ids, labels) for one conversation; the loss sees every answer (earlier turns' too) and its `<|im_end|>`.

    Ids still hold one IMAGE_TOKEN_ID per image; `expand_example` expands ids and labels together. The ids
    up to the last answer are exactly `tokenize_prompt(understanding_prompt(...))`, what `answer()` feeds.
    """
    if IMAGE_PLACEHOLDER in answer:
        raise ValueError(f"answers are text only; found {IMAGE_PLACEHOLDER} in the answer")
    past, final = _chat_parts(question, num_images, enable_thinking, history)
    tail = tokenizer.encode("\n", add_special_tokens=False)
    ids: list[int] = []
    labels: list[int] = []
    for user, a in past:
        # An earlier turn is tokenised whole, as inference tokenises the prompt that holds it (a byte-level
        # BPE may merge the think block's last newline into the answer); the labels start where its ids
        # leave those of the header alone.
        turn = tokenize_prompt(tokenizer, user + a + "<|im_end|>")
        header = tokenize_prompt(tokenizer, user)
        n = next((i for i, (x, y) in enumerate(zip(turn, header)) if x != y), len(header))
        ids += turn + tail
        labels += [IGNORE_ID] * n + turn[n:] + [IGNORE_ID] * len(tail)
    # The last turn ends the inference prompt right after its header, so header and answer are tokenised
    # apart: the label boundary is then an exact token boundary.
    prompt = tokenize_prompt(tokenizer, final)
    target = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    ids += prompt + target + tail
    labels += [IGNORE_ID] * len(prompt) + target + [IGNORE_ID] * len(tail)
    return ids, labels


def expand_example(ids: Sequence[int], labels: Sequence[int], num_visual_tokens: Sequence[int]
                   ) -> tuple[list[int], list[int]]:
    """`expand_image_tokens` for a training example; labels over the image spans are IGNORE_ID."""
    expanded = expand_image_tokens(ids, num_visual_tokens)
    out_labels: list[int] = []
    images = iter(num_visual_tokens)
    for i, label in zip(ids, labels, strict=True):
        out_labels += [IGNORE_ID] * (next(images) + 2) if i == IMAGE_TOKEN_ID else [label]
    return expanded, out_labels


def truncate_example(ids: Sequence[int], labels: Sequence[int], max_length: int
                     ) -> tuple[list[int], list[int]]:
    """`truncate` for a training example: the same positions are kept in ids and labels."""
    kept = _kept_positions(ids, max_length)
    return [ids[p] for p in kept], [labels[p] for p in kept]


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one [B, L] LongTensor plus its attention mask (1 = real token).

    Negative placeholder ids are kept as they are: the model replaces them before the embedding lookup.
    Left padding suits generation (all prompts end at the same column), right padding suits training.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        input_ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return input_ids, mask


@dataclass
class ProcessedPrompt:
    input_ids: torch.Tensor  # [B, L], placeholders as negative ids
    attention_mask: torch.Tensor  # [B, L]
    pixel_patches: list[torch.Tensor]  # one [N_i, 3, patch, patch] per image, batch order
    grid_thws: list[tuple[int, int, int]]  # one (1, h, w) per image, in patches


def prepare_inputs(tokenizer: Any, texts: Sequence[str], images_per_text: Sequence[Sequence[ImageSource]],
                   cfg: OvisU1Config, pad_side: str = "left", max_length: int | None = None
                   ) -> ProcessedPrompt:
    """Templated prompts + their images -> padded model inputs (load, preprocess, tokenize, expand, pad)."""
    if len(texts) != len(images_per_text):
        raise ValueError(f"got {len(texts)} texts but {len(images_per_text)} image lists")
    stride = cfg.adapter.hidden_stride
    rows, patches, grids = [], [], []
    for text, images in zip(texts, images_per_text, strict=True):
        counts = []
        for src in images:
            p, grid = image_patches(src, cfg)
            patches.append(p)
            grids.append(grid)
            counts.append(num_visual_tokens(grid, stride))
        ids = expand_image_tokens(tokenize_prompt(tokenizer, text), counts)
        rows.append(ids if max_length is None else truncate(ids, max_length))
    input_ids, mask = pad_batch(rows, tokenizer.pad_token_id, pad_side)
    return ProcessedPrompt(input_ids, mask, patches, grids)
