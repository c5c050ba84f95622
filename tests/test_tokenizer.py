"""The causal tokenizer (SPEC Sec. 2): causality, the encoder/decoder attention rules, the bottleneck, learning."""
import dataclasses
import sys

import pytest
import torch

import dreamer4 as d4


@pytest.fixture
def tokenizer(tiny_cfg):
    return d4.Tokenizer(tiny_cfg).eval()


def frames_like(tokenizer, b=2, t=4):
    return torch.rand(b, t, 3, tokenizer.image_size, tokenizer.image_size)


def test_encode_and_decode_shapes(tokenizer, tiny_cfg):
    frames = frames_like(tokenizer)
    latents = tokenizer.encode(frames)
    assert latents.shape == (2, 4, tiny_cfg.num_latents, tiny_cfg.latent_dim)
    assert tokenizer.decode(latents).shape == frames.shape


def test_latents_lie_in_the_unit_interval_even_for_extreme_inputs(tokenizer):
    with torch.no_grad():
        tokenizer.to_latent.weight.mul_(1e3)
    latents = tokenizer.encode(frames_like(tokenizer) * 1e3 - 5e2)
    assert latents.abs().max() <= 1.0 and latents.abs().max() > 0.99


def test_future_frames_cannot_change_past_latents(tokenizer):
    frames = frames_like(tokenizer)
    changed = frames.clone()
    changed[:, 2:] = torch.rand_like(changed[:, 2:])
    latents, latents_changed = tokenizer.encode(frames), tokenizer.encode(changed)
    torch.testing.assert_close(latents[:, :2], latents_changed[:, :2])
    assert (latents[:, 2:] - latents_changed[:, 2:]).abs().amax() > 1e-4


def test_future_latents_cannot_change_past_reconstructions(tokenizer, tiny_cfg):
    latents = torch.rand(2, 4, tiny_cfg.num_latents, tiny_cfg.latent_dim) * 2 - 1
    changed = latents.clone()
    changed[:, 3] = -changed[:, 3]
    out, out_changed = tokenizer.decode(latents), tokenizer.decode(changed)
    torch.testing.assert_close(out[:, :3], out_changed[:, :3])
    assert (out[:, 3] - out_changed[:, 3]).abs().amax() > 1e-4


def perturb_slots(x, slots):
    changed = x.clone()
    changed[:, :, slots] += torch.randn_like(changed[:, :, slots])
    return changed


@pytest.mark.parametrize("layers", [2, 4])
def test_encoding_one_frame_at_a_time_equals_re_encoding_the_window(tiny_cfg, layers):
    """What acting does (AgentPolicy): with one time block, frame by frame with a KV cache of the window's earlier
    frames gives the latents of causal_windows (each frame encoded with the window before it, as the latent cache
    and training see it); with two time blocks it would not (the cached keys carry older frames), so the policy
    re-encodes the window there."""
    tokenizer = d4.Tokenizer(dataclasses.replace(tiny_cfg, tok_enc_layers=layers, time_every=2)).eval()
    assert tokenizer.streams_exactly == (layers == 2)
    frames = frames_like(tokenizer, t=9)
    with torch.no_grad():
        windows = d4.causal_windows(tokenizer.encode, frames, tokenizer.window)
        cache = d4.KVCache(tokenizer.window - 1)
        streamed = torch.cat([tokenizer.encode(frames[:, t:t + 1], cache=cache) for t in range(9)], dim=1)
    if tokenizer.streams_exactly:
        torch.testing.assert_close(streamed, windows, atol=1e-5, rtol=1e-4)
    else:
        assert (streamed - windows)[:, tokenizer.window:].abs().amax() > 1e-4


def test_encoder_patches_see_only_patches_and_latents_see_everything(tokenizer):
    patches, latents = slice(0, tokenizer.num_patches), slice(tokenizer.num_patches, None)
    x = torch.randn(2, 3, tokenizer.num_patches + tokenizer.num_latents, tokenizer.patch_space.shape[1])
    out = tokenizer.encoder(x, tokenizer.encoder_mask)
    out_latents_changed = tokenizer.encoder(perturb_slots(x, latents), tokenizer.encoder_mask)
    torch.testing.assert_close(out[:, :, patches], out_latents_changed[:, :, patches])   # patches never see latents
    out_patch_changed = tokenizer.encoder(perturb_slots(x, [0]), tokenizer.encoder_mask)
    assert (out[:, :, latents] - out_patch_changed[:, :, latents]).abs().amax() > 1e-4   # latents see patches
    assert (out[:, :, 1] - out_patch_changed[:, :, 1]).abs().amax() > 1e-4              # patches see patches


