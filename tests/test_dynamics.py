"""The interactive dynamics (SPEC Sec. 3): causality, action conditioning, shortcut forcing, cached generation."""
import dataclasses

import pytest
import torch

import dreamer4 as d4

BINS = [5, 3]   # two action dimensions


@pytest.fixture
def dynamics(tiny_cfg):
    return d4.Dynamics(tiny_cfg, BINS).eval()


def inputs(cfg, b=2, t=5):
    latents = torch.rand(b, t, cfg.num_latents, cfg.latent_dim) * 2 - 1
    actions = torch.stack([torch.randint(0, n, (b, t)) for n in BINS], dim=-1)
    actions[:, 0] = -1   # no action leads to the first frame
    return latents, torch.rand(b, t), torch.full((b, t), 1 / 64), actions


def test_a_frames_prediction_never_changes_when_future_latents_or_actions_change(dynamics, tiny_cfg):
    latents, levels, sizes, actions = inputs(tiny_cfg)
    out = dynamics.predict(latents, levels, sizes, actions)
    changed_latents, changed_actions = latents.clone(), actions.clone()
    changed_latents[:, 3:] = -changed_latents[:, 3:]
    changed_actions[:, 3:] = (changed_actions[:, 3:] + 1) % torch.tensor(BINS)
    changed = dynamics.predict(changed_latents, levels, sizes, changed_actions)
    torch.testing.assert_close(out[:, :3], changed[:, :3])
    assert (out[:, 3:] - changed[:, 3:]).abs().amax() > 1e-4


def test_the_action_that_led_to_a_frame_changes_its_prediction(dynamics, tiny_cfg):
    latents, levels, sizes, actions = inputs(tiny_cfg)
    out = dynamics.predict(latents, levels, sizes, actions)
    for change in ((actions[:, 2] + 1) % torch.tensor(BINS), torch.full_like(actions[:, 2], -1)):
        changed = actions.clone()
        changed[:, 2] = change
        other = dynamics.predict(latents, levels, sizes, changed)
        torch.testing.assert_close(out[:, :2], other[:, :2])
        assert (out[:, 2] - other[:, 2]).abs().amax() > 1e-4


def test_action_embeddings_start_small_and_ordered_for_binned_continuous_actions(tiny_cfg):
    for ordered in (True, False):
        tables = d4.Dynamics(dataclasses.replace(tiny_cfg, dyn_dim=128), [33, 9], ordered=ordered).action_tables
        for table in tables:
            w = table.weight
            assert w.std() < 0.05   # the scale of the other learned embeddings (0.02), not nn.Embedding's N(0, 1)
            ends = torch.nn.functional.cosine_similarity(w[0] - w.mean(0), w[-1] - w.mean(0), dim=0)
            if ordered:   # the end bins start opposite each other (expected cosine -0.5), neighbours closer
                assert ends < -0.2, ends
                assert (w[1:] - w[:-1]).norm(dim=1).mean() < 0.8 * (w[-1] - w[0]).norm()
            else:         # unordered (Discrete): independent random vectors
                assert abs(ends) < 0.5, ends


def test_every_token_of_a_frame_attends_to_every_other(dynamics):
    assert dynamics.mask.all() and dynamics.mask.shape == (1 + 1 + 1 + 2,) * 2


def test_at_d_min_the_loss_is_the_weighted_x_space_mse(tiny_cfg):
    dynamics = d4.Dynamics(dataclasses.replace(tiny_cfg, bootstrap_fraction=0.0, single_frame_fraction=0.0), BINS)
    latents, _, _, actions = inputs(tiny_cfg)
    torch.manual_seed(1)
    loss = dynamics.loss(latents, actions)["dynamics"]
    torch.manual_seed(1)
    levels, sizes = dynamics.sample_levels(2, 5, "cpu")
    assert (sizes == 1 / 64).all()
    tau = levels[..., None, None]
    noisy = (1 - tau) * torch.randn_like(latents) + tau * latents
    mse = ((dynamics.predict(noisy, levels, sizes, actions) - latents) ** 2).mean((2, 3))
    torch.testing.assert_close(loss, ((0.9 * levels + 0.1) * mse).mean())


