"""ovis_u1/prompts.py and the tiny tokenizer: chat templates, ids, truncation, training labels, padding."""

import time

import pytest
import torch
from conftest import random_image

from ovis_u1 import images as IM
from ovis_u1 import prompts as PR
from ovis_u1.config import PUBLISHED_T2I_PREFIX, get_preset
from ovis_u1.tokenizer import build_tokenizer, default_corpus, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(default_corpus())



# ---------------------------------------------------------------- chat templates


def test_understanding_prompt_strings():
    assert PR.understanding_prompt("What is this?", 1) == (
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert PR.understanding_prompt("Compare.", 2, enable_thinking=True) == (
        "<|im_start|>user\nImage 1: <image>\nImage 2: <image>\nCompare.<|im_end|>\n<|im_start|>assistant\n")
    assert PR.understanding_prompt("Hi", 0, enable_thinking=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert PR.understanding_prompt("Is <image> like <image>?", 2).startswith(
        "<|im_start|>user\nIs <image> like <image>?<|im_end|>")
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        PR.understanding_prompt("<image> <image> what?", 1)


def test_understanding_prompt_with_history():
    history = [("What color is the circle?", "red"), ("And the square?", "blue")]
    assert PR.understanding_prompt("How many?", 1, history=history) == (
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nblue<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # placeholders may sit in any turn; together they must match the images
    later = PR.understanding_prompt("Now compare <image>.", 2, history=[("Look at <image>.", "ok")])
    assert later.count("<image>") == 2 and "Image 1:" not in later
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        PR.understanding_prompt("What now?", 2, history=[("Look at <image>.", "ok")])


@pytest.mark.parametrize("bad, match", [
    ("what?", "must be a list of"), ([("q",)], r"history\[0\] must be a \(question, answer\) pair"),
    ([("q", 3)], "pair of strings"), ([(" ", "a")], "empty question"), ([("q", "<image>")], "text only"),
])
def test_history_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        PR.understanding_prompt("q", 0, history=bad)


def test_generation_prompts():
    assert PR.generation_prompt("a cat") == "<|im_start|>user\n<image>\na cat<|im_end|>\n"
    cond, uncond = PR.t2i_prompts("a red circle")
    # The published code joins prefix and prompt as written: no space, no strip.
    assert cond == f"<|im_start|>user\n<image>\n{PUBLISHED_T2I_PREFIX}a red circle<|im_end|>\n"
    assert PR.t2i_prompts(" two squares ", "")[0] == "<|im_start|>user\n<image>\n two squares <|im_end|>\n"
    assert uncond == "<|im_start|>user\n<image>\nGenerate an image.<|im_end|>\n"
    assert PUBLISHED_T2I_PREFIX.endswith("spatial relationships of the objects:")
    assert PR.edit_prompt("  make it blue \n") == "<|im_start|>user\n<image>\nmake it blue<|im_end|>\n"
    with pytest.raises(ValueError, match="must not contain"):
        PR.generation_prompt("<image> a cat")


# ---------------------------------------------------------------- ids


def test_tokenize_prompt_placeholders_and_specials(tok):
    ids = PR.tokenize_prompt(tok, PR.understanding_prompt("What color?", 2))
    assert ids.count(PR.IMAGE_TOKEN_ID) == 2
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_end) == 1
    text = tok.decode([i if i >= 0 else tok.encode("<image>", add_special_tokens=False)[0] for i in ids])
    assert "What color?" in text


def test_expand_image_tokens():
    ids = [5, PR.IMAGE_TOKEN_ID, 6, PR.IMAGE_TOKEN_ID]
    out = PR.expand_image_tokens(ids, [2, 3])
    a, o, c = PR.VISUAL_ATOM_ID, PR.INDICATOR_IDS[0], PR.INDICATOR_IDS[1]
    assert out == [5, o, a, a, c, 6, o, a, a, a, c]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        PR.expand_image_tokens(ids, [4])
    assert IM.num_visual_tokens((1, 6, 8), 2) == 12


def test_truncate():
    tail = PR.TRUNCATE_KEEP_TAIL
    ids = list(range(40))
    assert PR.truncate(ids, 40) == ids
    with pytest.warns(UserWarning, match="truncated to 20"):
        # the start and the closing template tokens survive; the middle goes
        assert PR.truncate(ids, 20) == list(range(20 - tail)) + list(range(40 - tail, 40))
    with pytest.warns(UserWarning):
        assert PR.truncate(ids, 4) == [36, 37, 38, 39]  # budget below the tail: the tail wins
    img = PR.expand_image_tokens([1, PR.IMAGE_TOKEN_ID, *list(range(2, 40))], [4])  # image span of 6 first
    with pytest.warns(UserWarning):
        out = PR.truncate(img, 30)
    assert out[:7] == img[:7] and out[-tail:] == img[-tail:] and len(out) == 30
    late = PR.expand_image_tokens([*list(range(1, 30)), PR.IMAGE_TOKEN_ID, 99], [2])  # image span near the end
    with pytest.warns(UserWarning):
        out = PR.truncate(late, 20)
    assert len(out) == 20 and out.count(PR.VISUAL_ATOM_ID) == 2 and out[-1] == 99
    assert out.index(PR.INDICATOR_IDS[0]) + 3 == out.index(PR.INDICATOR_IDS[1])  # span kept whole
    with pytest.raises(ValueError, match=r"image tokens alone \(6\) exceed max_length=5"):
        PR.truncate(img, 5)


def test_understanding_labels(tok):
    ids, labels = PR.understanding_example(tok, "What color is the circle?", "The circle is red.", 1)
    assert len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels, strict=True) if lab != PR.IGNORE_ID]
    assert tok.decode(kept) == "The circle is red.<|im_end|>"
    first = labels.index(next(lab for lab in labels if lab != PR.IGNORE_ID))
    assert all(lab == PR.IGNORE_ID for lab in labels[:first])  # role header and empty think block masked
    assert tok.decode([i for i in ids[:first] if i >= 0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert labels[-1] == PR.IGNORE_ID and tok.decode(ids[-1:]) == "\n"  # newline after <|im_end|> masked
    assert labels[first:-1] == ids[first:-1]

    ex_ids, ex_labels = PR.expand_example(ids, labels, [3])
    assert len(ex_ids) == len(ex_labels) == len(ids) + 4
    assert all(lab == PR.IGNORE_ID for i, lab in zip(ex_ids, ex_labels, strict=True) if i < 0)
    assert [lab for lab in ex_labels if lab != PR.IGNORE_ID] == [lab for lab in labels if lab != PR.IGNORE_ID]
    with pytest.warns(UserWarning):
        t_ids, t_labels = PR.truncate_example(ex_ids, ex_labels, len(ex_ids) - 2)
    # ids and labels are cut at the same positions; the answer at the end (the tail) survives
    tail = PR.TRUNCATE_KEEP_TAIL
    assert len(t_ids) == len(t_labels) == len(ex_ids) - 2
    assert t_ids[-tail:] == ex_ids[-tail:] and t_labels[-tail:] == ex_labels[-tail:]
    assert dict(zip(t_ids, t_labels)) == {i: lab for i, lab in zip(ex_ids, ex_labels) if i in set(t_ids)}



def test_conversation_labels_cover_every_answer_and_match_the_inference_prompt(tok):
    history = [("How many objects are there?", "two"), ("Describe the image.", "a red circle and a blue square")]
    ids, labels = PR.understanding_example(tok, "What color is the square?", "blue", 1, history=history)
    kept = [i for i, lab in zip(ids, labels, strict=True) if lab != PR.IGNORE_ID]
    # An earlier turn's first label may carry the think block's last newline (its tokens are those of the
    # whole prompt, where the byte-level BPE merges it into the answer).
    assert tok.decode(kept).replace("\n", "") == "two<|im_end|>a red circle and a blue square<|im_end|>blue<|im_end|>"
    # what answer() feeds for the last turn is exactly the ids before the last answer
    prompt = PR.tokenize_prompt(tok, PR.understanding_prompt("What color is the square?", 1, history=history))
    assert ids[:len(prompt)] == prompt and all(lab == PR.IGNORE_ID for lab in labels[len(prompt) - 3:len(prompt)])
    assert ids.count(PR.IMAGE_TOKEN_ID) == 1


def test_pad_batch():
    seqs = [[1, 2, 3], [PR.IMAGE_TOKEN_ID]]
    ids, mask = PR.pad_batch(seqs, pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, PR.IMAGE_TOKEN_ID]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = PR.pad_batch(seqs, pad_id=PR.IGNORE_ID, side="right")
    assert ids.tolist() == [[1, 2, 3], [PR.IMAGE_TOKEN_ID, PR.IGNORE_ID, PR.IGNORE_ID]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        PR.pad_batch(seqs, 0, side="middle")


def test_prepare_inputs_tiny(tok):
    cfg = get_preset("tiny")
    texts = [PR.understanding_prompt("What is this?", 1), PR.understanding_prompt("Compare.", 2)]
    images = [[random_image(40, 60)], [random_image(100, 30, 1), IM.blank_image(64, 64, 64 * 64, 16)]]
    batch = PR.prepare_inputs(tok, texts, images, cfg, pad_side="left")
    assert len(batch.pixel_patches) == len(batch.grid_thws) == 3
    for patches, (t, h, w) in zip(batch.pixel_patches, batch.grid_thws, strict=True):
        assert t == 1 and h % 2 == 0 and w % 2 == 0
        assert patches.shape == (h * w, 3, 8, 8)
        assert cfg.adapter.min_pixels <= h * w * 64 <= cfg.adapter.max_pixels
    counts = [IM.num_visual_tokens(g, 2) for g in batch.grid_thws]
    atoms = (batch.input_ids == PR.VISUAL_ATOM_ID).sum(1).tolist()
    assert atoms == [counts[0], counts[1] + counts[2]]
    assert batch.attention_mask[:, -1].tolist() == [1, 1]  # left padded
    assert batch.input_ids[batch.attention_mask == 0].eq(tok.pad_token_id).all()
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        PR.prepare_inputs(tok, texts[:1], [images[1]], cfg)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_build_save_reload(tmp_path):
    start = time.perf_counter()
    tok = build_tokenizer(default_corpus(), vocab_size=512)
    assert time.perf_counter() - start < 2.0
    assert len(tok) <= 512
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert len(tok.encode("<image>", add_special_tokens=False)) > 1  # not a token
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"

    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    samples = [PR.understanding_prompt("How many red circles?", 1), "naïve café ✓ 東京 😀", PUBLISHED_T2I_PREFIX]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert again.encode(text, add_special_tokens=False) == ids
        assert again.decode(ids) == text
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(["abc"], vocab_size=100)


# ---------------------------------------------------------------- former module names


def test_former_module_names_forward_to_the_split_modules(monkeypatch):
    """ovis_u1.processing / ovis_u1.inference (before the split by concern) read and patch the new modules."""
    from ovis_u1 import chat, generation, images, inference, processing, prompts
    assert processing.smart_resize is images.smart_resize and processing.UNCOND_TEXT == prompts.UNCOND_TEXT
    assert inference.answer is chat.answer and inference.text_to_image is generation.text_to_image
    monkeypatch.setattr(inference, "initial_noise", "patched")
    assert generation.initial_noise == "patched"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        processing.nope  # noqa: B018
