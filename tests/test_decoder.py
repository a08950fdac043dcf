"""Tiny-config CPU tests for the shared layers, the token refiner and the MMDiT-X visual decoder."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from ovis_u1.config import DecoderConfig, RefinerConfig, get_preset
from ovis_u1.decoder import VisualDecoder, latent_ids, pack_latents, unpack_latents
from ovis_u1.layers import EmbedND, apply_rope, attention, attention_weights, sdpa
from ovis_u1.refiner import TokenRefiner
from ovis_u1.sampling import FirstBlockCache, cached_forward

LATENT_H = LATENT_W = 8  # tiny latent grid -> 16 image tokens


def _perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    # The zero-initialised adaLN layers make the blocks identities; perturb so every path is live.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny")


@pytest.fixture
def refiner(tiny):
    torch.manual_seed(0)
    return _perturb(TokenRefiner(tiny.refiner))


@pytest.fixture
def decoder(tiny):
    torch.manual_seed(0)
    return _perturb(VisualDecoder(tiny.decoder))


def _decoder_inputs(cfg: DecoderConfig, batch: int = 2, n_txt: int = 5, with_ref: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_img = (LATENT_H // 2) * (LATENT_W // 2)
    kw = {
        "img": torch.randn(batch, n_img, cfg.in_channels, generator=g),
        "img_ids": latent_ids(batch, LATENT_H, LATENT_W),
        "txt": torch.randn(batch, n_txt, cfg.hidden_size, generator=g),
        "txt_ids": torch.zeros(batch, n_txt, 3),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, cfg.vec_in_dim, generator=g),
    }
    if with_ref:
        kw["ref"] = torch.randn(batch, n_img, cfg.in_channels, generator=g)
        kw["ref_ids"] = latent_ids(batch, LATENT_H, LATENT_W, index=1)
    return kw


def _assert_all_grads(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# ------------------------------------------------------------------------------------------ layers

def test_rope_matches_complex_rotation():
    # Independent reference: channel pairs (2p, 2p+1) as complex numbers times exp(i * pos * freq_p),
    # each axis owning its own consecutive slice of pairs.
    axes, theta = (4, 6, 6), 10000.0
    ids = torch.randint(0, 20, (2, 7, 3)).float()
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    rq, rk = apply_rope(q, k, EmbedND(16, theta, axes)(ids))
    angles = torch.cat([ids[..., a, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)
                        for a, d in enumerate(axes)], dim=-1)  # [B, L, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]  # [B, 1, L, D/2]
    for x, rx in ((q, rq), (k, rk)):
        ref = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 3, 7, 8, 2)) * rot)
        torch.testing.assert_close(rx, ref.reshape(2, 3, 7, 16).float(), atol=1e-5, rtol=1e-5)


def test_attention_weights_match_sdpa():
    q, k, v = torch.randn(3, 2, 2, 6, 8).unbind(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    w = attention_weights(q, k, mask=mask)
    expected = torch.einsum("bhqk,bhkd->bqhd", w, v).reshape(2, 6, 16)
    torch.testing.assert_close(attention(q, k, v, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_bf16_cpu_attention_path_matches_float32():
    """Under bf16 autocast on CPU, sdpa takes explicit matmuls; values and gradients track float32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 32, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 30:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), ref)  # float32: the fused kernel itself
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = sdpa(*low, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for got, want in zip(torch.autograd.grad(out.float().square().sum(), low), ref_grads):
        assert (got.float() - want).norm() / want.norm() < 0.02


# ------------------------------------------------------------------------------------------ refiner

def test_refiner_forward_backward(tiny, refiner):
    cfg = tiny.refiner
    x = torch.randn(2, 7, cfg.in_dim)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = refiner.train()(x, mask, return_attention=True)
    assert out.tokens.shape == (2, 7, cfg.hidden_size)
    assert out.cls.shape == (2, cfg.hidden_size)
    assert len(out.attention) == len(out.gates) == cfg.depth
    assert out.attention[0].shape == (2, cfg.num_heads, 8, 8)
    torch.testing.assert_close(out.attention[0].sum(-1), torch.ones(2, cfg.num_heads, 8))
    assert out.attention[0][1, :, :, 5:].abs().max() == 0  # padded keys get no weight
    assert out.gates[0][0].shape == (2, cfg.hidden_size)
    (out.tokens[mask].square().mean() + out.cls.square().mean()).backward()
    _assert_all_grads(refiner)


def test_refiner_zero_gates_at_init(tiny):
    # adaLN-Zero: an untrained refiner is input_embedder on the tokens and the raw CLS.
    ref = TokenRefiner(tiny.refiner)
    x = torch.randn(1, 3, tiny.refiner.in_dim)
    out = ref(x)
    torch.testing.assert_close(out.tokens, ref.input_embedder(x))
    torch.testing.assert_close(out.cls, ref.cls_token[:, 0])


def test_refiner_padding_parity(tiny, refiner):
    cfg = tiny.refiner
    a, b = torch.randn(1, 6, cfg.in_dim), torch.randn(1, 3, cfg.in_dim)
    padded = torch.cat([a, torch.cat([b, torch.randn(1, 3, cfg.in_dim)], dim=1)])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        both = refiner(padded, mask)
        alone_a, alone_b = refiner(a), refiner(b)
    torch.testing.assert_close(both.tokens[0], alone_a.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.tokens[1, :3], alone_b.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.cls[0], alone_a.cls[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.cls[1], alone_b.cls[0], atol=1e-5, rtol=0)


def test_refiner_has_no_timestep(tiny, refiner):
    params = inspect.signature(TokenRefiner.forward).parameters
    assert not any("time" in name or name == "t" for name in params)
    assert not any("time" in name for name, _ in refiner.named_parameters())
    x = torch.randn(1, 4, tiny.refiner.in_dim)
    with torch.no_grad():
        torch.testing.assert_close(refiner(x).tokens, refiner(x).tokens, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ decoder

@pytest.mark.parametrize("with_ref", [False, True])
def test_decoder_forward_backward(tiny, decoder, with_ref):
    cfg = tiny.decoder
    kw = _decoder_inputs(cfg, with_ref=with_ref)
    kw["txt_mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = decoder.train()(**kw)
    assert out.shape == (2, kw["img"].shape[1], cfg.out_channels)
    out.square().mean().backward()
    _assert_all_grads(decoder)


def test_decoder_init_predicts_zero(tiny):
    dec = VisualDecoder(tiny.decoder)
    assert dec(**_decoder_inputs(tiny.decoder)).abs().max() == 0


def test_decoder_sample_prediction_returns_velocity(tiny):
    """prediction="sample": the final layer's output is x0, and forward returns (x_t - x0) / max(t, min_t)."""
    cfg = dataclasses.replace(tiny.decoder, prediction="sample")
    torch.manual_seed(0)
    dec = _perturb(VisualDecoder(cfg))
    ref = VisualDecoder(tiny.decoder)  # the same weights read as a velocity decoder
    ref.load_state_dict(dec.state_dict())
    kw = _decoder_inputs(cfg, with_ref=True)
    kw["timesteps"] = torch.tensor([0.6, 0.001])  # the second row is below min_t
    with torch.no_grad():
        x0 = ref.eval()(**kw)
        v = dec(**kw)
    t = torch.tensor([0.6, cfg.min_t])[:, None, None]
    torch.testing.assert_close(v, (kw["img"] - x0) / t)
    # An untrained sample decoder predicts x0 = 0, i.e. the velocity x_t / t.
    fresh = VisualDecoder(cfg)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**kw), kw["img"] / t)


def test_decoder_rejects_unknown_prediction(tiny):
    with pytest.raises(ValueError, match="prediction must be 'velocity' or 'sample'"):
        VisualDecoder(dataclasses.replace(tiny.decoder, prediction="epsilon"))


def test_decoder_padding_parity(tiny, decoder):
    cfg = tiny.decoder
    kw = _decoder_inputs(cfg, n_txt=6)
    short = 4
    kw["txt"][1, short:] = 100.0  # garbage in the padded slots must not leak
    kw["txt_mask"] = torch.tensor([[True] * 6, [True] * short + [False] * 2])
    with torch.no_grad():
        both = decoder(**kw)
        for row, n in ((0, 6), (1, short)):
            alone = decoder(img=kw["img"][row:row + 1], img_ids=kw["img_ids"][row:row + 1],
                            txt=kw["txt"][row:row + 1, :n], txt_ids=kw["txt_ids"][row:row + 1, :n],
                            timesteps=kw["timesteps"][row:row + 1], y=kw["y"][row:row + 1])
            torch.testing.assert_close(both[row], alone[0], atol=1e-5, rtol=0)


def test_decoder_depends_on_timestep(tiny, decoder):
    kw = _decoder_inputs(tiny.decoder)
    with torch.no_grad():
        a = decoder(**{**kw, "timesteps": torch.full((2,), 0.2)})
        b = decoder(**{**kw, "timesteps": torch.full((2,), 0.8)})
    assert (a - b).abs().max() > 1e-4


def test_decoder_reference_changes_output(tiny, decoder):
    kw = _decoder_inputs(tiny.decoder, with_ref=True)
    with torch.no_grad():
        with_ref = decoder(**kw)
        without = decoder(**{k: v for k, v in kw.items() if k not in ("ref", "ref_ids")})
    assert with_ref.shape == without.shape
    assert (with_ref - without).abs().max() > 1e-4


def test_joint_attention_weights_through_a_hook(tiny, decoder):
    cfg = tiny.decoder
    kw = _decoder_inputs(cfg, with_ref=True)
    kw["txt_mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    record: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: record.append(m.joint_attention_weights(*args)))
             for b in decoder.double_blocks]
    with torch.no_grad():
        out = decoder(**kw)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = decoder(**kw)
    torch.testing.assert_close(out, plain)
    n = 5 + 2 * kw["img"].shape[1]
    assert len(record) == cfg.depth
    for rec in record:
        assert rec.shape == (2, n, n)
        torch.testing.assert_close(rec.sum(-1), torch.ones(2, n))
        assert rec[1, :, 3:5].abs().max() == 0


# ------------------------------------------------------------------------------------------ layout

def test_pack_unpack_round_trip():
    latents = torch.randn(2, 4, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 5, 16)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), latents, atol=0, rtol=0)
    # Token t holds the 2x2 patch at (row, col) = divmod(t, w/2), channel-major inside the token.
    torch.testing.assert_close(tokens[0, 6].view(4, 2, 2), latents[0, :, 2:4, 2:4])
    ids = latent_ids(2, 6, 10, index=1)
    assert ids.shape == (2, 15, 3)
    assert ids[0, 6].tolist() == [1.0, 1.0, 1.0] and ids[1, 14].tolist() == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("call", [
    lambda: pack_latents(torch.zeros(1, 4, 5, 8)),
    lambda: unpack_latents(torch.zeros(1, 8, 16), 4, 7),
    lambda: latent_ids(1, 3, 4),
])
def test_odd_size_errors(call):
    with pytest.raises(ValueError, match="even"):
        call()


