"""What the bidirectional token refiner does to a text-to-image prompt, and where the decoder looks.

Pure functions over a loaded model (no UI): the web demo's "Inside the refiner" tab and the tutorial
notebooks both call them.

    report = refiner_report(model, "a red circle to the left of a blue square")
    plot_refiner_attention(report); plot_gates(report); plot_token_movement(report)
    word = report.words[-1]                     # "square": a Word, with its sub-word pieces' positions
    image, heat = word_attention_map(model, prompt, word, step=10)
    plot_word_heatmap(image, heat, word=word)

Token indices everywhere are positions in `report.tokens`: the whole generation condition the refiner
sees (chat header, image indicator and visual tokens of the blank image, the T2I instruction, the
prompt), which is also the decoder's text stream, position for position. The refiner prepends a CLS
token, so its attention matrices are one larger: row/column 0 is the CLS, row/column i + 1 is token i.
`report.words` groups the prompt's tokens into its whitespace-separated words (a word may be several
sub-word pieces); a word's attention is the sum over its pieces, other per-token figures the mean.

Plots are `matplotlib.figure.Figure` objects made without pyplot: no global figure registry, safe to build
from server threads, displayed inline by Jupyter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from .decoder import latent_ids
from .generation import (
    GenerationArgs,
    check_prompts,
    decode_latents,
    decoder_inputs,
    initial_noise,
    requested_size,
    sample,
    t2i_request,
    vit_factor,
)
from .images import blank_image
from .prompts import IMAGE_PLACEHOLDER, INDICATOR_IDS, VISUAL_ATOM_ID, prepare_inputs, t2i_prompts
from .sampling import get_schedule

GATE_KINDS = ("attention", "mlp")  # order of each refiner block's (gate_msa, gate_mlp)
REST = "(rest)"  # column label for the attention of all tokens outside the prompt, summed


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of the prompt and the positions of its sub-word pieces in `tokens`.

    The tokenizer splits rare words into pieces ("three" -> "th" "re" "e"); a user asks about words.
    Per-word figures: attention to a word is the SUM over its pieces (softmax probabilities add: the
    chance a query attends to any piece of the word); per-token properties such as movement are the MEAN.
    """

    text: str
    indices: tuple[int, ...]


@dataclass
class RefinerReport:
    """One refiner pass over a text-to-image condition, as numpy arrays (batch of one, CLS included)."""

    prompt: str
    tokens: list[str]  # L condition tokens, decoded one by one ("<v12>" = visual token 12 of the blank image)
    prompt_span: tuple[int, int]  # [start, stop) of the prompt's own tokens within `tokens`
    words: list[Word]  # the prompt's words, in order, each with its pieces' positions
    attention: list[np.ndarray]  # per block [L+1, L+1], heads averaged; rows are queries; index 0 = CLS
    gates: np.ndarray  # [blocks, 2 (GATE_KINDS), hidden] adaLN gates from the pooled context vector
    movement: np.ndarray  # [L] ||refined - input_embedder(condition)|| per token
    cosine: np.ndarray  # [L] cosine(refined, input_embedder(condition)) per token
    embedded_norm: np.ndarray  # [L] ||input_embedder(condition)||, to read `movement` against

    @property
    def cls_attention(self) -> list[np.ndarray]:
        """Per block [L+1]: where the CLS (the decoder's pooled vector) takes its information from."""
        return [a[0] for a in self.attention]

    @property
    def gate_magnitude(self) -> np.ndarray:
        """[blocks, 2] mean |gate| over channels: how much each residual branch is let through."""
        return np.abs(self.gates).mean(axis=-1)

    @property
    def prompt_indices(self) -> list[int]:
        return list(range(*self.prompt_span))

    def word_mean(self, values: np.ndarray) -> np.ndarray:
        """A per-token array [L] averaged over each word's pieces: [len(words)]."""
        return np.array([float(np.mean(values[list(w.indices)])) for w in self.words])

    @property
    def labels(self) -> list[str]:
        """`tokens` made readable for axes: whitespace shown, empty pieces marked."""
        return [_label(t) for t in self.tokens]


def _label(token: str) -> str:
    shown = token.replace("\n", "\\n").strip()
    return shown if shown else "␣"


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    out, visual = [], 0
    for i in ids:
        if i == VISUAL_ATOM_ID:
            out.append(f"<v{visual}>")
            visual += 1
        elif i in INDICATOR_IDS:
            out.append(f"<img_{INDICATOR_IDS.index(i)}>")
        else:
            out.append(tokenizer.decode([i]))
    return out


