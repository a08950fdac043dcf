"""Rectified-flow sampling for the visual decoder: schedule, guidance and the Euler loop.

x_t = (1 - t) x_0 + t noise; the decoder predicts v = noise - x_0; Euler steps t: 1 -> 0.

Why not diffusers' FlowMatchEulerDiscreteScheduler: its default sigmas are N points from 1 down to
sigma_min = 1/num_train_timesteps followed by 0, whereas the published recipe steps over
linspace(1, 0, steps + 1); the two differ at every interior step (measured: 0.33 vs 0.334 at N=4), so
it only matches when handed our own sigmas, and then it adds nothing over the 3-line Euler step here.

Rows layout: every guidance branch holds one row per sample, branch-major ([branch0 x B, branch1 x B]),
so a step can evaluate all branches in one batched forward; `branch_groups` splits it where a shared
forward would need an attention mask, and `combine` folds the branches into one velocity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

StepCallback = Callable[[int, int, Tensor], None]


def time_shift(mu: float, t: Tensor) -> Tensor:
    """FLUX shift t' = e^mu / (e^mu + (1/t - 1)); t = 0 stays 0."""
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t.clamp(min=1e-12) - 1))
    return torch.where(t > 0, shifted, t)


def shift_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096,
             base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu linear in the image-token count between (256, 0.5) and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> Tensor:
    """num_steps + 1 times from 1 to 0 (float64, so exact and plain modes share the very same values).

    With `shift`, mu runs linearly from base_shift at 256 image tokens to max_shift at 4096 (the decoder
    config's `base_shift` / `max_shift`).
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    mu = shift_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift)
    return time_shift(mu, t) if shift else t


NOISE_MODES = ("per_sample", "published")


def draw_noise(shape: tuple[int, int, int, int], seed: int | None = None, generator=None,
               mode: str = "per_sample", device: torch.device | str = "cpu") -> Tensor:
    """Initial noise [B, C, h, w] from a seed or from torch.Generators (`GenerationConfig.noise` says how).

    "published" (the release's get_noise): one draw of the whole batch in bfloat16 on `device`, from a
    generator seeded with `seed`, so a seed gives the release's noise on that device. "per_sample": image k
    from a float32 CPU generator seeded with seed + k, so an image does not depend on the device or on
    the batch it is drawn in. `generator` replaces the seed: one generator draws the whole batch, a list
    draws one image each (as diffusers pipelines take them), in the mode's dtype on the generator's device.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode {mode!r}; choose one of {NOISE_MODES}")
    if (seed is None) == (generator is None):
        raise ValueError("give exactly one of seed and generator")
    b = shape[0]
    dtype = torch.bfloat16 if mode == "published" else torch.float32
    if generator is None:
        if mode == "published":
            device = torch.device(device)
            return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device,
                               dtype=dtype)
        return torch.cat([torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(seed + k),
                                      dtype=dtype) for k in range(b)])
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    generators = list(generator)
    if len(generators) != b or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator must be a torch.Generator or a list of {b} of them (one per image), "
                         f"got {len(generators)} items")
    return torch.cat([torch.randn(1, *shape[1:], generator=g, device=g.device, dtype=dtype).to(generators[0].device)
                      for g in generators])


def t2i_guidance(scale: float) -> Callable[[Tensor], Tensor]:
    """v = v_uncond + s (v_cond - v_uncond); branches (cond, uncond)."""
    return lambda v: v[1] + scale * (v[0] - v[1])


def edit_guidance(txt_scale: float, img_scale: float) -> Callable[[Tensor], Tensor]:
    """v = v_no_both + img (v_no_txt - v_no_both) + txt (v_cond - v_no_txt); branches (cond, no_txt, no_both)."""
    return lambda v: v[2] + img_scale * (v[1] - v[2]) + txt_scale * (v[0] - v[1])