def test_the_bootstrap_target_matches_a_hand_computation(tiny_cfg, monkeypatch):
    """Stand-in network f(z, tau, d) = 2 z + tau d, one frame, one latent value, tau = 1/4, d = 1/2."""
    dynamics = d4.Dynamics(dataclasses.replace(tiny_cfg, num_latents=1, latent_dim=1, latent_tokens=1), BINS)
    monkeypatch.setattr(dynamics, "sample_levels", lambda b, t, *_: (torch.full((b, t), 0.25),
                                                                      torch.full((b, t), 0.5)))
    monkeypatch.setattr(dynamics, "predict", lambda z, tau, d, a, *rest, **kw: 2 * z + (tau * d)[..., None, None])
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.full_like(x, -1.0))   # z0 = -1
    z1 = torch.full((1, 1, 1, 1), 0.6)
    flow, boot = dynamics.shortcut_terms(z1, torch.zeros(1, 1, 2, dtype=torch.long))
    # by hand: z~ = 0.75 * -1 + 0.25 * 0.6 = -0.6
    # b'  = (f(-0.6, 1/4, 1/4) - -0.6) / 0.75 = (-1.2 + 0.0625 + 0.6) / 0.75 = -0.716666...
    # z'  = -0.6 + b' * 0.25 = -0.7791666...
    # b'' = (f(z', 1/2, 1/4) - z') / 0.5 = (-1.5583333 + 0.125 + 0.7791666) / 0.5 = -1.3083333...
    # prediction f(-0.6, 1/4, 1/2) = -1.075; velocity = (-1.075 + 0.6) / 0.75 = -0.6333333...
    # loss = w(1/4) (1 - 1/4)^2 (velocity - (b' + b'') / 2)^2 = 0.325 * 0.5625 * (0.3791666...)^2
    assert flow.item() == 0
    assert boot.item() == pytest.approx(0.325 * 0.5625 * (-0.6333333333 + (0.7166666667 + 1.3083333333) / 2) ** 2)


def test_before_bootstrapping_every_frame_trains_at_d_min_in_one_forward_pass(tiny_cfg, monkeypatch):
    dynamics = d4.Dynamics(dataclasses.replace(tiny_cfg, bootstrap_fraction=1.0), BINS)
    latents, _, _, actions = inputs(tiny_cfg)
    calls, predict = [], dynamics.predict
    def counted(noisy, levels, sizes, actions, *rest, **kw):  # noqa: E306
        calls.append(sizes)
        return predict(noisy, levels, sizes, actions, *rest, **kw)
    monkeypatch.setattr(dynamics, "predict", counted)
    flow, boot = dynamics.shortcut_terms(latents, actions, bootstrap=False)
    assert len(calls) == 1 and (calls[0] == 1 / 64).all() and (boot == 0).all() and (flow > 0).all()
    calls.clear()
    flow, boot = dynamics.shortcut_terms(latents, actions)
    assert len(calls) == 3 and (calls[0] > 1 / 64).all() and (flow == 0).all() and (boot > 0).all()


def test_the_learning_rate_warms_up_holds_then_cools_down_to_zero(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, lr=1.0, warmup_steps=10, cooldown=0.5)
    trainer = d4.Trainer(torch.nn.Linear(1, 1), cfg, torch.device("cpu"), total_steps=100)
    rates = []
    for _ in range(200):   # two online iterations of 100 steps: the decay repeats, the warm-up does not
        rates.append(trainer.schedule.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[9:51] == [1.0] * 42
    assert rates[75] == pytest.approx(0.5) and rates[99] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(rates[50:100], rates[51:100]))
    assert rates[100:151] == [1.0] * 51 and rates[110:] == pytest.approx(rates[10:100])
    constant = d4.Trainer(torch.nn.Linear(1, 1), dataclasses.replace(cfg, cooldown=0.0), torch.device("cpu"), 100)
    assert constant.schedule.lr_lambdas[0](99) == 1.0


def test_cached_generation_equals_uncached(dynamics, tiny_cfg):
    latents, _, _, actions = inputs(tiny_cfg, t=7)
    runs = [dynamics.generate(latents[:, :3], actions[:, :3], actions[:, 3:], steps=4, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(0)) for use_cache in (True, False)]
    assert runs[0].shape == (2, 4, tiny_cfg.num_latents, tiny_cfg.latent_dim)
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_generated_frames_follow_the_given_actions(dynamics, tiny_cfg):
    latents, _, _, actions = inputs(tiny_cfg, t=6)
    generate = lambda future: dynamics.generate(latents[:, :3], actions[:, :3], future,  # noqa: E731
                                                generator=torch.Generator().manual_seed(0))
    other = actions[:, 3:].clone()
    other[:, 1] = (other[:, 1] + 1) % torch.tensor(BINS)
    first, second = generate(actions[:, 3:]), generate(other)
    torch.testing.assert_close(first[:, :1], second[:, :1])       # frame 3 is led to by the unchanged action
    assert (first[:, 1:] - second[:, 1:]).abs().amax() > 1e-4