def test_decoder_latents_see_only_latents_and_readouts_see_everything(tokenizer):
    latents, readouts = slice(0, tokenizer.num_latents), slice(tokenizer.num_latents, None)
    x = torch.randn(2, 3, tokenizer.num_patches + tokenizer.num_latents, tokenizer.patch_space.shape[1])
    out = tokenizer.decoder(x, tokenizer.decoder_mask)
    out_readouts_changed = tokenizer.decoder(perturb_slots(x, readouts), tokenizer.decoder_mask)
    torch.testing.assert_close(out[:, :, latents], out_readouts_changed[:, :, latents])  # latents never see readouts
    out_latent_changed = tokenizer.decoder(perturb_slots(x, [0]), tokenizer.decoder_mask)
    assert (out[:, :, readouts] - out_latent_changed[:, :, readouts]).abs().amax() > 1e-4
    first_readout = tokenizer.num_latents
    out_readout_changed = tokenizer.decoder(perturb_slots(x, [first_readout]), tokenizer.decoder_mask)
    assert (out[:, :, first_readout + 1] - out_readout_changed[:, :, first_readout + 1]).abs().amax() > 1e-4


def test_masked_patches_do_not_reach_the_latents(tokenizer):
    frames = frames_like(tokenizer)
    mask = torch.zeros(2, 4, tokenizer.num_patches, dtype=torch.bool)
    mask[:, :, :3] = True
    changed = tokenizer.unpatchify(torch.where(mask[..., None], torch.rand_like(tokenizer.patchify(frames)),
                                               tokenizer.patchify(frames)))
    assert not torch.equal(changed, frames)
    torch.testing.assert_close(tokenizer.encode(frames, mask), tokenizer.encode(changed, mask))


def test_mask_probability_per_frame_is_at_most_the_maximum(tokenizer):
    mask = tokenizer.random_patch_mask(400, 1, "cpu").float().mean(-1)
    assert mask.max() <= tokenizer.max_mask_prob + 0.35 and mask.mean() == pytest.approx(0.45, abs=0.05)
    assert (mask == 0).any()   # p near 0 is drawn too, as at inference


def test_patchify_round_trips(tokenizer):
    frames = frames_like(tokenizer)
    assert torch.equal(tokenizer.unpatchify(tokenizer.patchify(frames)), frames)


def test_wrong_frame_shape_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"expected frames shaped \(B, T, 3, 32, 32\), got \(2, 32, 32, 3\)"):
        tokenizer.encode(torch.rand(2, 32, 32, 3))


def test_lpips_without_the_package_is_a_clear_error(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)   # makes `import lpips` fail
    with pytest.raises(d4.ConfigError, match="pip install lpips"):
        d4.Tokenizer(dataclasses.replace(tiny_cfg, lpips_weight=0.2))


def test_a_tiny_tokenizer_overfits_a_fixed_batch(tiny_cfg):
    """Held-fixed frames (smooth random images) are memorized: PSNR rises by more than 10 dB."""
    cfg = dataclasses.replace(tiny_cfg, lr=3e-3, warmup_steps=1, max_mask_prob=0.0)
    tokenizer = d4.Tokenizer(cfg)
    low_res = torch.rand(2, 3, 3, 2, 2)
    frames = torch.nn.functional.interpolate(low_res.flatten(0, 1), size=32, mode="bilinear").view(2, 3, 3, 32, 32)
    trainer = d4.Trainer(tokenizer, cfg, torch.device("cpu"))
    before = d4.psnr(tokenizer.decode(tokenizer.encode(frames)), frames).item()
    for _ in range(150):
        trainer.step(tokenizer.loss, frames)
    after = d4.psnr(tokenizer.decode(tokenizer.encode(frames)), frames).item()
    print(f"PSNR {before:.1f} -> {after:.1f} dB")
    assert after - before > 10, (before, after)


def test_loss_normalizer_divides_each_term_by_its_running_rms():
    normalizer = d4.LossNormalizer(decay=0.5)
    first = normalizer({"a": torch.tensor(4.0), "b": torch.tensor(0.1)})
    assert first.item() == pytest.approx(2.0)   # each term / its own RMS = 1
    second = normalizer({"a": torch.tensor(2.0), "b": torch.tensor(0.1)})
    assert second.item() == pytest.approx(2.0 / (0.5 * 16 + 0.5 * 4) ** 0.5 + 1.0)
    restored = d4.LossNormalizer(decay=0.5)
    restored.load_state_dict(normalizer.state_dict())
    assert restored.mean_squares["a"].item() == pytest.approx(10.0)
