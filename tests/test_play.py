"""run.py (all three stages in one command) and play.py (driving inside the world model), on one tiny run."""
import os
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# a tiny run with as few steps and episodes as the stages accept: the point is the plumbing, not the models
QUICK = ["--preset", "tiny", "--wandb", "disabled", "--collect-frames", "120", "--num-envs", "1",
         "--max-episode-steps", "30", "--mae-steps", "4", "--dynamics-steps", "4", "--finetune-steps", "2",
         "--imagination-steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-episodes", "1"]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SDL_VIDEODRIVER": "dummy"})


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    result = run("run.py", *QUICK, "--run-dir", str(run_dir))
    return run_dir, result


def test_run_py_trains_all_three_stages_in_order(pipeline):
    run_dir, result = pipeline
    assert result.returncode == 0, result.stderr
    started = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("stage ")
               and " done " not in line]
    assert started == ["stage 1/3", "stage 2/3", "stage 3/3"]
    assert torch.load(run_dir / "tokenizer.pt", weights_only=True)["step"] == 4
    assert torch.load(run_dir / "dynamics.pt", weights_only=True)["step"] == 4
    assert torch.load(run_dir / "agent.pt", weights_only=True)["progress"]["step"] == 4


def test_run_py_stops_at_the_first_failing_stage(tmp_path):
    result = run("run.py", *QUICK, "--run-dir", str(tmp_path), "--env", "NoSuchEnv-v0")
    assert "NoSuchEnv-v0" in one_line_error(result)
    assert "stage 1/3" in result.stdout and "stage 2/3" not in result.stdout


def test_run_py_refuses_steps_before_running_anything(tmp_path):
    assert "--mae-steps" in one_line_error(run("run.py", *QUICK, "--run-dir", str(tmp_path), "--steps", "3"))
    assert not any(tmp_path.iterdir())


def play(run_dir, *args):
    return run("play.py", "--run-dir", str(run_dir), "--fps", "0", *args)


def test_play_dreams_from_scripted_keys_and_reports_its_speed(pipeline, tmp_path):
    run_dir = pipeline[0]
    videos = {}
    for name, keys in (("gas", "w*20"), ("gas again", "w*20"), ("left", "a*20")):
        result = play(run_dir, "--keys", keys, "--frames", "20", "--video", str(tmp_path / f"{name}.mp4"))
        assert result.returncode == 0, result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("frames/s: ") and float(last.split()[-1]) > 0
        videos[name] = np.stack(imageio.mimread(tmp_path / f"{name}.mp4"))
    assert len(videos["gas"]) == 21   # the last context frame, then 20 dreamed ones
    assert np.array_equal(videos["gas"], videos["gas again"])   # same seed, same keys: the same dream
    assert not np.array_equal(videos["gas"], videos["left"])    # the keys drive the dream


def test_play_side_by_side_and_agent_modes_run(pipeline):
    result = play(pipeline[0], "--agent", "--side-by-side", "--frames", "5")
    assert result.returncode == 0, result.stderr
    assert "real return" in result.stdout and result.stdout.strip().splitlines()[-1].startswith("frames/s: ")


def test_play_without_agent_checkpoint_is_a_one_line_error(tmp_path):
    line = one_line_error(play(tmp_path, "--keys", "w", "--frames", "1"))
    assert "agent.pt" in line and "train_policy.py" in line


def test_play_rejects_unreadable_keys_in_one_line(pipeline):
    assert "--keys" in one_line_error(play(pipeline[0], "--keys", "w*2,x"))