@dataclass
class FirstBlockCache:
    """Skip all blocks after the first when the first block's image residual barely changed.

    The change is mean|r - r_ref| / mean|r_ref|, with r the first double block's image-stream residual
    (output - input) and r_ref the one stored at the last *full* computation (as in diffusers): comparing
    against the last full step, not the last call, bounds the drift that consecutive skips can build up.
    Use one cache per guidance branch (or batch the branches), since their residuals differ.
    """

    threshold: float
    hits: int = 0
    calls: int = 0
    _first_residual: Tensor | None = field(default=None, repr=False)
    _remaining_residual: Tensor | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.hits = self.calls = 0
        self._first_residual = self._remaining_residual = None

    def should_skip(self, first_residual: Tensor) -> bool:
        self.calls += 1
        prev = self._first_residual
        if prev is not None and prev.shape != first_residual.shape:
            # A new batch shape means a new sampling run: the stored residuals no longer apply.
            self._first_residual = self._remaining_residual = prev = None
        if prev is None or self._remaining_residual is None:
            return False
        change = (first_residual.float() - prev.float()).abs().mean() / prev.float().abs().mean().clamp_min(1e-12)
        hit = bool(change < self.threshold)
        self.hits += int(hit)
        return hit

    @property
    def remaining_residual(self) -> Tensor:
        assert self._remaining_residual is not None
        return self._remaining_residual

    def store(self, first_residual: Tensor, remaining_residual: Tensor) -> None:
        # Detached: the cache is a sampling device and must not keep autograd graphs alive.
        self._first_residual = first_residual.detach()
        self._remaining_residual = remaining_residual.detach()


def cached_forward(decoder, cache: FirstBlockCache, *inputs, **kw) -> Tensor:
    """The decoder's forward (same arguments), skipping every block after the first when `cache` says the
    first block's residual barely changed since its last full computation."""
    if not decoder.double_blocks:
        raise ValueError("FirstBlockCache needs at least one double block")
    state = decoder.embed(*inputs, **kw)
    first = decoder.double_stream(state, 0, 1)
    first_residual = first.x - state.x
    if cache.should_skip(first_residual):
        return decoder.head(first, first.x + cache.remaining_residual.to(first.x.dtype))
    x = decoder.single_stream(decoder.double_stream(first, 1, len(decoder.double_blocks)))
    cache.store(first_residual, x - first.x)
    return decoder.head(first, x)


@dataclass
class DecoderInputs:
    """Step-independent decoder inputs for all rows (branch-major), computed once per request."""

    txt: Tensor  # [R, L, D] refined text stream
    txt_mask: Tensor | None  # [R, L] True = real token
    y: Tensor  # [R, D] refiner CLS output
    n_branches: int
    ref: Tensor | None = None  # [R, L_ref, C] reference latent tokens (editing)
    ref_ids: Tensor | None = None
    ref_mask: Tensor | None = None  # [R, L_ref] False for branches that must not see the reference

    def rows(self, branches: int) -> DecoderInputs:
        """The first `branches` branches only (the conditional one first)."""
        b = self.txt.shape[0] // self.n_branches * branches
        def pick(x):
            return (None if x is None else x[:b])
        return DecoderInputs(self.txt[:b], pick(self.txt_mask), self.y[:b], branches, pick(self.ref),
                             pick(self.ref_ids), pick(self.ref_mask))

    def select(self, start: int, stop: int) -> DecoderInputs:
        """Branches [start, stop) without the text padding and the hidden reference none of their rows uses.

        Padded text keys and masked reference tokens cost a full token's compute each and contribute
        nothing, so a forward over the selection does only the work the published per-branch loop does.
        """
        b = self.txt.shape[0] // self.n_branches
        rows = slice(start * b, stop * b)
        txt, mask = self.txt[rows], None if self.txt_mask is None else self.txt_mask[rows]
        if mask is not None:
            used = mask.any(dim=0)  # [L]: text columns some row of the selection needs
            txt, mask = txt[:, used], mask[:, used]
            mask = None if mask.all() else mask
        ref, ref_ids, ref_mask = (None if v is None else v[rows]
                                  for v in (self.ref, self.ref_ids, self.ref_mask))
        if ref_mask is not None:
            if not ref_mask.any():
                ref = ref_ids = ref_mask = None
            elif ref_mask.all():
                ref_mask = None
        return DecoderInputs(txt, mask, self.y[rows], stop - start, ref, ref_ids, ref_mask)


