import sys
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
