"""The agent (SPEC Sec. 4): agent-token isolation, heads and their alignment, lambda-returns, PMPO, imagination
and acting in the real environment."""
import dataclasses

import math

import numpy as np
import pytest
import torch

import dreamer4 as d4
import evaluate as ev

BINS = [5, 4]


@pytest.fixture
def agent(tiny_cfg):
    torch.manual_seed(0)
    return d4.Agent(dataclasses.replace(tiny_cfg, mtp_length=2, reward_bins=31), BINS)


def random_inputs(cfg, b=2, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, t, cfg.num_latents, cfg.latent_dim, generator=g)
    actions = torch.stack([torch.randint(0, n, (b, t), generator=g) for n in BINS], dim=-1)
    actions[:, 0] = -1
    return latents, actions


def test_agent_tokens_change_no_world_model_prediction(agent, tiny_cfg):
    with torch.no_grad():
        agent.dynamics.agent_token.normal_()   # an agent token that is far from zero
    latents, actions = random_inputs(tiny_cfg)
    levels, sizes = torch.rand(2, 5), torch.full((2, 5), 0.25)
    alone = agent.dynamics.predict(latents, levels, sizes, actions)
    with_agent, features = agent.dynamics.predict(latents, levels, sizes, actions, agent=True)
    assert torch.allclose(alone, with_agent, atol=1e-5)
    assert features.shape == (2, 5, tiny_cfg.dyn_dim)
    # the agent token reads its frame and its past, never the future
    changed = latents.clone()
    changed[:, 3] += 1
    features_changed = agent.dynamics.predict(changed, levels, sizes, actions, agent=True)[1]
    assert torch.allclose(features[:, :3], features_changed[:, :3], atol=1e-5)
    assert not torch.allclose(features[:, 3], features_changed[:, 3], atol=1e-3)


def test_two_hot_round_trips_symexp_values(agent):
    support = agent.heads.support
    values = torch.tensor([0.0, 0.3, -0.3, 1.0, -7.5, 42.0, 1000.0, -2500.0])
    encoded = d4.two_hot(values, support)
    assert torch.allclose(encoded.sum(-1), torch.ones(len(values)))
    assert ((encoded > 0).sum(-1) <= 2).all()
    decoded = d4.two_hot_decode(torch.log(encoded + 1e-12), support)
    assert torch.allclose(decoded, values, rtol=1e-3, atol=1e-4)
    assert torch.allclose(d4.symexp(d4.symlog(values)), values, rtol=1e-5)
    # beyond the range the end bin takes all the weight
    assert d4.two_hot(torch.tensor([1e30]), support)[0, -1] == 1


def test_lambda_returns_match_a_hand_computed_example():
    rewards, continues = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.5]])
    values = torch.tensor([[0.0, 10.0, 20.0]])
    # R_2 = v_2 = 20; R_1 = 2 + .9 * .5 * (.5 * 20 + .5 * 20) = 11; R_0 = 1 + .9 * 1 * (.5 * 10 + .5 * 11) = 10.45
    returns = d4.lambda_returns(rewards, continues, values, discount=0.9, lam=0.5)
    assert torch.allclose(returns, torch.tensor([[10.45, 11.0]]))


def test_kl_is_the_reverse_kl_from_the_policy_to_the_prior():
    p, q = torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.5, 0.5]]))
    kl_pq = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert d4.kl_divergence([p], [q]).item() == pytest.approx(kl_pq, rel=1e-5)
    assert d4.kl_divergence([q], [p]).item() != pytest.approx(kl_pq, rel=1e-2)   # KL is not symmetric


