"""Understanding (ovis_u1/chat.py) on the tiny model: answers alone and batched, streaming, conversations and
ChatSession, image placeholders, sampling and the KV cache, truncation, repeated n-grams, bad images."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

from ovis_u1.images import ImageInputError


@pytest.fixture(scope="module")
def two_images():
    return random_image(40, 72, seed=1), random_image(56, 40, seed=2)


def test_answer_basic_and_batch(tiny_model, two_images):
    a, b = two_images
    questions = ["What is in the image?", "How many shapes are there?", "Describe the scene."]
    images = [a, [a, b], None]
    one_by_one = [tiny_model.answer(q, images=im) for q, im in zip(questions, images)]
    assert all(isinstance(x, str) for x in one_by_one)
    assert len(set(one_by_one)) > 1 and any(one_by_one)  # the fixture's LM is not degenerate
    assert tiny_model.answer(questions, images=images) == one_by_one
    assert tiny_model.answer(questions[2:]) == one_by_one[2:]  # no images at all
    with pytest.raises(ValueError, match="image lists"):
        tiny_model.answer(questions, images=[a])


def test_answer_streaming(tiny_model, two_images):
    a, _ = two_images
    for kw in ({}, {"do_sample": True, "seed": 5, "max_new_tokens": 24}):
        pieces = list(tiny_model.answer("What is in the image?", images=a, stream=True, **kw))
        assert all(isinstance(p, str) for p in pieces)
        assert "".join(pieces) == tiny_model.answer("What is in the image?", images=a, **kw)
    with pytest.raises(ValueError, match="one question"):
        tiny_model.answer(["a?", "b?"], stream=True)


def test_answer_streaming_strips_like_answer(tiny_model, monkeypatch):
    """Whitespace around the answer: the streamed pieces still join to exactly answer()'s string."""
    tok = tiny_model.tokenizer
    ids = [*tok.encode("\n\n  Two red circles.\n \n", add_special_tokens=False),
           tok.convert_tokens_to_ids("<|im_end|>")]

    def fake_generate(streamer=None, **kwargs):
        if streamer is not None:
            for i in ids:
                streamer.put(torch.tensor([i]))
            streamer.end()
        return torch.tensor([ids])

    monkeypatch.setattr(tiny_model.llm, "generate", fake_generate)
    assert tiny_model.answer("How many?") == "Two red circles."
    pieces = list(tiny_model.answer("How many?", stream=True))
    assert "".join(pieces) == "Two red circles." and len(pieces) > 1


def test_answer_continues_a_conversation(tiny_model, two_images, monkeypatch):
    import ovis_u1.chat as chat
    from ovis_u1.prompts import understanding_prompt
    a, b = two_images
    seen = []
    real = chat.prepare_inputs
    monkeypatch.setattr(chat, "prepare_inputs", lambda tok, texts, *rest, **kw: (
        seen.append(list(texts)), real(tok, texts, *rest, **kw))[1])
    history = [("What is in the image?", "a red circle"), ("And its size?", "small")]
    reply = tiny_model.answer("How many?", images=a, history=history)
    assert isinstance(reply, str) and seen[-1] == [understanding_prompt("How many?", 1, history=history)]
    # a batch takes one history per question; None or [] starts afresh
    batch = tiny_model.answer(["How many?", "Compare."], images=[a, [a, b]], history=[history, None])
    assert batch[0] == reply and seen[-1][1] == understanding_prompt("Compare.", 2)
    with pytest.raises(ValueError, match="2 questions take a list of 2 histories"):
        tiny_model.answer(["How many?", "Compare."], images=[a, [a, b]], history=history)
    with pytest.raises(ValueError, match=r"history\[0\] must be a \(question, answer\) pair"):
        tiny_model.answer("How many?", images=a, history=["What is it?"])


