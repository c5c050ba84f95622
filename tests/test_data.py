"""Environments, action binning, collection and the episode dataset (SPEC Sec. 0, 3)."""
import dataclasses
import tracemalloc

import gymnasium as gym
import numpy as np
import pytest
import torch

import dreamer4 as d4
import evaluate as ev


def test_box_action_bins_round_trip_within_half_a_bin():
    space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
    bins = d4.ActionBins(space, 33)
    actions = np.stack([space.sample() for _ in range(2000)])
    recovered = bins.from_bins(bins.to_bins(actions))
    half_bin = (space.high - space.low) / (33 - 1) / 2
    assert (np.abs(recovered - actions) <= half_bin + 1e-6).all()
    assert bins.to_bins(actions).min() == 0 and bins.to_bins(actions).max() == 32
    assert np.array_equal(bins.from_bins(bins.to_bins([[-1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])),
                          [[-1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])   # both bounds and the midpoint are exact


def test_discrete_action_bins_round_trip_exactly():
    bins = d4.ActionBins(gym.spaces.Discrete(5), 33)
    actions = np.arange(5, dtype=np.float32)[:, None]
    assert bins.bins == [5] and np.array_equal(bins.to_bins(actions)[:, 0], np.arange(5))
    assert np.array_equal(bins.from_bins(bins.to_bins(actions)), actions)
    assert np.array_equal(bins.to_env(actions), np.arange(5))


def test_unbounded_continuous_actions_are_a_clear_error():
    with pytest.raises(d4.ConfigError, match="finite bounds"):
        d4.ActionBins(gym.spaces.Box(-np.inf, np.inf, (2,)), 33)


def test_unknown_env_id_is_a_clear_error(tiny_cfg):
    with pytest.raises(d4.ConfigError, match="cannot make environment 'NoSuchEnv-v0'"):
        d4.make_env(tiny_cfg.__class__(**{**vars(tiny_cfg), "env": "NoSuchEnv-v0"}))


def write_episodes(data_dir, lengths, size=8):
    """Synthetic episodes whose frames carry (episode id, index in episode) in their first two pixels' values."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for episode, length in enumerate(lengths):
        frames = np.zeros((length, size, size, 3), np.uint8)
        frames[:, 0, 0, 0], frames[:, 0, 0, 1] = episode, np.arange(length)
        d4.save_episode(data_dir / f"episode_{episode:06d}.npz", dict(
            frames=frames, actions=np.zeros((length, 2), np.float32), rewards=np.arange(length, dtype=np.float32),
            terminated=np.arange(length) == length - 1, truncated=np.zeros(length, bool)))


def test_sampled_windows_never_cross_episode_ends(tmp_path):
    write_episodes(tmp_path, [7, 3, 12, 5, 9, 4])
    dataset = d4.EpisodeDataset(tmp_path, holdout_every=3)
    rng = np.random.default_rng(0)
    for split in ("train", "eval"):
        batch = dataset.sample(500, 5, split, rng)
        episode, index = batch["frames"][:, :, 0, 0, 0], batch["frames"][:, :, 0, 0, 1].astype(int)
        assert (episode == episode[:, :1]).all()                           # one episode per window
        assert (np.diff(index, axis=1) == 1).all()                         # consecutive frames
        assert np.array_equal(batch["first"], index == 0)
        assert set(np.unique(episode)) == ({0, 3} if split == "eval" else {2, 4})   # 1 and 5 are too short
    assert len(dataset.window_starts("train", 5)) == (12 - 4) + (9 - 4)   # every valid start in 2 and 4, no more
    # the online loop's own episodes: windows from the first_episode-th file on only
    own = dataset.sample_index(500, 5, "train", rng, first_episode=3)[:, 0]
    assert set(dataset.frames[own, 0, 0, 0]) == {4} and len(dataset.window_starts("train", 5, 3)) == 9 - 4
    assert len(dataset.window_starts("train", 5, 5, required=False)) == 0   # 5 is too short
    with pytest.raises(d4.ConfigError, match="no train episode has 5 frames"):
        dataset.sample_index(1, 5, "train", rng, first_episode=5)


def test_the_held_out_split_is_every_nth_episode_starting_with_the_first(tmp_path):
    write_episodes(tmp_path, [4] * 7)
    assert d4.EpisodeDataset(tmp_path, holdout_every=3).split.tolist() == ["eval", "train", "train"] * 2 + ["eval"]


def test_the_dataset_keeps_frames_uint8_without_transient_copies(tmp_path):
    write_episodes(tmp_path, [400] * 10, size=64)
    tracemalloc.start()
    dataset = d4.EpisodeDataset(tmp_path, holdout_every=10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dataset.frames.dtype == np.uint8 and dataset.frames.shape == (4000, 64, 64, 3)
    assert peak < 1.2 * dataset.frames.nbytes   # loaded into place, one episode at a time


def test_random_collection_writes_frame_aligned_episodes(tiny_cfg, tmp_path):
    d4.collect_random(tiny_cfg, tmp_path)
    files = d4.episode_files(tmp_path)
    assert len(files) >= 2 and (tmp_path / "complete").exists()
    episode = np.load(files[0])
    n = len(episode["rewards"])
    assert episode["frames"].shape == (n, 32, 32, 3) and episode["frames"].dtype == np.uint8
    assert episode["actions"].shape == (n, 3) and not episode["actions"][0].any()   # no action leads to frame 0
    assert episode["rewards"][0] == 0 and episode["terminated"].sum() + episode["truncated"].sum() == 1
    assert episode["terminated"][-1] or episode["truncated"][-1]
    bins = d4.ActionBins(gym.make("CarRacing-v3").action_space, tiny_cfg.action_bins)
    assert np.allclose(bins.from_bins(bins.to_bins(episode["actions"][1:])), episode["actions"][1:])  # binned actions
    assert episode["frames"].std(axis=0).mean() > 1   # the view changes as the car moves
    total = sum(len(np.load(f)["rewards"]) for f in files)
    assert tiny_cfg.collect_frames <= total < tiny_cfg.collect_frames + 2 * 2


def test_multi_car_collection_stores_each_car_as_its_own_episode(tiny_cfg, tmp_path):
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "env": "MultiCarRacing-v0", "num_envs": 2})
    d4.collect_random(cfg, tmp_path)
    episodes = [np.load(f) for f in d4.episode_files(tmp_path)]
    assert len(episodes) == 4   # 2 envs x 2 cars, all still racing when the frame budget ran out
    for episode in episodes:
        n = len(episode["rewards"])
        assert episode["frames"].shape == (n, 32, 32, 3) and episode["actions"].shape == (n, 3)
        assert episode["truncated"][-1] and not episode["actions"][0].any()
    assert not np.array_equal(episodes[0]["frames"], episodes[1]["frames"])   # two cars, two views
    assert sum(len(e["rewards"]) for e in episodes) >= cfg.collect_frames


def test_multi_car_collection_continues_past_episodes_the_time_limit_ends_in_every_env_at_once(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, env="MultiCarRacing-v0", num_envs=2, max_episode_steps=30, collect_frames=120)
    d4.collect_random(cfg, tmp_path)
    episodes = [np.load(f) for f in d4.episode_files(tmp_path)]
    full = [e for e in episodes if len(e["rewards"]) == 1 + (30 - 4) // 2]   # reset frame + one per 2-step action
    assert len(full) >= 4 and all(e["truncated"][-1] and not e["terminated"].any() for e in full)


def test_evaluation_drives_every_car_with_the_same_policy_and_reports_each_return(tiny_cfg):
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "env": "MultiCarRacing-v0", "max_episode_steps": 60})

    class Recorder(d4.RandomExplorer):
        def __call__(self, frames):
            self.seen.append(frames.shape)
            return super().__call__(frames)

    def recorder():
        policy = Recorder(d4.ActionBins(gym.spaces.Box(-1, 1, (3,)), 33), np.random.default_rng(0))
        policy.seen = []
        return policy

    def run():
        policy = recorder()
        return ev.evaluate_returns(cfg, policy, episodes=2, seed=5), policy.seen

    returns, seen = run()
    assert returns.shape == (2, 2) and set(seen) == {(4, 32, 32, 3)}   # one call: both cars of both episodes
    assert np.array_equal(returns, run()[0])                           # seeded env and policy: repeatable
    assert (returns >= -100 - 0.1 * 60).all() and (returns < 1000).all()   # reward bounds of the rules
    assert (returns[:, 0] != returns[:, 1]).all()                            # each car's own return
    averaged, _ = ev.evaluate_policies(dataclasses.replace(cfg, eval_max_episode_steps=60), {"r": recorder()}, 2, 5)
    assert np.allclose(averaged["r"], returns.mean(1))   # an episode's return: the mean over its agents


def test_single_agent_evaluation_returns_one_column(tiny_cfg):
    cfg = tiny_cfg.__class__(**{**vars(tiny_cfg), "max_episode_steps": 40})
    policy = d4.RandomExplorer(d4.ActionBins(gym.spaces.Box(-1, 1, (3,)), 33), np.random.default_rng(0))
    assert ev.evaluate_returns(cfg, policy, episodes=2, seed=0).shape == (2, 1)


@pytest.mark.parametrize("layers", [2, 4])
def test_every_frame_is_encoded_with_its_own_causal_window(tiny_cfg, tmp_path, layers):
    """Frame t's latents come from frames max(episode start, t - window + 1)..t, the same for every t, as when
    acting; and new episodes can be encoded on their own. Both ways: streamed through a KV cache (one time block)
    and re-encoding each frame's window (two), with episodes of different lengths in one batch."""
    write_episodes(tmp_path, [3, 9, 6], size=tiny_cfg.image_size)
    dataset = d4.EpisodeDataset(tmp_path, holdout_every=2)
    dataset.frames[:] = np.random.default_rng(0).integers(0, 256, dataset.frames.shape)   # frames that differ
    tokenizer = d4.Tokenizer(dataclasses.replace(tiny_cfg, tok_enc_layers=layers, time_every=2)).eval()
    assert tokenizer.streams_exactly == (layers == 2)
    with torch.no_grad():
        tokenizer.latent_tokens.normal_()   # make every latent depend clearly on its context
    latents = d4.encode_dataset(tokenizer, dataset, window=4, device=torch.device("cpu"), batch=2)
    for t in range(len(dataset.frames)):
        start = dataset.starts[dataset.starts <= t].max()
        context = dataset.frames[max(start, t - 3):t + 1][None]
        with torch.no_grad():
            expected = tokenizer.encode(d4.frames_to_tensor(context, torch.device("cpu")))[0, -1]
        assert torch.allclose(torch.from_numpy(latents[t]).float(), expected, atol=2e-3), t
    assert np.array_equal(d4.encode_dataset(tokenizer, dataset, 4, torch.device("cpu"), first_frame=3), latents[3:])


def test_car_racing_draws_only_the_frames_it_returns_and_they_are_unchanged(tiny_cfg, monkeypatch):
    from gymnasium.envs.box2d.car_racing import CarRacing

    draws = []
    render = CarRacing._render
    monkeypatch.setattr(CarRacing, "_render", lambda self, mode: draws.append(mode) or render(self, mode))
    # 4 no-ops, then 8 actions repeated 3 times; the time limit ends the 8th after 2 of its 3 steps, where the
    # score printed on the frame (rounded) changes with that step's time penalty
    cfg = dataclasses.replace(tiny_cfg, zoom_skip=4, action_repeat=3, max_episode_steps=4 + 3 * 7 + 2)
    actions = np.random.default_rng(0).uniform([-1, 0, 0], [1, 1, 0.2], (8, 3)).astype(np.float32)

    def episode(skip):
        env = d4.make_env(cfg)
        wrappers = [w for w in d4.wrapper_chain(env) if isinstance(w, (d4.RepeatAction, d4.ResetNoops))]
        assert len(wrappers) == 2 and all(w.skip_drawing for w in wrappers)
        for w in wrappers:
            w.skip_drawing = skip
        draws.clear()
        frames, rewards, ends = [env.reset(seed=5)[0]], [], []
        for action in actions:
            obs, reward, terminated, truncated, _ = env.step(action)
            frames.append(obs), rewards.append(reward), ends.append(terminated or truncated)
        env.close()
        return np.stack(frames), np.array(rewards), ends, len(draws)

    frames, rewards, ends, drawn = episode(skip=True)
    all_frames, all_rewards, all_ends, all_drawn = episode(skip=False)
    assert ends == all_ends == [False] * 7 + [True]
    assert all_drawn == 1 + 4 + 3 * 7 + 2 and drawn == 1 + 1 + 8   # reset, last no-op, one per returned frame
    assert np.array_equal(frames, all_frames) and np.array_equal(rewards, all_rewards)
    assert len(np.unique(frames.reshape(9, -1), axis=0)) == 9   # the car moved: every frame differs
