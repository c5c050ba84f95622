import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dreamer4 as d4  # noqa: E402


@pytest.fixture
def tiny_cfg():
    """The tiny preset, with two encoder and two decoder blocks so both space and time blocks are present."""
    torch.manual_seed(0)
    return d4.parse_config("mae", "", ["--preset", "tiny", "--wandb", "disabled"])


@pytest.fixture
def stage(monkeypatch, capsys):
    """Runs a script's main() in this process as its command line would (without a new interpreter's start-up):
    stage("train_mae.py", *argv) -> an object with returncode, stdout and stderr, like subprocess.run's."""
    def run(script, *argv):
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [script, *argv])
            try:
                d4.run_cli(importlib.import_module(Path(script).stem).main)
                code = 0
            except SystemExit as e:
                code = e.code
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run
