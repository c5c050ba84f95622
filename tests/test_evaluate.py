"""The standard evaluation protocol (SPEC Sec. 6): full episodes under the env's own time limit, every reward,
seeded tracks shared by every policy, paired statistics, and evaluate.py's line in metrics.jsonl."""
import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import dreamer4 as d4
import evaluate as ev


class Scripted:
    """A policy that replays fixed bin indices, one row per step, the same for every stream."""

    def __init__(self, indices):
        self.indices = indices

    def reset(self, streams):
        self.streams, self.step = streams, 0

    def __call__(self, frames):
        self.step += 1
        return np.repeat(self.indices[(self.step - 1) % len(self.indices)][None], self.streams, axis=0)


def test_an_evaluation_episode_is_the_raw_envs_episode_step_for_step(tiny_cfg):
    """Same seed and actions: the same number of env steps (the env's own 1000, zoom-in no-ops included) and the
    same return (every reward, the no-ops' included) as CarRacing-v3 stepped by hand."""
    cfg = dataclasses.replace(tiny_cfg, action_repeat=4, zoom_skip=50, max_episode_steps=200, eval_max_episode_steps=0)
    bins = d4.env_action_bins(cfg)
    indices = np.random.default_rng(0).integers(14, 19, (300, 3))   # nearly straight:
    indices[:, 1], indices[:, 2] = 8, 0                              # a quarter of the gas visits some tiles,
    indices[25:, 1], indices[25:, 2] = 0, 32                         # then it brakes before leaving the playfield
    returns, first = ev.evaluate_policies(cfg, {"scripted": Scripted(indices)}, episodes=1, seed=7)

    env = gym.make("CarRacing-v3")
    env.unwrapped._render = lambda mode: None   # rewards and time limit do not read the frames: skip the drawing
    env.reset(seed=7)
    total, steps, done, decisions = 0.0, 0, False, 0
    for _ in range(50):
        _, reward, terminated, truncated, _ = env.step(np.zeros(3, np.float32))
        total, steps = total + reward, steps + 1
    while not done:
        action = bins.from_bins(indices[decisions % len(indices)])
        decisions += 1
        for _ in range(4):
            _, reward, terminated, truncated, _ = env.step(action)
            total, steps = total + reward, steps + 1
            done = terminated or truncated
            if done:
                break
    env.close()
    assert steps == 1000 and truncated and not terminated   # the env's own limit, zoom-in included
    assert len(first["scripted"]) == decisions + 1 == 1 + math.ceil(950 / 4)   # frames: the reset's and one a step
    assert returns["scripted"][0] == pytest.approx(total, abs=1e-3) and total > -50 - 0.1 * 1000   # tiles visited


def test_paired_statistics_of_hand_made_returns():
    summary = ev.evaluation_summary({"eval": np.array([1.0, 2.0, 6.0]), "bc": np.array([0.0, 2.0, 1.0]),
                                     "random": np.array([-1.0, -1.0, -1.0])})
    assert summary["episodes"] == 3
    assert summary["eval_return"] == pytest.approx(3.0)
    assert summary["eval_return_se"] == pytest.approx(math.sqrt(7) / math.sqrt(3))   # sample std sqrt(7)
    assert summary["bc_return_se"] == pytest.approx(1 / math.sqrt(3))
    # differences 1, 0, 5: mean 2, sample std sqrt(7), standard error sqrt(7 / 3)
    assert summary["trained_minus_bc"] == pytest.approx(2.0)
    assert summary["trained_minus_bc_se"] == pytest.approx(math.sqrt(7) / math.sqrt(3))
    assert summary["random_return_se"] == 0 and summary["trained_minus_random"] == pytest.approx(4.0)
    assert "trained_minus_eval" not in summary
    assert summary["bc_returns"] == [0.0, 2.0, 1.0] and summary["eval_returns"] == [1.0, 2.0, 6.0]   # to pair later
    assert ev.mean_and_se([5.0]) == (5.0, 0.0)


