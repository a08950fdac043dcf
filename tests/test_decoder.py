"""The MMDiT-X visual decoder (ovis_u1/decoder.py) on the tiny preset: shapes, gradients, padding, the
reference image, both prediction targets, the latent layout, and the full-size parameter shapes (with the
refiner's: both sit in the published visual_generator)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import missing_grads, perturb

from ovis_u1.config import DecoderConfig, RefinerConfig, get_preset
from ovis_u1.decoder import VisualDecoder, latent_ids, pack_latents, unpack_latents
from ovis_u1.refiner import TokenRefiner

LATENT_H = LATENT_W = 8  # tiny latent grid -> 16 image tokens


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny")


@pytest.fixture
def decoder(tiny):
    # The zero-initialised adaLN layers make the blocks identities; perturbed, every path is live.
    torch.manual_seed(0)
    return perturb(VisualDecoder(tiny.decoder)).eval()


def decoder_inputs(cfg: DecoderConfig, batch: int = 2, n_txt: int = 5, with_ref: bool = False, seed: int = 0):
    """Keyword arguments of one decoder call on random inputs (test_sampling reuses them)."""
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


# ------------------------------------------------------------------------------------------ decoder

@pytest.mark.parametrize("with_ref", [False, True])
def test_decoder_forward_backward(tiny, decoder, with_ref):
    cfg = tiny.decoder
    kw = decoder_inputs(cfg, with_ref=with_ref)
    kw["txt_mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = decoder.train()(**kw)
    assert out.shape == (2, kw["img"].shape[1], cfg.out_channels)
    out.square().mean().backward()
    assert missing_grads(decoder) == []


def test_decoder_init_predicts_zero(tiny):
    dec = VisualDecoder(tiny.decoder)
    assert dec(**decoder_inputs(tiny.decoder)).abs().max() == 0


def test_decoder_sample_prediction_returns_velocity(tiny):
    """prediction="sample": the final layer's output is x0, and forward returns (x_t - x0) / max(t, min_t)."""
    cfg = dataclasses.replace(tiny.decoder, prediction="sample")
    torch.manual_seed(0)
    dec = perturb(VisualDecoder(cfg)).eval()
    ref = VisualDecoder(tiny.decoder)  # the same weights read as a velocity decoder
    ref.load_state_dict(dec.state_dict())
    kw = decoder_inputs(cfg, with_ref=True)
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
    kw = decoder_inputs(cfg, n_txt=6)
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
    kw = decoder_inputs(tiny.decoder)
    with torch.no_grad():
        a = decoder(**{**kw, "timesteps": torch.full((2,), 0.2)})
        b = decoder(**{**kw, "timesteps": torch.full((2,), 0.8)})
    assert (a - b).abs().max() > 1e-4


def test_decoder_sees_the_reference_unless_it_is_masked(tiny, decoder):
    kw = decoder_inputs(tiny.decoder, with_ref=True)
    without_kw = {k: v for k, v in kw.items() if k not in ("ref", "ref_ids")}
    with torch.no_grad():
        with_ref = decoder(**kw)
        without = decoder(**without_kw)
        hidden = decoder(**kw, ref_mask=torch.zeros(2, kw["ref"].shape[1], dtype=torch.bool))
    assert with_ref.shape == without.shape  # the output is cut back to the target tokens
    assert (with_ref - without).abs().max() > 1e-4
    torch.testing.assert_close(hidden, without, rtol=1e-4, atol=1e-5)  # a masked reference is not seen


def test_joint_attention_weights_through_a_hook(tiny, decoder):
    cfg = tiny.decoder
    kw = decoder_inputs(cfg, with_ref=True)
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