def _prompt_tokens(tokenizer, ids: list[int], prompt: str, prefix: str) -> tuple[tuple[int, int], list[Word]]:
    """The prompt's own tokens within `ids` ([start, stop): those of the text after the image whose
    characters overlap it) and its words (the tokens overlapping each run of non-space characters)."""
    after = t2i_prompts(prompt, prefix)[0].split(IMAGE_PLACEHOLDER, 1)[1]
    first = ids.index(INDICATOR_IDS[1]) + 1  # the text after the image starts right after its end marker
    stripped = prompt.strip()
    end_char = after.rindex(stripped) + len(stripped)
    start_char = end_char - len(stripped)
    try:
        offsets = tokenizer(after, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer: no offsets, keep all the text
        offsets = None
    inside = [] if offsets is None else [j for j, (a, b) in enumerate(offsets) if a < end_char and b > start_char]
    if not inside:  # no character offsets: every token after the image is its own "word"
        return (first, len(ids)), [Word(_label(tokenizer.decode([ids[j]])), (j,)) for j in range(first, len(ids))]
    words = []
    for m in re.finditer(r"\S+", stripped):
        a, b = start_char + m.start(), start_char + m.end()
        # Truncation (multimodal_max_length) may have cut the end of the prompt: keep the pieces that remain.
        pieces = tuple(first + j for j in inside if offsets[j][0] < b and offsets[j][1] > a and first + j < len(ids))
        if pieces:
            words.append(Word(m.group(), pieces))
    return (min(first + inside[0], len(ids)), min(first + inside[-1] + 1, len(ids))), words


@torch.no_grad()
def refiner_report(model, prompt: str, height: int | None = None, width: int | None = None) -> RefinerReport:
    """Run `prompt`'s LLM condition (built as text_to_image builds it) through the refiner; record it all."""
    (prompt,) = check_prompts(prompt)
    g = model.config.generation
    blank = blank_image(*requested_size(model, height, width), g.blank_image_max_pixels, vit_factor(model))
    batch = prepare_inputs(model.tokenizer, [t2i_prompts(prompt, g.t2i_prefix)[0]], [[blank]], model.config,
                           pad_side="right", max_length=g.multimodal_max_length)
    cond = model.condition(batch.input_ids, batch.attention_mask, batch.pixel_patches, batch.grid_thws)
    out = model.refiner(cond, None, return_attention=True)
    embedded = model.refiner.input_embedder(cond)[0].float()  # [L, C]
    refined = out.tokens[0].float()
    ids = batch.input_ids[0].tolist()
    span, words = _prompt_tokens(model.tokenizer, ids, prompt, g.t2i_prefix)
    return RefinerReport(
        prompt=prompt,
        tokens=_token_strings(model.tokenizer, ids),
        prompt_span=span,
        words=words,
        attention=[a[0].float().mean(dim=0).cpu().numpy() for a in out.attention],
        gates=torch.stack([torch.stack([msa[0], mlp[0]]) for msa, mlp in out.gates]).float().cpu().numpy(),
        movement=(refined - embedded).norm(dim=-1).cpu().numpy(),
        cosine=torch.nn.functional.cosine_similarity(refined, embedded, dim=-1).cpu().numpy(),
        embedded_norm=embedded.norm(dim=-1).cpu().numpy(),
    )


@torch.no_grad()
def word_attention_map(model, prompt: str, word_index: int | Sequence[int] | Word, step: int | None = None,
                       num_inference_steps: int | None = None, seed: int = 42,
                       guidance_scale: float | None = None, height: int | None = None,
                       width: int | None = None, block: int | None = None,
                       callback=None) -> tuple[Image.Image, np.ndarray]:
    """The image text_to_image makes for these arguments, and where its image tokens attend to one word.

    The heatmap [h, w] over the packed latent grid (one cell per decoder image token, 16 x 16 pixels at
    the published 8x VAE) holds the joint-attention probability from each image query to the text key
    `word_index` (a position in `refiner_report(...).tokens`; or several, such as a `Word` or its
    `indices`, whose probabilities are summed: attention to any piece of the word), heads averaged, in
    the conditional branch's forward at denoising step `step` (1 = the first, from pure noise; default:
    the middle step), averaged over the double-stream blocks or taken from one (`block`). Single-stream
    blocks are not recorded. Higher = the image token reads more from the word.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string, got {type(prompt).__name__}")
    args = GenerationArgs.check(model, prompt, num_inference_steps, guidance_scale, 1, "exact", "pil", seed, None,
                                None, height=height, width=width)  # what text_to_image would be given
    g, steps = model.config.generation, args.steps
    step = (steps + 1) // 2 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= steps:
        raise ValueError(f"step must be an integer in [1, num_inference_steps={steps}], got {step!r}")
    n_blocks = len(model.decoder.double_blocks)
    if block is not None and not 0 <= block < n_blocks:
        raise ValueError(f"block must be in [0, {n_blocks}) (the double-stream blocks), got {block!r}")
    req = t2i_request(model, args.prompts, *args.size, args.guidance_scale, args.seed, 1, blank_size=args.asked)

    seen = {0: initial_noise(model, req.seeds, req.latent_hw)}

    def keep(i, total, x):  # x after step i is the decoder's input at step i + 1
        if i == step - 1:
            seen[i] = x.clone()
        if callback is not None:
            callback(i, total, x)

    image = decode_latents(model, sample(model, req, steps, callback=keep, progress=False), req.latent_hw)[0]

    cond = decoder_inputs(model, req).rows(1)  # the conditional branch (right padded, masked)
    n_txt = cond.txt.shape[1]  # image queries follow the (padded) text in the joint sequence
    n_real = n_txt if cond.txt_mask is None else int(cond.txt_mask[0].sum())
    keys = _key_positions(word_index, n_real)
    x = seen[step - 1]
    h, w = req.latent_hw
    t = get_schedule(steps, x.shape[1], shift=g.use_time_shift, base_shift=g.base_shift,
                     max_shift=g.max_shift)[step - 1]
    record: list[torch.Tensor] = []  # per double block [B, L, L], read by hooks: the forward stays tensors only
    hooks = [b.register_forward_pre_hook(lambda m, args: record.append(m.joint_attention_weights(*args)))
             for b in model.decoder.double_blocks]
    try:
        model.decoder(x, latent_ids(1, h, w, device=x.device).to(x.dtype), cond.txt,
                      torch.zeros(1, n_txt, 3, device=x.device, dtype=x.dtype),
                      torch.full((1,), float(t), device=x.device, dtype=x.dtype), cond.y, txt_mask=cond.txt_mask)
    finally:
        for hook in hooks:
            hook.remove()
    maps = torch.stack([r[0, n_txt:, keys].sum(dim=-1) for r in record])  # [blocks, L_img]: image -> word
    heat = maps.mean(dim=0) if block is None else maps[block]
    return image, heat.float().reshape(h // 2, w // 2).cpu().numpy()


def _key_positions(word_index, n_real: int) -> list[int]:
    """The condition positions a word_index names (one position, a sequence of them or a Word), checked."""
    keys = list(word_index.indices) if isinstance(word_index, Word) else word_index
    keys = [keys] if isinstance(keys, int | np.integer) and not isinstance(keys, bool) else keys
    if not isinstance(keys, Sequence) or not keys or not all(
            isinstance(k, int | np.integer) and not isinstance(k, bool) and 0 <= k < n_real for k in keys):
        raise ValueError(f"word_index must be a position in [0, {n_real}) (the condition's tokens), a non-empty "
                         f"sequence of them, or a Word from refiner_report(...).words; got {word_index!r}")
    return list(dict.fromkeys(int(k) for k in keys))  # a position named twice is still read once


# ---- plots -------------------------------------------------------------------------------------------
def _focus(report: RefinerReport, focus: str) -> list[int]:
    """Token positions a plot shows: the prompt's own tokens, or all of them."""
    if focus == "prompt":
        return report.prompt_indices or list(range(len(report.tokens)))
    if focus == "all":
        return list(range(len(report.tokens)))
    raise ValueError(f"focus must be 'prompt' or 'all', got {focus!r}")


def plot_refiner_attention(report: RefinerReport, focus: str = "prompt") -> Figure:
    """One heatmap per refiner block: rows = CLS + shown tokens (queries), columns = keys.

    With focus="prompt" the columns are the CLS, the prompt's tokens and one REST column holding the
    attention to every other token summed (chat template, instruction, the blank image's visual tokens),
    so each row still sums to 1. The CLS row is outlined in red.
    """
    shown = _focus(report, focus)
    rows = [0] + [i + 1 for i in shown]
    names = ["CLS"] + [report.labels[i] for i in shown]
    rest = focus == "prompt" and len(shown) < len(report.tokens)
    blocks = len(report.attention)
    side = max(3.5, 0.38 * len(rows) + 1.8)
    fig = Figure(figsize=(side * blocks + 0.8, side), layout="constrained")
    axes = fig.subplots(1, blocks, squeeze=False)[0]
    for b, (ax, a) in enumerate(zip(axes, report.attention)):
        m = a[np.ix_(rows, rows)]
        # The colour scale follows the shown tokens; the REST column (mostly template and image tokens)
        # would otherwise wash everything out, so its share is written in its cells instead.
        vmax = max(float(m.max()), 1e-6)
        cols = list(names)
        if rest:
            m = np.concatenate([m, 1.0 - m.sum(axis=1, keepdims=True)], axis=1)
            cols.append(REST)
            for r in range(len(rows)):
                ax.text(len(cols) - 1, r, f"{m[r, -1]:.0%}", ha="center", va="center", fontsize=10,
                        color="white" if m[r, -1] < 0.6 * vmax else "black")
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=10)
        ax.set_yticks(range(len(names)), names, fontsize=10)
        ax.add_patch(Rectangle((-0.5, -0.5), len(cols), 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"block {b}: attention (heads averaged)", fontsize=11)
        ax.set_xlabel("key", fontsize=10)
        if b == 0:
            ax.set_ylabel("query (red: CLS row)", fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    return fig


def plot_gates(report: RefinerReport) -> Figure:
    """Mean |gate| per block for the attention and MLP residuals, with the largest channel marked."""
    mag = report.gate_magnitude  # [blocks, 2]
    peak = np.abs(report.gates).max(axis=-1)
    blocks = np.arange(mag.shape[0])
    fig = Figure(figsize=(max(5.0, 1.8 * len(blocks) + 2.5), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    for k, kind in enumerate(GATE_KINDS):
        x = blocks + (k - 0.5) * width
        ax.bar(x, mag[:, k], width, label=f"{kind}: mean |gate|")
        ax.scatter(x, peak[:, k], marker="_", s=200, color="black", zorder=3,
                   label="max |gate| over channels" if k == 0 else None)
    ax.set_xticks(blocks, [f"block {b}" for b in blocks])
    ax.set_ylabel("|gate|")
    ax.set_title("refiner adaLN gates (set by the pooled prompt)", fontsize=11)
    ax.set_ylim(0, 1.45 * max(float(peak.max()), 1e-6))
    ax.legend(fontsize=10, loc="upper center", ncol=2, frameon=False)
    return fig


def plot_token_movement(report: RefinerReport, focus: str = "prompt") -> Figure:
    """Per token: how far the refiner moved it from its input embedding (norm) and its direction (cosine)."""
    shown = _focus(report, focus)
    names = [report.labels[i] for i in shown]
    x = np.arange(len(shown))
    fig = Figure(figsize=(max(5.0, 0.45 * len(shown) + 2), 4.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, report.movement[shown], color="tab:orange", label="||refined - embedded||")
    top.plot(x, report.embedded_norm[shown], "k.", label="||embedded||")
    top.set_ylabel("norm")
    top.legend(fontsize=10)
    top.set_title("how much each token moves through the refiner", fontsize=11)
    bottom.bar(x, report.cosine[shown], color="tab:blue")
    bottom.set_ylim(min(0.0, float(report.cosine[shown].min()) - 0.05), 1.05)
    bottom.set_ylabel("cosine(refined, embedded)")
    bottom.set_xticks(x, names, rotation=90, fontsize=10)
    return fig


HEAT_CMAP = "magma"  # sequential: dark = little attention, bright = much (the colorbar says so)


def plot_word_heatmap(image: Image.Image, heatmap: np.ndarray, word: str | Word | None = None,
                      step: int | None = None) -> Figure:
    """The image; the image-to-word attention heatmap alone; and its contours drawn over the image.

    The heatmap is drawn on its own, not blended over the image: blending a colormap over coloured
    objects darkens them and brightens the white background, which made a map that is highest on an
    object look darkest there. One cell per decoder image token (no smoothing), bright = more attention.
    """
    w, h = image.size
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    left.imshow(image, interpolation="nearest")
    left.set_title("generated image", fontsize=11)
    shown = middle.imshow(heatmap, cmap=HEAT_CMAP, vmin=0.0, vmax=max(float(heatmap.max()), 1e-9),
                          extent=(0, w, h, 0), interpolation="nearest")
    if isinstance(word, Word):
        word = word.text
    about = f"'{_label(word)}'" if word is not None else "the word"
    middle.set_title(f"attention to {about}" + (f" at step {step}" if step is not None else ""), fontsize=11)
    fig.colorbar(shown, ax=middle, shrink=0.85, label="attention probability\n(bright = more)")
    right.imshow(image, interpolation="nearest")
    peak = float(heatmap.max())
    if peak > float(heatmap.min()):  # a flat map has no contours
        gh, gw = heatmap.shape
        xs, ys = (np.arange(gw) + 0.5) * w / gw, (np.arange(gh) + 0.5) * h / gh  # cell centres in pixels
        right.contour(xs, ys, heatmap, levels=[0.5 * peak, 0.75 * peak], colors=["tab:cyan", "black"],
                      linewidths=[1.5, 2.0])
    right.set_title("where it is high: 50% (cyan), 75% (black) of max", fontsize=10)
    for ax in (left, middle, right):
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


__all__ = [
    "GATE_KINDS",
    "HEAT_CMAP",
    "RefinerReport",
    "Word",
    "plot_gates",
    "plot_refiner_attention",
    "plot_token_movement",
    "plot_word_heatmap",
    "refiner_report",
    "word_attention_map",
]