def test_two_standard_errors_of_an_unpaired_difference():
    # SE of the difference sqrt(3^2 + 4^2) = 5: a lead counts only beyond 10
    assert ev.beats_by_two_se(10.1, 3.0, 0.0, 4.0) and not ev.beats_by_two_se(9.9, 3.0, 0.0, 4.0)
    assert not ev.beats_by_two_se(0.0, 3.0, 10.1, 4.0)   # one-sided


def test_keep_best_takes_the_last_round_unless_an_earlier_one_beat_it_by_two_standard_errors():
    kept = dict(collect_return=-4.2, collect_return_se=20.0)   # world model 4's round 6 (docs/results.md)
    assert ev.replaces_kept(None, -50.0, 1.0, last=False) and ev.replaces_kept(None, -50.0, 1.0, last=True)
    assert not ev.replaces_kept(kept, -7.9, 11.6, last=False)   # while rounds run: the better mean
    assert ev.replaces_kept(kept, -7.9, 11.6, last=True)   # its last round: a lead of 3.7 inside 2 SE (46.2)
    assert ev.replaces_kept(kept, -4.2, 20.0, last=True) and not ev.replaces_kept(kept, -4.2, 20.0, last=False)
    # world model 3: round 5's -17.0 +- 9.8 beat the last round's -44.0 +- 8.7 by 27.0 > 26.2 and stays
    assert not ev.replaces_kept(dict(collect_return=-17.0, collect_return_se=9.8), -44.0, 8.7, last=True)
    # a kept round logged without its standard error is given the last round's: 2 * sqrt(2) * 10 = 28.3
    assert ev.replaces_kept(dict(collect_return=25.0), 0.0, 10.0, last=True)
    assert not ev.replaces_kept(dict(collect_return=29.0), 0.0, 10.0, last=True)


def test_every_policy_plays_the_same_tracks(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, eval_max_episode_steps=20)
    straight = np.array([[16, 0, 0]])   # no gas: the car stands, so the first frames show only the track
    returns, first = ev.evaluate_policies(cfg, {"a": Scripted(straight), "b": Scripted(straight)}, 3, seed=11)
    assert np.array_equal(returns["a"], returns["b"]) and np.array_equal(first["a"], first["b"])
    other, _ = ev.evaluate_policies(cfg, {"a": Scripted(straight)}, 3, seed=12)
    assert not np.array_equal(other["a"], returns["a"])


def test_rank_agreement_counts_the_pairs_imagination_orders_as_reality_does():
    real = np.array([[1.0, 2.0, 3.0], [0.0, 0.05, 5.0]])       # context 2: its first pair is a tie
    imagined = np.array([[0.1, 0.3, 0.2], [9.0, 0.0, 1.0]])
    # context 1: (1,2) same, (1,3) same, (2,3) flipped; context 2: (1,3) flipped, (2,3) same
    assert ev.rank_agreement(real, imagined) == (3 / 5, 5)
    assert ev.rank_agreement(real, real) == (1.0, 5) and ev.rank_agreement(real, -real) == (0.0, 5)


def test_the_branch_test_plays_each_macro_action_from_the_same_real_states(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, imagination_context=2, eval_max_episode_steps=0)
    bins = d4.env_action_bins(cfg)
    assert list(ev.macro_actions(bins, cfg.env)) == ["gas", "brake", "left", "right"]
    torch.manual_seed(0)
    agent, tokenizer = d4.Agent(cfg, bins.bins).eval(), d4.Tokenizer(cfg).eval()
    run = lambda: ev.branch_test(agent, tokenizer, bins, cfg, torch.device("cpu"), contexts=2, prefix=3,  # noqa
                                 horizon=6)
    first = run()
    assert first["branch_pairs"] > 0 and 0 <= first["branch_agreement"] <= 1   # gas and brake part ways
    assert run() == first   # seeded states and dreams: the same numbers again