# ------------------------------------------------------------------------------------------ cache

def test_first_block_cache_threshold_zero_never_hits(tiny, decoder):
    kw = _decoder_inputs(tiny.decoder)
    cache = FirstBlockCache(threshold=0.0)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(cached_forward(decoder, cache, **kw), decoder(**kw), atol=0, rtol=0)
    assert cache.calls == 3 and cache.hits == 0


def test_first_block_cache_hits(tiny, decoder):
    kw = _decoder_inputs(tiny.decoder, with_ref=True)
    cache = FirstBlockCache(threshold=1e9)
    with torch.no_grad():
        first = cached_forward(decoder, cache, **kw)
        second = cached_forward(decoder, cache, **kw)
    assert (cache.calls, cache.hits) == (2, 1)
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    # A new batch shape drops the stored residuals: the next call is a full one.
    with torch.no_grad():
        cached_forward(decoder, cache, **_decoder_inputs(tiny.decoder, batch=1))
    assert (cache.calls, cache.hits) == (3, 1)
    cache.reset()
    assert (cache.calls, cache.hits) == (0, 0)


# ------------------------------------------------------------------------------------------ full size

FULL_DECODER_SHAPES = {
    "img_in.weight": (1536, 64),
    "time_in.in_layer.weight": (1536, 256), "time_in.out_layer.weight": (1536, 1536),
    "vector_in.in_layer.weight": (1536, 1536), "vector_in.out_layer.weight": (1536, 1536),
    "final_layer.linear.weight": (64, 1536), "final_layer.adaLN_modulation.1.weight": (3072, 1536),
}
for _i in range(6):
    _p = f"double_blocks.{_i}."
    FULL_DECODER_SHAPES.update({_p + "img_mod.lin.weight": (13824, 1536), _p + "txt_mod.lin.weight": (9216, 1536)})
    for _a in ("img_attn", "img_self_attn", "txt_attn"):
        FULL_DECODER_SHAPES.update({
            _p + f"{_a}.qkv.weight": (4608, 1536), _p + f"{_a}.proj.weight": (1536, 1536),
            _p + f"{_a}.norm.query_norm.scale": (128,), _p + f"{_a}.norm.key_norm.scale": (128,),
        })
    for _m in ("img_mlp", "txt_mlp"):
        FULL_DECODER_SHAPES.update({_p + f"{_m}.0.weight": (6144, 1536), _p + f"{_m}.2.weight": (1536, 6144)})
