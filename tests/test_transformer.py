"""The block-causal transformer (SPEC Sec. 1): attention paths, masks, causality, checkpointing, RoPE."""
import dataclasses

import torch

import dreamer4 as d4


def make_transformer(cfg, depth=4, dim=32, heads=4, kv_heads=2, **changes):
    return d4.Transformer(dim, depth, heads, kv_heads, dataclasses.replace(cfg, time_every=2, **changes)).eval()


def test_space_mask_true_means_may_attend():
    mask = d4.space_mask({"a": 2, "b": 1}, {"a": ["a"], "b": ["a", "b"]})
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_every_transformer_has_a_time_block(tiny_cfg):
    for depth, time_every, expected in [(2, 4, [1]), (8, 4, [3, 7]), (3, 1, [0, 1, 2])]:
        model = d4.Transformer(16, depth, 2, 1, dataclasses.replace(tiny_cfg, time_every=time_every))
        assert [i for i, block in enumerate(model.blocks) if block.over_time] == expected
    cfg = dataclasses.replace(tiny_cfg, time_every=4, dyn_time_every=2, tok_enc_layers=4, dyn_layers=4)
    time_blocks = lambda model: [i for i, block in enumerate(model.blocks) if block.over_time]  # noqa: E731
    assert time_blocks(d4.Tokenizer(cfg).encoder) == [3]
    assert time_blocks(d4.Dynamics(cfg, [3]).transformer) == [1, 3]


def test_sdpa_path_matches_the_explicit_path_with_gqa_and_masks(tiny_cfg):
    """A huge soft cap makes cap * tanh(x / cap) the identity, so both attention paths must agree."""
    fast = make_transformer(tiny_cfg)
    explicit = make_transformer(tiny_cfg, softcap=1e6)
    explicit.load_state_dict(fast.state_dict())
    x = torch.randn(2, 5, 6, 32)
    mask = d4.space_mask({"a": 3, "b": 3}, {"a": ["a"], "b": ["a", "b"]})
    torch.testing.assert_close(fast(x, mask), explicit(x, mask), atol=1e-5, rtol=1e-5)


def test_soft_capping_changes_attention_when_logits_are_large(tiny_cfg):
    fast = make_transformer(tiny_cfg)
    capped = make_transformer(tiny_cfg, softcap=0.5)
    capped.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 6, 32) * 10
    assert not torch.allclose(fast(x, None), capped(x, None), atol=1e-3)


def test_future_frames_cannot_change_the_past_but_the_past_reaches_the_future(tiny_cfg):
    model = make_transformer(tiny_cfg)
    x = torch.randn(2, 6, 5, 32)
    changed = x.clone()
    changed[:, 3] += torch.randn_like(changed[:, 3])
    out, out_changed = model(x, None), model(changed, None)
    torch.testing.assert_close(out[:, :3], out_changed[:, :3])
    assert (out[:, 4:] - out_changed[:, 4:]).abs().amax() > 1e-3


def test_a_token_group_masked_from_another_never_sees_it_in_any_frame(tiny_cfg):
    """Time blocks attend slot-wise, so a group isolated in space stays isolated across frames too."""
    model = make_transformer(tiny_cfg)
    mask = d4.space_mask({"seen": 3, "hidden": 2}, {"seen": ["seen"], "hidden": ["seen", "hidden"]})
    x = torch.randn(2, 4, 5, 32)
    changed = x.clone()
    changed[:, :, 3:] += torch.randn_like(changed[:, :, 3:])
    out, out_changed = model(x, mask), model(changed, mask)
    torch.testing.assert_close(out[:, :, :3], out_changed[:, :, :3])
    changed = x.clone()
    changed[:, 0, :3] += 1.0
    assert (model(changed, mask)[:, :, 3:] - out[:, :, 3:]).abs().amax() > 1e-3   # hidden sees seen


def test_activation_checkpointing_gives_identical_outputs_and_gradients(tiny_cfg):
    plain = make_transformer(tiny_cfg, checkpointing=False).train()
    checkpointed = make_transformer(tiny_cfg, checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 5, 32)
    plain(x, None).square().sum().backward()
    checkpointed(x, None).square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_rope_attention_scores_depend_only_on_the_time_offset():
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 8, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 8, 16)
    positions = torch.arange(8)
    scores = d4.rope(q, positions) @ d4.rope(k, positions).transpose(-1, -2)   # (1, 1, 8, 8)
    for offset in range(-3, 4):
        diagonal = torch.diagonal(scores[0, 0], offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
