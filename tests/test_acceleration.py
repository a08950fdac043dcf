"""GPU options on CPU where they can run: offload wiring and results, autocast; compile is slow-marked."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

from ovis_u1.acceleration import autocast, compile_decoder, enable_cpu_offload

GEN = {"num_inference_steps": 2, "progress": False, "output_type": "latent"}


def run_all(model, image):
    return (model.text_to_image("a red circle", **GEN),
            model.edit(image, "make it blue", **GEN),
            model.answer("What is in the image?", images=image, max_new_tokens=6))


def test_cpu_offload_wiring_and_results(make_tiny):
    model = make_tiny(0)
    image = random_image(40, 40, seed=2)
    t2i, edited, text = run_all(model, image)

    handle = enable_cpu_offload(model, device="cpu")  # accelerate allows the CPU as execution device
    assert model.device == torch.device("cpu")
    hooks = handle.hooks
    assert len(hooks) == 3
    # A cycle: each group moves the one before it out, the first one the VAE of the previous request.
    assert [h.hook.prev_module_hook for h in hooks] == [hooks[2], hooks[0], hooks[1]]
    loads = []
    names = ["understanding", "generation", "vae"]
    for name, h in zip(names, hooks):
        original = h.hook.pre_forward

        def spy(module, *args, _name=name, _orig=original, **kwargs):
            loads.append(_name)
            return _orig(module, *args, **kwargs)
        h.hook.pre_forward = spy

    assert torch.equal(model.text_to_image("a red circle", **GEN), t2i)
    order = [n for i, n in enumerate(loads) if i == 0 or loads[i - 1] != n]
    assert order == ["understanding", "generation"]  # latent output: no VAE decode
    loads.clear()
    model.text_to_image("a red circle", num_inference_steps=1, progress=False)
    assert [n for i, n in enumerate(loads) if i == 0 or loads[i - 1] != n] == names
    loads.clear()
    assert torch.equal(model.edit(image, "make it blue", **GEN), edited)
    order = [n for i, n in enumerate(loads) if i == 0 or loads[i - 1] != n]
    assert order == ["understanding", "vae", "generation"]  # conditions, reference latents, sampling
    loads.clear()
    assert model.answer("What is in the image?", images=image, max_new_tokens=6) == text
    assert set(loads) == {"understanding"}

    handle.remove()
    assert "offload_device" not in vars(model)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert torch.equal(model.text_to_image("a red circle", **GEN), t2i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_offload_on_cuda(make_tiny):
    model = make_tiny(0)
    reference = model.text_to_image("a red circle", **GEN)
    enable_cpu_offload(model, device="cuda")
    out = model.text_to_image("a red circle", num_inference_steps=2, progress=False)
    assert len(out) == 1
    assert model.decoder.img_in.weight.device.type == "cpu"  # moved out again by the VAE decode
    assert model.vae.autoencoder.decoder.conv_in.weight.device.type == "cuda"
    latents = model.text_to_image("a red circle", **GEN)
    assert latents.device.type == "cuda"
    torch.testing.assert_close(latents.cpu(), reference, atol=1e-3, rtol=1e-3)


def test_autocast_bfloat16_on_cpu(make_tiny):
    model = make_tiny(0)
    image = random_image(40, 40, seed=2)
    t2i, edited, _ = run_all(model, image)
    with autocast(model):
        t2i_bf16, edited_bf16, text = run_all(model, image)
    for ref, got in ((t2i, t2i_bf16), (edited, edited_bf16)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # bf16 matmuls: close to float32, not equal
        assert (got - ref).abs().max() < 0.1 * ref.abs().mean() + 0.05
    assert isinstance(text, str)


@pytest.mark.slow  # ~70 s of compilation on 2 CPU cores, well over the 30 s budget for the default run
def test_compile_decoder_matches(make_tiny):
    model = make_tiny(0)
    reference = model.text_to_image("a red circle", **GEN)
    keys = list(model.state_dict())
    compile_decoder(model)
    torch.testing.assert_close(model.text_to_image("a red circle", **GEN), reference, atol=1e-4, rtol=1e-4)
    assert list(model.state_dict()) == keys  # in-place compile keeps the checkpoint names