for _i in range(12):
    _p = f"single_blocks.{_i}."
    FULL_DECODER_SHAPES.update({
        _p + "linear1.weight": (10752, 1536), _p + "linear2.weight": (1536, 7680),
        _p + "modulation.lin.weight": (4608, 1536),
        _p + "norm.query_norm.scale": (128,), _p + "norm.key_norm.scale": (128,),
    })

FULL_REFINER_SHAPES = {
    "input_embedder.weight": (1536, 4096), "c_embedder.linear_1.weight": (1536, 4096),
    "c_embedder.linear_2.weight": (1536, 1536), "cls_token": (1, 1, 1536),
}
for _i in range(2):
    _p = f"individual_token_refiner.blocks.{_i}."
    FULL_REFINER_SHAPES.update({
        _p + "norm1.weight": (1536,), _p + "norm1.bias": (1536,),
        _p + "norm2.weight": (1536,), _p + "norm2.bias": (1536,),
        _p + "self_attn_qkv.weight": (4608, 1536), _p + "self_attn_proj.weight": (1536, 1536),
        _p + "mlp.fc1.weight": (6144, 1536), _p + "mlp.fc2.weight": (1536, 6144),
        _p + "adaLN_modulation.1.weight": (3072, 1536),
    })


def _with_biases(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    # Every Linear has a bias of its output size.
    out = dict(shapes)
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            out[name[: -len("weight")] + "bias"] = shape[:1]
    return out


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        dec, ref = VisualDecoder(DecoderConfig()), TokenRefiner(RefinerConfig())
    for model, expected in ((dec, FULL_DECODER_SHAPES), (ref, FULL_REFINER_SHAPES)):
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == _with_biases(expected)
    n_params = sum(p.numel() for m in (dec, ref) for p in m.parameters())
    assert 1.05e9 < n_params < 1.2e9, n_params