def test_the_loss_of_a_tiny_model_falls_on_a_fixed_batch(tiny_cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, lr=3e-3, warmup_steps=1)
    dynamics = d4.Dynamics(cfg, BINS)
    trainer = d4.Trainer(dynamics, cfg, torch.device("cpu"))
    latents, _, _, actions = inputs(cfg, b=8, t=6)
    def mean_loss():
        torch.manual_seed(123)
        return sum(dynamics.loss(latents, actions)["dynamics"].item() for _ in range(8)) / 8
    before = mean_loss()
    for _ in range(60):
        trainer.step(dynamics.loss, latents, actions)
    after = mean_loss()
    print(f"loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)


def test_dynamics_checkpoints_round_trip(dynamics, tmp_path):
    d4.save_checkpoint(tmp_path / "weights.pt", model=dynamics.state_dict())
    state = d4.load_checkpoint(tmp_path / "weights.pt")["model"]
    assert state.keys() == dynamics.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in dynamics.state_dict().items())


def test_the_compiled_loss_and_its_gradients_equal_the_eager_ones(tiny_cfg, monkeypatch):
    # torch.compile's tracing and autograd (what our code decides: graph breaks, branches, random draws), without
    # inductor's code generation, which takes over two minutes on 2 CPU cores
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile(fn, backend="aot_eager", **kwargs))
    torch.manual_seed(0)
    dynamics = d4.Dynamics(tiny_cfg, BINS)
    latents, _, _, actions = inputs(tiny_cfg, b=4, t=6)
    assert d4.compiled(dynamics.loss, tiny_cfg, "dynamics") == dynamics.loss   # off unless asked for
    compiled = d4.compiled(dynamics.loss, dataclasses.replace(tiny_cfg, compile="mae,dynamics"), "dynamics")
    results = []
    for loss_fn in (dynamics.loss, compiled):
        torch.manual_seed(1)
        loss = loss_fn(latents, actions, bootstrap=True)["dynamics"]   # flow and bootstrap terms both present
        grads = torch.autograd.grad(loss, list(dynamics.parameters()), allow_unused=True)
        results.append((loss, grads))
    (loss, grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss > 0 and torch.allclose(loss, compiled_loss, rtol=1e-4, atol=1e-6)
    for g, h in zip(grads, compiled_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, rtol=1e-3, atol=1e-6))


@pytest.mark.parametrize("preset", list(d4.PRESETS))
def test_context_frames_carry_a_signal_level_that_training_produces(preset, monkeypatch):
    """Training draws tau on the grid k / K_max; context frames (generation, imagination, acting) are labelled with
    context_signal, whose Fourier features are untrained anywhere else."""
    cfg = d4.parse_config("dynamics", "", ["--preset", preset])
    dynamics = d4.Dynamics(cfg, BINS)
    seen = []
    monkeypatch.setattr(dynamics, "predict", lambda z, levels, *rest, **kw: seen.append(levels))
    dynamics.observe(None, torch.zeros(1, 2, cfg.num_latents, cfg.latent_dim), torch.zeros(1, 2, 2, dtype=torch.long),
                     torch.zeros(1, 2, cfg.num_latents, cfg.latent_dim))
    torch.manual_seed(0)
    trained = set((dynamics.sample_levels(64, 64, "cpu")[0] * cfg.max_shortcut_steps).flatten().tolist())
    assert set((seen[0] * cfg.max_shortcut_steps).flatten().tolist()) <= trained


def test_an_off_grid_context_signal_is_a_one_line_error():
    with pytest.raises(d4.ConfigError, match="--context-signal 0.9 .* k / 64"):
        d4.parse_config("dynamics", "", ["--context-signal", "0.9"])


