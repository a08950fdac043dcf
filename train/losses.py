"""One loss per task, each a function of (model, list of samples): the trainer only sums them.

- understanding: next-token cross-entropy on the answer tokens (prompts.understanding_example masks
  the role header, the empty think block and the newline after <|im_end|>);
- text-to-image and editing: rectified-flow velocity MSE, with condition dropout so guidance works;
- the preparation tasks: VAE reconstruction, language-model pretraining on world text, and naming each
  image cell's object with the visual tokenizer (`cells`, shapes world only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ovis_u1.decoder import latent_ids, pack_latents
from ovis_u1.generation import encode_conditions, refine, vit_factor
from ovis_u1.images import blank_image, generation_image, image_patches, num_visual_tokens
from ovis_u1.prompts import (
    IGNORE_ID,
    UNCOND_TEXT,
    edit_prompt,
    expand_example,
    generation_prompt,
    pad_batch,
    t2i_prompts,
    tokenize_prompt,
    truncate_example,
    understanding_example,
)
from ovis_u1.shapes.world import COLOR_NAMES, SHAPES, cell_objects

CELL_BACKGROUND_WORD = len(COLOR_NAMES) + len(SHAPES)  # the visual word of an empty cell (cells task)


def images_to_tensor(images: list[Image.Image], device) -> Tensor:
    """PIL RGB images of one size -> [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1).permute(0, 3, 1, 2).to(device)