def branch_groups(inputs: DecoderInputs) -> list[tuple[int, int]]:
    """Runs [start, stop) of consecutive branches that one forward can take without an attention mask.

    Branches share a forward when their rows agree on seeing the reference and on their text lengths.
    A mask costs twice: a branch that must not see the reference would carry every reference token
    masked (as much compute as the target tokens, for nothing), and any mask at all, the text padding's
    too, keeps CUDA's scaled-dot-product attention off its flash kernel (on an H200, bf16, 2 x 24 heads
    of 128 over 4,200 / 8,400 tokens: 1.13 / 4.40 ms with a key-padding mask against 0.79 / 3.06 without).
    With one prompt per call every forward is mask-free; several prompts of different lengths in one call
    still pad within a branch. On the CPU the split measured level with batching (`ovis_u1.bench`).
    """
    b = inputs.txt.shape[0] // inputs.n_branches

    def key(k: int) -> tuple:
        rows = slice(k * b, (k + 1) * b)
        sees = None if inputs.ref is None else (
            (True,) * b if inputs.ref_mask is None else tuple(inputs.ref_mask[rows].any(dim=1).tolist()))
        lengths = ((inputs.txt.shape[1],) * b if inputs.txt_mask is None
                   else tuple(inputs.txt_mask[rows].sum(dim=1).tolist()))
        return sees, lengths

    keys = [key(k) for k in range(inputs.n_branches)]
    groups: list[tuple[int, int]] = []
    for k in range(inputs.n_branches):
        if groups and keys[k] == keys[groups[-1][0]]:
            groups[-1] = (groups[-1][0], k + 1)
        else:
            groups.append((k, k + 1))
    return groups


def denoise(decoder, x: Tensor, img_ids: Tensor, inputs: DecoderInputs, timesteps: Tensor,
            combine: Callable[[Tensor], Tensor], guidance_interval: tuple[float, float] | None = None,
            cache=None, callback: StepCallback | None = None,
            branch_groups: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Euler loop over packed latent tokens x [B, L, C]; all guidance branches in one forward per step.

    With `guidance_interval=(lo, hi)` the unconditional branches run only while lo <= t <= hi; outside
    it the conditional velocity is used alone (guidance matters most in the middle of the trajectory).
    `branch_groups` (e.g. from the function of that name) splits a step into one forward per run of branches
    [start, stop), each without the text padding and hidden reference it does not need; the `cache` given
    serves every forward that includes the conditional branch, and each other group gets its own (the
    residuals of different rows are not comparable); their hits and calls are added to `cache` at the end.
    """
    total = len(timesteps) - 1
    if branch_groups is None:
        guided_parts, cond_parts = [((0, inputs.n_branches), inputs)], [((0, 1), inputs.rows(1))]
    else:
        guided_parts = [(g, inputs.select(*g)) for g in branch_groups]
        cond_parts = [((0, 1), inputs.select(0, 1))]
    caches = {}

    def cache_for(group):
        if cache is None or group[0] == 0:
            return cache
        if group not in caches:
            caches[group] = type(cache)(cache.threshold)
        return caches[group]

    for i in range(total):
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        guided = guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]
        vs = []
        for group, inp in guided_parts if guided else cond_parts:
            k = inp.n_branches
            rows = x.repeat(k, 1, 1)
            ids = img_ids.repeat(k, 1, 1) if img_ids.shape[0] == x.shape[0] else img_ids
            txt_ids = torch.zeros(*inp.txt.shape[:2], 3, device=x.device, dtype=x.dtype)
            args = (rows, ids, inp.txt, txt_ids, torch.full((rows.shape[0],), t, device=x.device, dtype=x.dtype),
                    inp.y)
            kw = dict(txt_mask=inp.txt_mask, ref=inp.ref, ref_ids=inp.ref_ids, ref_mask=inp.ref_mask)
            group_cache = cache_for(group)
            if group_cache is None:
                vs.append(decoder(*args, **kw))
            else:
                vs.append(cached_forward(decoder, group_cache, *args, **kw))
        v = torch.cat(vs).float().unflatten(0, (-1, x.shape[0]))
        v = combine(v) if guided else v[0]
        x = (x.float() + (t_next - t) * v).to(x.dtype)
        if callback is not None:
            callback(i + 1, total, x)
    for extra in caches.values():  # report every group's hits on the cache the caller holds
        cache.hits += extra.hits
        cache.calls += extra.calls
    return x
