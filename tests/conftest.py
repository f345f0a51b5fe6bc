"""Shared fixtures. Everything is offline: an accidental download fails at once."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# small, fast settings for a whole round on the embedded model
FAST = [
    "generate.images_per_prompt=4",
    "generate.batch_size=8",
    "generate.steps=4",
    "train.steps=8",
    "train.batch_size=4",
    "rate.cutoffs=[0,-30,-60,-120]",
]


@pytest.fixture
def ws(tmp_path: Path):
    """A fresh workspace with two prompts."""
    from loop.workspace import Workspace

    w = Workspace.init(tmp_path / "ws")
    w.prompts_path.write_text("# test prompts\na circle\na square\n", encoding="utf-8")
    return w


@pytest.fixture
def cfg(ws):
    from loop.config import load_config

    return load_config(ws.root, FAST)


@pytest.fixture(scope="session")
def base_pipe():
    """The embedded model as a diffusers pipeline (loaded once; tests must not modify it)."""
    from loop.config import ModelConfig
    from loop.models import load_base

    return load_base(ModelConfig())