def test_chat_session_keeps_the_turns(tiny_model, two_images):
    from ovis_u1.chat import ChatSession
    a, b = two_images
    chat = ChatSession(tiny_model, [a, b], max_new_tokens=8)
    first = chat.ask("Which is brighter?")
    assert chat.history == [("Which is brighter?", first)]
    second = "".join(chat.ask("Why?", stream=True))
    assert chat.history == [("Which is brighter?", first), ("Why?", second)]
    assert second == tiny_model.answer("Why?", images=[a, b], history=chat.history[:1], max_new_tokens=8)
    chat.undo()
    assert chat.history == [("Which is brighter?", first)]
    for kwargs, match in (({"history": []}, "keeps the history itself"), ({"stream": True}, "chosen per turn")):
        with pytest.raises(ValueError, match=match):
            ChatSession(tiny_model, a, **kwargs)
    with pytest.raises(ValueError, match="one question"):
        chat.ask(["a?", "b?"])
    with pytest.raises(ValueError, match="non-empty"):
        chat.ask("  ")
    assert len(chat.history) == 1  # refused turns leave no trace


def test_answer_multi_image_and_placeholders(tiny_model, two_images):
    a, b = two_images
    assert isinstance(tiny_model.answer("Which is brighter?", images=[a, b]), str)
    assert isinstance(tiny_model.answer("Is <image> the same as <image>?", images=[a, b]), str)
    for q, ims in (("Is <image> the same as <image>?", [a]), ("Is <image> the same as <image>?", [a, b, a]),
                   ("Describe <image>.", []), ("Describe <image>.", None)):
        with pytest.raises(ValueError, match="placeholder"):
            tiny_model.answer(q, images=ims)


def test_answer_sampling_and_cache(tiny_model, two_images):
    a, _ = two_images
    q = "What is in the image?"
    kw = {"do_sample": True, "max_new_tokens": 12}
    s1 = tiny_model.answer(q, images=a, seed=1, **kw)
    assert s1 == tiny_model.answer(q, images=a, seed=1, **kw)
    assert s1 != tiny_model.answer(q, images=a, seed=2, **kw)
    state = torch.get_rng_state()
    tiny_model.answer(q, images=a, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded answer leaves the caller's RNG alone
    assert tiny_model.answer(q, images=a, use_cache=False) == tiny_model.answer(q, images=a, use_cache=True)
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            tiny_model.answer(q, images=a, **kw, **bad)
    for bad in (0, -1, 2.5, 10**6):
        with pytest.raises(ValueError, match="max_new_tokens"):
            tiny_model.answer(q, max_new_tokens=bad)
    with pytest.raises(ValueError, match="question"):
        tiny_model.answer("  ")


def test_no_repeat_ngram_size_bans_repeated_runs_with_and_without_the_cache(make_tiny, two_images):
    """generation.no_repeat_ngram_size (the shipped model's 4 stops its loops on out-of-world images):
    no run of that many answer tokens appears twice, in generate and in the cache-free loop alike."""
    import itertools

    from ovis_u1.llm import generate_without_cache
    model = make_tiny(0)
    embeds = torch.randn(1, 6, model.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    kw = dict(inputs_embeds=embeds, attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=24,
              min_new_tokens=24, eos_token_id=0, pad_token_id=0)
    free = model.llm.generate(**kw, do_sample=False)[0].tolist()
    assert len(set(itertools.pairwise(free))) < len(free) - 1  # the random LM loops without the ban
    banned = model.llm.generate(**kw, do_sample=False, no_repeat_ngram_size=2)[0].tolist()
    assert banned == generate_without_cache(model.llm, **kw, no_repeat_ngram_size=2)[0].tolist()
    assert len(set(itertools.pairwise(banned))) == len(banned) - 1
    # Through answer(): the config's value is used, on both paths.
    model.config.generation.no_repeat_ngram_size = 2
    q, a = "Describe the scene.", two_images[0]
    assert model.answer(q, images=a, max_new_tokens=16) == model.answer(q, images=a, max_new_tokens=16,
                                                                        use_cache=False)


def test_overlong_question_truncated(tiny_model):
    prompt = " ".join(["a small red circle next to a big blue square"] * 60)
    with pytest.warns(UserWarning, match="truncated"):
        assert isinstance(tiny_model.answer(prompt, max_new_tokens=2), str)


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_answer_refuses_bad_images_with_the_loaders_message(tiny_model, tmp_path, kind):
    """answer() reads images through images.load_image (whose every refusal test_images.py checks)."""
    src, message = {"corrupt": (b"this is not an image at all", "not a readable image"),
                    "missing": (tmp_path / "nope.png", "does not exist")}[kind]
    with pytest.raises(ImageInputError, match=message):
        tiny_model.answer("What is it?", images=src)
