"""The language model: transformers' Qwen3ForCausalLM, plus the two places Ovis-U1 touches it.

1. Input side: placeholder ids in `input_ids` (the visual atom and the image indicators, all negative)
   are replaced in `inputs_embeds` by visual embeddings (visual-token probabilities @ VTE) and by VTE rows.
   Indicator -301-k takes VTE row V-5+k, as the published code does: row V-5 is also the last visual word's
   row (the head has V-4 columns), an overlap the published model has and this one keeps.
2. Output side (generation path): the condition is the concatenation of the last two hidden layers over
   all prompt tokens, image tokens included: the last layer first, then the one before it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers import Qwen3Config, Qwen3ForCausalLM

from .config import LLMConfig
from .prompts import INDICATOR_IDS, VISUAL_ATOM_ID


def build_llm(cfg: LLMConfig) -> Qwen3ForCausalLM:
    hf = Qwen3Config(**dataclasses.asdict(cfg), use_cache=True)
    # SDPA keeps the model runnable on CPU; flash-attention is never required.
    hf._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(hf)


def embed_multimodal(llm: Qwen3ForCausalLM, vte: torch.nn.Embedding, input_ids: Tensor,
                     visual_probs: Tensor | None) -> Tensor:
    """[B, L] ids with placeholders -> [B, L, D] embeddings.

    `visual_probs` [n, V] holds the visual tokens of every image in the batch, in the order their atom
    positions appear when the batch is read row by row.
    """
    text_embed = llm.get_input_embeddings()
    embeds = text_embed(input_ids.clamp(min=0))
    atoms = input_ids == VISUAL_ATOM_ID
    n_atoms = int(atoms.sum())
    n_visual = 0 if visual_probs is None else visual_probs.shape[0]
    if n_atoms != n_visual:
        raise ValueError(f"prompt has {n_atoms} visual-token positions but the images gave {n_visual} tokens")
    embeds = embeds.clone()
    if n_atoms:
        embeds[atoms] = (visual_probs.to(vte.weight.dtype) @ vte.weight).to(embeds.dtype)
    for k, ind in enumerate(INDICATOR_IDS):
        where = input_ids == ind
        if where.any():
            embeds[where] = vte.weight[indicator_row(vte.num_embeddings, k)].to(embeds.dtype)
    return embeds


def indicator_row(vocab_size: int, k: int) -> int:
    """VTE row of indicator id -301-k: V-5+k (the published code embeds rows V-5..V-1 and takes the k-th)."""
    return vocab_size - len(INDICATOR_IDS) - 1 + k


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that start at 0 on each row's first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def condition_hidden_states(llm: Qwen3ForCausalLM, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L, D] embeddings -> [B, L, 2D]: the LLM's last hidden layer, then the one before it."""
    out = llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True,
                    use_cache=False)
    hs = out.hidden_states
    return torch.cat([hs[-1], hs[-2]], dim=-1)


@torch.no_grad()
def generate_without_cache(llm: Qwen3ForCausalLM, inputs_embeds: Tensor, attention_mask: Tensor,
                           max_new_tokens: int, eos_token_id: int, pad_token_id: int, min_new_tokens: int = 0,
                           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                           no_repeat_ngram_size: int = 0, streamer=None, **_) -> Tensor:
    """`generate` that recomputes the whole sequence for every new token: the reference for the KV cache.

    transformers turns the cache back on whenever generation starts from `inputs_embeds` (as it must for
    image prompts), so `use_cache=False` needs its own loop. Returns the new tokens [B, n], rows that
    finished early padded with `pad_token_id`, as `generate` does for decoder-only inputs_embeds.
    """
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    # As generate does from inputs_embeds: only the new tokens count as n-grams.
    ban = NoRepeatNGramLogitsProcessor(no_repeat_ngram_size) if no_repeat_ngram_size else None
    embed = llm.get_input_embeddings()
    b, device = inputs_embeds.shape[0], inputs_embeds.device
    new = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    embeds, mask = inputs_embeds, attention_mask
    for i in range(max_new_tokens):
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     use_cache=False).logits[:, -1].float()
        if i < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if ban is not None and new.shape[1]:
            logits = ban(new, logits)
        if do_sample:
            token = torch.multinomial(warp(new, logits).softmax(dim=-1), num_samples=1)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new = torch.cat([new, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        done |= token == eos_token_id
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, embed(token)[:, None].to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if streamer is not None:
        streamer.end()
    return new