def fabricated_rollout(cfg, b=64, seed=0):
    """A one-step rollout whose advantages are the rewards (the zero-initialized value head predicts 0)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0)[:, None]
    actions = torch.stack([torch.randint(0, n, (b, 1), generator=g) for n in BINS], dim=-1)
    return dict(features=torch.randn(b, 2, cfg.dyn_dim, generator=g), actions=actions, rewards=rewards,
                continues=torch.ones(b, 1))


def test_pmpo_has_the_stated_weights_and_kl_direction(agent, tiny_cfg):
    torch.nn.init.normal_(agent.heads.bc_policy[-1].weight)   # a prior unlike the policy
    rollout = fabricated_rollout(tiny_cfg)
    losses, diagnostics = agent.imagination_loss(rollout)
    features, actions = rollout["features"][:, 0], rollout["actions"][:, 0]
    logp, kl = 0.0, 0.0
    for i, n in enumerate(BINS):   # by hand, per action dimension, at distance 0
        policy = agent.heads.policy(features).view(-1, 2, sum(BINS))[:, 0].split(BINS, -1)[i].log_softmax(-1)
        prior = agent.heads.bc_policy(features).view(-1, 2, sum(BINS))[:, 0].split(BINS, -1)[i].log_softmax(-1)
        logp = logp + policy.gather(-1, actions[:, i:i + 1])[:, 0]
        kl = kl + (policy.exp() * (policy - prior)).sum(-1)
    positive = rollout["rewards"][:, 0] > 0
    expected = 0.5 * logp[~positive].mean() - 0.5 * logp[positive].mean() + 0.3 * kl.mean()
    assert losses["policy"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert diagnostics["prior_kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)


def test_imagination_diagnostics_on_a_hand_made_rollout(agent, tiny_cfg):
    """Half the advantages are +1, half -1 (the value head predicts 0, the rollout ends after one step): half
    positive, mean 0, values explain none of the returns' variance; a policy and prior that are uniform over every
    action dimension have entropy sum_i ln(bins_i) and no KL."""
    for layer in (agent.heads.policy[-1], agent.heads.bc_policy[-1]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    rollout = fabricated_rollout(tiny_cfg)
    rollout["continues"] = torch.zeros_like(rollout["continues"])
    diagnostics = agent.imagination_loss(rollout)[1]
    assert diagnostics["advantage_positive"].item() == 0.5
    assert diagnostics["advantage_mean"].item() == pytest.approx(0.0, abs=1e-5)
    assert diagnostics["value_explained_variance"].item() == pytest.approx(0.0, abs=1e-6)
    assert diagnostics["policy_entropy"].item() == pytest.approx(sum(math.log(n) for n in BINS), rel=1e-5)
    assert diagnostics["prior_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_pmpo_raises_positive_and_lowers_negative_advantage_actions(agent, tiny_cfg):
    agent.heads.start_policy()
    rollout = fabricated_rollout(tiny_cfg)
    positive = rollout["rewards"][:, 0] > 0

    def logp():
        logits = agent.heads.policy_logits(rollout["features"][:, 0], distance=0)
        return d4.log_prob(logits, rollout["actions"][:, 0]).detach()

    before = logp()
    optimizer = torch.optim.SGD(agent.heads.policy.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        agent.imagination_loss(rollout)[0]["policy"].backward()
        optimizer.step()
    change = logp() - before
    assert change[positive].mean() > 0 > change[~positive].mean()


def test_value_head_learns_the_returns(agent, tiny_cfg):
    rollout = fabricated_rollout(tiny_cfg)
    rollout["continues"] = torch.zeros_like(rollout["continues"])   # terminal after one step: R_0 = r_1
    optimizer = torch.optim.Adam(agent.heads.value.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        agent.imagination_loss(rollout)[0]["value"].backward()
        optimizer.step()
    values = agent.heads.predicted_value(rollout["features"][:, 0]).detach()
    assert (values - rollout["rewards"][:, 0]).abs().mean() < 0.2


def test_finetuning_targets_are_aligned_and_the_loss_falls(agent, tiny_cfg):
    latents, actions = random_inputs(tiny_cfg, b=4, t=6)
    rewards, terminated = torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.bool)
    # the block of frame t holds a_{t-1}; its agent token must predict a_t, which it cannot see
    features = agent.features(latents, actions)
    shifted = actions.clone()
    shifted[:, 3] = (shifted[:, 3] + 1) % torch.tensor(BINS)
    torch.manual_seed(0)
    a = agent.features(latents, actions)
    torch.manual_seed(0)
    b = agent.features(latents, shifted)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5) and features.shape == (4, 6, tiny_cfg.dyn_dim)
    trainer = d4.Trainer(agent, dataclasses.replace(tiny_cfg, lr=3e-3, warmup_steps=1), torch.device("cpu"))
    history = [trainer.step(agent.finetune_loss, latents, actions, rewards, terminated) for _ in range(40)]
    for term in ("bc", "reward", "continuation"):
        assert np.mean([h[term] for h in history[-5:]]) < 0.7 * np.mean([h[term] for h in history[:5]]), term


def test_finetuning_trains_the_prior_and_imagination_the_policy(agent, tiny_cfg):
    """Eq. 9's BC term reaches the prior's head (bc_policy) and never the imagination-trained policy, PMPO the
    policy and never the prior: the online loop refits the prior while the policy carries over."""
    latents, actions = random_inputs(tiny_cfg, b=2, t=6)
    sum(agent.finetune_loss(latents, actions, torch.randn(2, 6), torch.zeros(2, 6, dtype=torch.bool))
        .values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.heads.bc_policy.parameters())
    assert all(p.grad is None for p in [*agent.heads.policy.parameters(), *agent.heads.value.parameters()])
    agent.zero_grad(set_to_none=True)
    losses = agent.imagination_loss(fabricated_rollout(tiny_cfg))[0]
    (losses["policy"] + losses["value"]).backward()
    assert all(p.grad is not None for p in agent.heads.policy.parameters())
    assert all(p.grad is None for p in agent.heads.bc_policy.parameters())
    agent.heads.start_policy()   # the policy starts as the prior
    features = torch.randn(3, tiny_cfg.dyn_dim)
    for a, b in zip(agent.heads.policy_logits(features), agent.heads.policy_logits(features, prior=True)):
        assert torch.equal(a, b)


def test_imagination_feeds_the_policys_sampled_actions_to_the_dynamics(agent, tiny_cfg):
    with torch.no_grad():   # a policy that always picks bin 3 of dimension 0 and bin 1 of dimension 1
        agent.heads.policy[-1].weight.zero_()
        agent.heads.policy[-1].bias.copy_(torch.tensor([0, 0, 0, 50.0, 0, 0, 50.0, 0, 0] * 2))
    seen = []
    denoise = agent.dynamics.denoise
    agent.dynamics.denoise = lambda cache, actions, *rest, **kw: seen.append(actions) or denoise(
        cache, actions, *rest, **kw)
    latents, actions = random_inputs(tiny_cfg, b=3, t=2)
    rollout = agent.imagine(latents, actions, horizon=4, steps=2, generator=torch.Generator().manual_seed(0))
    assert rollout["features"].shape == (3, 5, tiny_cfg.dyn_dim) and rollout["latents"].shape == (3, 4, 4, 8)
    assert (rollout["actions"] == torch.tensor([3, 1])).all()
    assert len(seen) == 4 and all(torch.equal(s[:, 0], rollout["actions"][:, i]) for i, s in enumerate(seen))
    assert rollout["rewards"].shape == rollout["continues"].shape == (3, 4)
    assert ((rollout["continues"] > 0) & (rollout["continues"] < 1)).all()


def test_acting_costs_one_frame_per_step_and_real_env_evaluation_runs(agent, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_episode_steps=24)
    tokenizer = d4.Tokenizer(cfg).eval()
    env = d4.make_env(cfg)
    bins = d4.ActionBins(env.action_space, cfg.action_bins)
    env.close()
    agent = d4.Agent(cfg, bins.bins).eval()
    policy = d4.AgentPolicy(agent, tokenizer, cfg.seq_len, torch.device("cpu"), seed=0)
    episodes = list(d4.play_episodes(cfg, policy, episodes=2, seed=3))
    returns = np.array([[d4.episode_return(s) for s in streams] for streams in episodes])
    assert returns.shape == (2, 1) and np.isfinite(returns).all()
    steps = len(episodes[-1][0]["frames"]) - 1   # the policy saw every frame but the last
    assert steps > 5 and policy.cache.frames == steps   # one dynamics frame per step
    assert all(k.shape[2] == min(steps, cfg.dyn_seq_len - 1) for k, _ in policy.cache.layers.values())   # window
    assert tokenizer.streams_exactly and policy.frame_cache.frames == steps   # and one tokenizer frame per step
    assert all(k.shape[2] == min(steps, cfg.seq_len - 1) for k, _ in policy.frame_cache.layers.values())
    again = ev.evaluate_returns(cfg, d4.AgentPolicy(agent, tokenizer, cfg.seq_len, torch.device("cpu"), seed=0), 2, 3)
    assert np.array_equal(returns, again)


def test_the_trained_policy_drives_every_car_of_the_multi_car_env_as_one_batch(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, env="MultiCarRacing-v0", max_episode_steps=16)
    env = d4.make_env(cfg)
    cars = env.observation_space.shape[0]
    bins = d4.ActionBins(d4.stream_action_space(env.action_space, env.observation_space), cfg.action_bins)
    env.close()
    torch.manual_seed(0)
    agent, tokenizer = d4.Agent(cfg, bins.bins).eval(), d4.Tokenizer(cfg).eval()
    policy = d4.AgentPolicy(agent, tokenizer, cfg.seq_len, torch.device("cpu"), seed=0)
    streams = next(d4.play_episodes(cfg, policy, episodes=1, seed=3))
    assert cars > 1 and len(streams) == cars and policy.previous.shape[0] == cars
    steps = len(streams[0]["frames"]) - 1
    assert steps > 3 and policy.cache.frames == steps   # one cached frame per step, every car a row of the batch
    actions = np.stack([np.stack(s["actions"][1:]) for s in streams])   # (cars, steps, dims)
    assert not np.array_equal(actions[0], actions[1])   # each car acts on its own view


def test_the_imagination_optimizer_keeps_the_policy_learning_rate_from_its_first_step(agent, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, policy_lr=1e-3, warmup_steps=100, cooldown=0.5)
    trainer = agent.imagination_trainer(cfg, torch.device("cpu"))
    rates = []
    for _ in range(300):
        rates.append(trainer.schedule.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.schedule.step()
    assert rates == [1e-3] * 300
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*agent.heads.policy.parameters(), *agent.heads.value.parameters()]}


def test_imagination_runs_under_the_autocast_that_finetuning_and_acting_use(agent, tiny_cfg, monkeypatch):
    entered = []
    autocast = d4.autocast
    monkeypatch.setattr(d4, "autocast", lambda device: entered.append(device) or autocast(device))
    latents, actions = random_inputs(tiny_cfg, b=2, t=2)
    agent.imagine(latents, actions, horizon=2, steps=2)
    assert entered == [torch.device("cpu")]


def test_a_loss_term_that_is_nearly_always_zero_is_not_scaled_up(agent, tiny_cfg):
    """The continuation loss is ~0 until a batch holds a termination. Divided by its own RMS it would keep a
    unit-size gradient and jump on that batch; with the floor its weight stays at most 1 / loss_floor."""
    def spike(normalizer):   # -> the quiet term's weight, and the rare term after scaling
        for _ in range(100):
            quiet = torch.tensor(1e-5, requires_grad=True)
            normalizer({"bc": torch.tensor(30.0), "continuation": quiet}).backward()
        rare = torch.tensor(0.03)
        return quiet.grad.item(), normalizer({"bc": torch.tensor(30.0), "continuation": rare}).item() - 1

    floors = agent.finetune_trainer(tiny_cfg, torch.device("cpu")).normalizer.floors
    assert floors == {"bc": tiny_cfg.loss_floor, "reward": tiny_cfg.loss_floor, "continuation": tiny_cfg.loss_floor}
    weight, scaled = spike(d4.LossNormalizer(floors=floors))
    assert weight == pytest.approx(1 / tiny_cfg.loss_floor) and scaled < 0.5
    weight, unfloored = spike(d4.LossNormalizer())
    assert weight > 1e4 and unfloored > 10 * scaled   # unit scale for a ~0 term, and the jump on the rare batch


def test_action_baselines_of_the_prior_on_hand_made_actions():
    """One dimension of 3 bins. Training steps 0 1 1 1 | 0 0 (| an episode start, -1): bin counts 3, 3, 0, add-one
    smoothed; 3 of the 4 steps inside episodes repeat the previous action."""
    train = np.array([[-1], [0], [1], [1], [1], [-1], [0], [0]])
    targets, previous = torch.tensor([[1], [0]]), torch.tensor([[1], [1]])
    marginal, repeat = ev.action_baseline_nll(train, [3], targets, previous)
    p0, p1 = (3 + 1) / (6 + 3), (3 + 1) / (6 + 3)
    r = 3 / 4                                        # 1->1, 1->1, 0->0 repeat; 0->1 does not
    torch.testing.assert_close(marginal, torch.tensor([-math.log(p1), -math.log(p0)]), check_dtype=False)
    torch.testing.assert_close(repeat, torch.tensor([-math.log(r + (1 - r) * p1), -math.log((1 - r) * p0)]),
                               check_dtype=False)


def test_replayed_imagination_takes_the_given_actions(agent, tiny_cfg):
    latents, actions = random_inputs(tiny_cfg, b=3, t=2)
    replay = torch.stack([torch.randint(0, n, (3, 4)) for n in BINS], dim=-1)
    rollout = agent.imagine(latents, actions, horizon=4, steps=2, replay=replay)
    assert torch.equal(rollout["actions"], replay)
    assert ev.correlation(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 7])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1], rel=1e-5)
