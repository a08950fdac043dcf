"""OvisU1: the whole network, composed of its separately trained components.

The components are attributes named after the published checkpoint where they can be
(`visual_tokenizer`, `vte`, `llm`), and after what they are where the published names nest them
(`refiner` is `visual_generator.backbone.txt_in`, `decoder` is the rest of `visual_generator.backbone`,
`vae` is `visual_generator.vae`); `checkpoint.py` holds the one table that maps between the two.

The methods here are tensor-level building blocks; prompts, images, guidance and sampling live in
`images.py`, `prompts.py`, `sampling.py`, `generation.py` and `chat.py`, which the user-facing
`answer`/`text_to_image`/`edit` methods delegate to.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import OvisU1Config, get_preset
from .decoder import VisualDecoder
from .llm import build_llm, condition_hidden_states, embed_multimodal
from .refiner import TokenRefiner
from .vae import VAE
from .vision import VisualTokenizer


class OvisU1(nn.Module):
    def __init__(self, config: OvisU1Config, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual_tokenizer = VisualTokenizer(config.vision, config.adapter)
        self.vte = nn.Embedding(config.adapter.vocab_size, config.llm.hidden_size)
        self.llm = build_llm(config.llm)
        self.refiner = TokenRefiner(config.refiner)
        self.decoder = VisualDecoder(config.decoder)
        self.vae = VAE(config.vae)
        self._check_widths()

    def _check_widths(self) -> None:
        c = self.config
        needs = {
            "refiner.in_dim": (c.refiner.in_dim, 2 * c.llm.hidden_size, "2 x llm.hidden_size"),
            "decoder.hidden_size": (c.decoder.hidden_size, c.refiner.hidden_size, "refiner.hidden_size"),
            "decoder.vec_in_dim": (c.decoder.vec_in_dim, c.refiner.hidden_size, "refiner.hidden_size"),
            "decoder.in_channels": (c.decoder.in_channels, 4 * c.vae.latent_channels, "4 x vae.latent_channels"),
        }
        bad = [f"{k}={got} but must equal {what}={want}" for k, (got, want, what) in needs.items() if got != want]
        if bad:
            raise ValueError("inconsistent config: " + "; ".join(bad))

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, tokenizer=None) -> OvisU1:
        """A randomly initialised model of a named preset; `device="meta"` builds any size for free.

        Presets come with the project's small byte-level tokenizer unless one is given (the published
        Qwen tokenizer ships only with a checkpoint directory).
        """
        config = get_preset(name)
        if tokenizer is None:
            from .tokenizer import build_tokenizer, default_corpus
            tokenizer = build_tokenizer(default_corpus(), vocab_size=min(512, config.llm.vocab_size))
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls(config, tokenizer=tokenizer)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> OvisU1:
        """Load the project's format or the published Ovis-U1 layout; no path = the shipped default model."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, layout: str = "own", max_shard_size: int = 4 * 2**30) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path, layout=layout, max_shard_size=max_shard_size)

    def components(self) -> dict[str, nn.Module]:
        return {
            "vision": self.visual_tokenizer.backbone,
            "adapter": self.visual_tokenizer.head,
            "vte": self.vte,
            "llm": self.llm,
            "refiner": self.refiner,
            "decoder": self.decoder,
            "vae": self.vae,
        }

    def num_parameters_by_component(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in self.components().items()}
        counts["total"] = sum(counts.values())
        return counts

    @property
    def device(self) -> torch.device:
        # Under CPU offload (acceleration.enable_cpu_offload) weights rest on the CPU between uses; inputs
        # go to the execution device it records.
        return getattr(self, "offload_device", None) or self.vte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vte.weight.dtype

    # ---- tensor-level building blocks ---------------------------------------------------------------
    def visual_tokens(self, patches: list[Tensor], grid_thws: list[tuple[int, int, int]]) -> Tensor | None:
        """Per-image patch tensors -> [n, V] probabilistic visual tokens of all images, in order."""
        if not patches:
            return None
        pixels = torch.cat(patches).to(self.device, self.dtype)
        return self.visual_tokenizer(pixels, grid_thws)

    def embed(self, input_ids: Tensor, patches: list[Tensor], grid_thws) -> Tensor:
        input_ids = input_ids.to(self.device)
        return embed_multimodal(self.llm, self.vte, input_ids, self.visual_tokens(patches, grid_thws))

    def condition(self, input_ids: Tensor, attention_mask: Tensor, patches: list[Tensor], grid_thws) -> Tensor:
        """Generation condition [B, L, 2 x llm hidden] over every prompt token, image tokens included."""
        embeds = self.embed(input_ids, patches, grid_thws)
        return condition_hidden_states(self.llm, embeds, attention_mask.to(self.device))

    # ---- the user-facing API (generation.py, chat.py) -----------------------------------------------------
    def answer(self, question, images=None, **kwargs):
        from .chat import answer
        return answer(self, question, images=images, **kwargs)

    def text_to_image(self, prompt, **kwargs):
        from .generation import text_to_image
        return text_to_image(self, prompt, **kwargs)

    def edit(self, image, instruction, **kwargs):
        from .generation import edit
        return edit(self, image, instruction, **kwargs)
