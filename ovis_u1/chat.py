"""Understanding: `answer` (one question, a batch, streamed, or continuing a conversation) and `ChatSession`.

The prompt is the published Qwen3 chat template (`prompts.understanding_prompt`); the images' visual tokens
replace their placeholders (`OvisU1.embed`), and transformers' `generate` runs the LLM from those embeddings.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from functools import partial

import torch

from .images import load_image
from .llm import generate_without_cache
from .prompts import prepare_inputs, require_tokenizer, understanding_prompt


def _image_list(images) -> list:
    """None, one image, or a list of images -> a list."""
    return [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)


def _question_batch(question, images) -> tuple[list[str], list[list]]:
    if isinstance(question, str):
        return [question], [_image_list(images)]
    questions = list(question)
    if images is None:
        images = [[] for _ in questions]
    if len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} image lists; pass one list per question")
    # None = a text-only question inside a batch that has images elsewhere.
    return questions, [_image_list(im) for im in images]


def _history_batch(history, questions: list[str], single: bool) -> list:
    """One history per question (understanding_prompt checks each)."""
    if history is None:
        return [None for _ in questions]
    if single:
        return [history]

    def is_pair(h) -> bool:  # one (question, answer) pair where a whole history belongs
        return isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h)

    if (isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple))
            or len(history) != len(questions) or any(is_pair(h) for h in history)):
        raise ValueError(f"{len(questions)} questions take a list of {len(questions)} histories (None or "
                         f"(question, answer) pairs each), got {history!r}")
    return list(history)


@torch.no_grad()
def answer(model, question, images=None, max_new_tokens: int | None = None, stream: bool = False,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
           use_cache: bool = True, enable_thinking: bool = False, min_new_tokens: int | None = None,
           history=None):
    """Answer a question (str) or a batch (list of str, with one image list each).

    Returns a str (a list for a batch), or, with stream=True, an iterator of text pieces (one question).
    `history` continues a conversation: the earlier (question, answer) pairs, oldest first (a list of such
    lists for a batch); the images belong to the conversation and open its first turn. `ChatSession`
    keeps the history for you. `min_new_tokens` holds back the end-of-turn token that long (benchmarks
    need a fixed answer length).
    """
    questions, image_lists = _question_batch(question, images)
    histories = _history_batch(history, questions, isinstance(question, str))
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question must be a non-empty string, got {q!r}")
    max_new = model.config.generation.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 32768:
        raise ValueError(f"max_new_tokens must be an integer in [1, 32768], got {max_new!r}")
    if min_new_tokens is not None and (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int)
                                       or not 0 <= min_new_tokens <= max_new):
        raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={max_new}], "
                         f"got {min_new_tokens!r}")
    if do_sample:
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
                or temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
    images_loaded = [[load_image(im) for im in ims] for ims in image_lists]
    texts = [understanding_prompt(q, len(ims), enable_thinking, h)
             for q, ims, h in zip(questions, images_loaded, histories, strict=True)]
    tok = require_tokenizer(model)
    batch = prepare_inputs(tok, texts, images_loaded, model.config, pad_side="left",
                           max_length=model.config.generation.multimodal_max_length)
    embeds = model.embed(batch.input_ids, batch.pixel_patches, batch.grid_thws)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    kwargs = dict(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(model.device),
                  max_new_tokens=max_new, do_sample=do_sample, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                  use_cache=use_cache)
    if model.config.generation.no_repeat_ngram_size:
        n = model.config.generation.no_repeat_ngram_size
        if use_cache:  # as a processor: generate's own option warns that it sees only the new tokens (so do we)
            from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor
            kwargs["logits_processor"] = LogitsProcessorList([NoRepeatNGramLogitsProcessor(n)])
        else:
            kwargs["no_repeat_ngram_size"] = n
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    # transformers forces the KV cache on for inputs_embeds, so use_cache=False runs its own loop.
    generate = model.llm.generate if use_cache else partial(generate_without_cache, model.llm)
    if do_sample and seed is not None:
        generate = _seeded(generate, int(seed), model.device)
    if stream:
        if len(questions) != 1:
            raise ValueError("stream=True takes one question at a time")
        return _stream(model, generate, kwargs)
    out = generate(**kwargs)
    answers = [a.strip() for a in tok.batch_decode(out, skip_special_tokens=True)]
    return answers[0] if isinstance(question, str) else answers


class ChatSession:
    """A conversation about fixed images: each question is answered with the earlier turns as history."""

    def __init__(self, model, images=None, **answer_kwargs):
        if "history" in answer_kwargs:
            raise ValueError("ChatSession keeps the history itself; it starts empty")
        if "stream" in answer_kwargs:
            raise ValueError("stream is chosen per turn: ask(question, stream=True)")
        self.model, self.kwargs = model, answer_kwargs
        self.images = [load_image(im) for im in _image_list(images)]
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str, stream: bool = False, **kwargs):
        """The answer (str), or with stream=True an iterator of its pieces; the turn is kept once complete."""
        if not isinstance(question, str):
            raise ValueError(f"ChatSession.ask takes one question (a string), got {type(question).__name__}")
        if "history" in kwargs:
            raise ValueError("ChatSession keeps the history itself")
        kw = {**self.kwargs, **kwargs}
        if not stream:
            reply = answer(self.model, question, self.images, history=self.history, **kw)
            self.history.append((question, reply))
            return reply
        pieces = answer(self.model, question, self.images, history=self.history, stream=True, **kw)
        return self._keep_streamed(question, pieces)

    def _keep_streamed(self, question: str, pieces: Iterator[str]) -> Iterator[str]:
        # answer() strips its result; joining the streamed pieces gives exactly that string.
        got = []
        for piece in pieces:
            got.append(piece)
            yield piece
        self.history.append((question, "".join(got)))

    def undo(self) -> None:
        """Forget the last turn."""
        if self.history:
            self.history.pop()


def _stream(model, generate, kwargs) -> Iterator[str]:
    from transformers import TextIteratorStreamer
    streamer = TextIteratorStreamer(model.tokenizer, skip_special_tokens=True, timeout=600)
    errors = []

    def run():
        try:
            generate(**kwargs, streamer=streamer)
        except Exception as e:  # surface generation errors in the consumer's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Strip like the non-streamed answer, so the pieces always join to exactly what answer() returns:
    # leading whitespace is dropped, trailing whitespace is held back until more text follows it.
    started, held = False, ""
    for piece in streamer:
        text = held + piece if started else piece.lstrip()
        started = started or bool(text)
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body
    thread.join()
    if errors:
        raise errors[0]



def _seeded(generate, seed: int, device: torch.device):
    """`generate` drawing from its own seeded RNG: the caller's global RNG state is left as it was."""
    devices = [device] if device.type == "cuda" else []

    def run(**kwargs):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return generate(**kwargs)
    return run


__all__ = ["ChatSession", "answer"]