@pytest.mark.parametrize("preset", list(d4.PRESETS))
def test_the_bootstrap_term_starts_while_the_learning_rate_is_still_at_its_peak(preset):
    """4-step sampling uses the step sizes only the bootstrap term trains: not only during the decay to zero."""
    cfg = d4.parse_config("dynamics", "", ["--preset", preset])
    assert cfg.bootstrap_start < 1 - cfg.cooldown - 0.1


def test_each_frames_bootstrap_target_sees_the_context_its_prediction_saw(tiny_cfg):
    """Frame t's two half steps see frames < t as its prediction saw them (their noisy latents and labels), as one
    pass per frame over frames 0..t computes them; moving every frame at once gives other targets."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, dyn_layers=4, dyn_time_every=2)   # two time blocks, stacked
    dynamics = d4.Dynamics(cfg, BINS).eval()
    latents, _, _, actions = inputs(cfg, b=2, t=6)
    step_size = torch.tensor([[1 / 4, 1 / 64, 1 / 2, 1 / 8, 1 / 64, 1 / 4]]).repeat(2, 1)
    signal_level = (torch.rand(2, 6) / step_size).floor() * step_size
    noisy = (1 - signal_level[..., None, None]) * torch.randn_like(latents) + signal_level[..., None, None] * latents
    context = d4.KVCache()
    with torch.no_grad():
        dynamics.predict(noisy, signal_level, step_size, actions, context, commit=True)
        target = dynamics.bootstrap_target(noisy, signal_level, step_size, actions, context)

    def half_steps(z, levels, sizes, t, moved_frames):   # frames in moved_frames take their half steps together
        half = sizes.clone()
        half[:, moved_frames] /= 2
        first = (dynamics.predict(z, levels, half, actions[:, :z.shape[1]]) - z) / (1 - levels[..., None, None])
        midway, second_levels = z.clone(), levels.clone()
        midway[:, moved_frames] += first[:, moved_frames] * half[:, moved_frames, None, None]
        second_levels[:, moved_frames] += half[:, moved_frames]
        second = (dynamics.predict(midway, second_levels, half, actions[:, :z.shape[1]]) - midway) / (
            1 - levels[..., None, None] - half[..., None, None])
        return ((first + second) / 2)[:, t]

    bootstrap = [t for t in range(6) if step_size[0, t] > 1 / 64]
    with torch.no_grad():
        for t in bootstrap:
            alone = half_steps(noisy[:, :t + 1], signal_level[:, :t + 1], step_size[:, :t + 1], t, [t])
            torch.testing.assert_close(target[:, t], alone, atol=1e-5, rtol=1e-4)
        together = half_steps(noisy, signal_level, step_size, bootstrap[-1], bootstrap)
    assert (together - target[:, bootstrap[-1]]).abs().amax() > 1e-3   # the defect this test guards against


def test_a_frame_in_a_sliding_window_sees_as_many_frames_as_a_training_sequence(tiny_cfg):
    """With the agent's KV window, a new frame attends to dyn_seq_len frames (itself included), the training length:
    the same prediction as a pass over just those frames. (One time block, after a space block: exact.)"""
    torch.manual_seed(0)
    agent = d4.Agent(tiny_cfg, BINS).eval()
    assert sum(block.over_time for block in agent.dynamics.transformer.blocks) == 1
    n = tiny_cfg.dyn_seq_len
    latents, _, _, actions = inputs(tiny_cfg, b=2, t=n + 5)
    noise = torch.randn_like(latents)
    cache = d4.KVCache(agent.window)
    levels = lambda t: torch.full((2, t), tiny_cfg.context_signal)  # noqa: E731
    sizes = lambda t: torch.full((2, t), 1 / 64)  # noqa: E731
    with torch.no_grad():
        agent.dynamics.observe(cache, latents[:, :-1], actions[:, :-1], noise[:, :-1])
        corrupted = agent.dynamics.corrupt(latents, noise)
        cached = agent.dynamics.predict(corrupted[:, -1:], levels(1), sizes(1), actions[:, -1:], cache)
        window = agent.dynamics.predict(corrupted[:, -n:], levels(n), sizes(n), actions[:, -n:])[:, -1:]
        longer = agent.dynamics.predict(corrupted[:, -n - 1:], levels(n + 1), sizes(n + 1), actions[:, -n - 1:])
    torch.testing.assert_close(cached, window, atol=1e-5, rtol=1e-4)
    assert (cached - longer[:, -1:]).abs().amax() > 1e-4