def _needs_grad(*modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def _conditions(model, texts: list[str], images: list[Image.Image]):
    """LLM conditions; skipped from autograd when nothing upstream of the refiner trains (stages 0, 4, 5)."""
    upstream = (model.llm, model.visual_tokenizer, model.components()["vte"])
    with torch.set_grad_enabled(torch.is_grad_enabled() and _needs_grad(*upstream)):
        return encode_conditions(model, texts, images)


def sample_t(n: int, device, generator: torch.Generator | None = None) -> Tensor:
    """Logit-normal t (SD3): more weight on the middle of the trajectory, where the velocity is hardest."""
    return torch.sigmoid(torch.randn(n, generator=generator)).to(device)


def flow_loss(model, x0: Tensor, cond: Tensor, mask: Tensor, latent_hw, ref: Tensor | None = None,
              ref_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Rectified-flow loss on packed tokens x0 [B, L, C]; x_t = (1 - t) x0 + t noise, velocity noise - x0."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = sample_t(b, x0.device, generator).to(x0.dtype)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    txt, cls = refine(model, cond, mask)
    h, w = latent_hw
    ids = latent_ids(b, h, w, device=x0.device).to(x0.dtype)
    ref_ids = None if ref is None else latent_ids(b, h, w, index=1, device=x0.device).to(x0.dtype)
    v = model.decoder(xt, ids, txt, torch.zeros(*txt.shape[:2], 3, device=x0.device, dtype=x0.dtype), t, cls,
                      txt_mask=mask, ref=ref, ref_ids=ref_ids, ref_mask=ref_mask)
    if model.decoder.cfg.prediction == "sample":
        # The decoder predicts x0 (and returns (x_t - x0) / t): its loss is the x0 error, which weighs the
        # velocity error by t^2, towards the noisy steps where the prompt decides the picture.
        pred, target = model.decoder.clean_latent(v, xt, t).float(), x0.float()
    else:
        pred, target = v.float(), (noise - x0).float()
    return F.mse_loss(pred, target)


@torch.no_grad()
def encode_latents(model, images: list[Image.Image]) -> tuple[Tensor, tuple[int, int]]:
    latents = model.vae.encode(images_to_tensor(images, model.device))
    return pack_latents(latents).float(), tuple(latents.shape[-2:])  # float32 targets under autocast too


def t2i_loss(model, samples, generator: torch.Generator, cond_dropout: float = 0.1) -> Tensor:
    x0, hw = encode_latents(model, [s.image for s in samples])
    keep = torch.rand(len(samples), generator=generator) >= cond_dropout
    prefix = model.config.generation.t2i_prefix
    texts = [t2i_prompts(s.caption, prefix)[0 if k else 1] for s, k in zip(samples, keep)]
    g = model.config.generation
    blanks = [blank_image(s.image.height, s.image.width, g.blank_image_max_pixels, vit_factor(model))
              for s in samples]
    cond, mask = _conditions(model, texts, blanks)
    return flow_loss(model, x0, cond, mask, hw, generator=generator)


def edit_loss(model, samples, generator: torch.Generator, cond_dropout: float = 0.1) -> Tensor:
    """Each row draws one of the three editing conditions: cond / no_txt (p) / no_both (p)."""
    x0, hw = encode_latents(model, [s.target for s in samples])
    ref, _ = encode_latents(model, [s.source for s in samples])
    u = torch.rand(len(samples), generator=generator)
    g = model.config.generation
    texts, images, sees_ref = [], [], []
    for s, r in zip(samples, u.tolist()):
        if r < cond_dropout:  # no_both: unconditional text, blank image, no reference
            texts.append(generation_prompt(UNCOND_TEXT))
            images.append(blank_image(s.source.height, s.source.width, g.blank_image_max_pixels, vit_factor(model)))
            sees_ref.append(False)
        else:  # the inputs edit() builds: the source as the ViT reads it, the instruction stripped
            texts.append(generation_prompt(UNCOND_TEXT) if r < 2 * cond_dropout else edit_prompt(s.instruction))
            images.append(generation_image(s.source, g.edit_image_max_pixels, vit_factor(model)))
            sees_ref.append(True)
    cond, mask = _conditions(model, texts, images)
    ref_mask = torch.tensor(sees_ref, device=ref.device)[:, None].expand(-1, ref.shape[1])
    return flow_loss(model, x0, cond, mask, hw, ref=ref.to(x0.dtype), ref_mask=ref_mask, generator=generator)


def vqa_loss(model, samples, generator: torch.Generator | None = None) -> Tensor:
    tok, cfg = model.tokenizer, model.config
    rows, labels, patches, grids = [], [], [], []
    for s in samples:
        counts = []
        for im in s.images:
            p, grid = image_patches(im, cfg)
            patches.append(p)
            grids.append(grid)
            counts.append(num_visual_tokens(grid, cfg.adapter.hidden_stride))
        ids, lab = understanding_example(tok, s.question, s.answer, len(s.images), history=s.history)
        ids, lab = expand_example(ids, lab, counts)
        ids, lab = truncate_example(ids, lab, cfg.generation.multimodal_max_length)
        rows.append(ids)
        labels.append(lab)
    input_ids, attn = pad_batch(rows, tok.pad_token_id, side="right")
    label_t, _ = pad_batch(labels, IGNORE_ID, side="right")
    embeds = model.embed(input_ids, patches, grids)
    out = model.llm(inputs_embeds=embeds, attention_mask=attn.to(model.device), labels=label_t.to(model.device),
                    use_cache=False)
    return out.loss


def lm_loss(model, texts: list[str], generator: torch.Generator | None = None) -> Tensor:
    """Plain next-token loss over whole lines (the preparation step that makes the LLM a language model)."""
    tok = model.tokenizer
    rows = [tokenize_prompt(tok, t) for t in texts]
    ids, attn = pad_batch(rows, tok.pad_token_id, side="right")
    labels = ids.masked_fill(attn == 0, IGNORE_ID)
    out = model.llm(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                    labels=labels.to(model.device), use_cache=False)
    return out.loss


def vae_loss(model, images: list[Image.Image], generator: torch.Generator | None = None,
             kl_weight: float = 1e-6) -> Tensor:
    """Reconstruction (L1 + MSE) plus a small KL term, on the raw AutoencoderKL (before shift/scale)."""
    x = images_to_tensor(images, model.device)
    ae = model.vae.autoencoder
    dist = ae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(x)
    rec = ae.decode(z).sample
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl


def cell_targets(scene, rows: int, cols: int, words: int) -> Tensor:
    """[rows * cols, words] target distributions over the visual words: half on the colour word and half
    on the shape word of the object covering most of each cell (words 0-5 the colours in COLOR_NAMES
    order, 6-8 the shapes in SHAPES order), all on word 9 for an empty cell."""
    target = torch.zeros(rows * cols, words)
    for k, obj in enumerate(cell_objects(scene, rows, cols)):
        if obj is None:
            target[k, CELL_BACKGROUND_WORD] = 1.0
        else:
            target[k, COLOR_NAMES.index(obj.color)] = target[k, len(COLOR_NAMES) + SHAPES.index(obj.shape)] = 0.5
    return target


def cells_loss(model, samples, generator: torch.Generator | None = None) -> Tensor:
    """The visual tokenizer names each cell's object: cross-entropy of its softmax over visual words against
    `cell_targets` (the preparation step standing in for the paper's pretrained ViT, and an auxiliary
    task that keeps those words while later stages train the ViT on other losses)."""
    cfg = model.config
    stride = cfg.adapter.hidden_stride
    words = cfg.adapter.vocab_size - cfg.adapter.num_indicators
    if words <= CELL_BACKGROUND_WORD:
        raise ValueError(f"the cells task needs at least {CELL_BACKGROUND_WORD + 1} visual words, the model "
                         f"has {words}")
    logits, grids = visual_word_logits(model, [s.image for s in samples])
    targets = [cell_targets(s.scene, grid[1] // stride, grid[2] // stride, words) for s, grid in zip(samples, grids)]
    return -(torch.cat(targets).to(logits.device) * logits.float().log_softmax(-1)).sum(-1).mean()


def visual_word_logits(model, images: list[Image.Image]) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """The adapter's logits over the visual words [tokens of all images, words] (before its softmax), in
    token order, and each image's patch grid."""
    cfg, tokenizer = model.config, model.visual_tokenizer
    cut = [image_patches(im, cfg) for im in images]
    grids = [grid for _, grid in cut]
    features = tokenizer.backbone(torch.cat([p for p, _ in cut]).to(model.device, model.dtype), grids)
    return tokenizer.head(features.reshape(-1, cfg.adapter.hidden_stride ** 2 * features.shape[-1])), grids


TASK_LOSSES = {"t2i": t2i_loss, "edit": edit_loss, "vqa": vqa_loss, "lm": lm_loss, "vae": vae_loss,
               "cells": cells_loss}
