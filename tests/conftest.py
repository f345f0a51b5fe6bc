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


@pytest.fixture
def red_blue_pool(ws, monkeypatch):
    """A taste pool of two base pictures of "a square", a red and a blue square on grey, labelled by a taste model
    that likes red (its one feature: the centre pixel's redness), so that a test can tell which picture, and which
    recolouring of it, the model calls a winner. Nothing is drawn or fitted: loop.train.pool's base_pool,
    fit_workspace and features_of_images are replaced for the test. Returns the two pool items."""
    import numpy as np
    from PIL import Image

    import loop.train.pool as pool_mod

    folder = ws.cache("pool", "test")
    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for i, colour in enumerate([(220, 40, 40), (40, 40, 220)]):
        img = np.full((16, 16, 3), 128, dtype=np.uint8)
        img[4:12, 4:12] = colour
        path = folder / f"p{i}.png"
        Image.fromarray(img).save(path)
        pool.append({"sha256": str(i), "path": ws.rel(path), "caption": "a square", "prior": False, "pool": True})

    class Warm:  # likes red: a recoloured red square is another tier
        ready, ratings, agreement = True, 40, 0.9

        def predict(self, X):
            return {"tier": ["UR" if x > 0 else "N" for x in X[:, 0]]}

    def redness(ws_, ec, paths, keys):
        return np.array([[float(np.asarray(Image.open(p))[8, 8, 0]) - 128] for p in paths])

    monkeypatch.setattr(pool_mod, "fit_workspace", lambda *a, **k: Warm())
    monkeypatch.setattr(pool_mod, "base_pool", lambda *a, **k: list(pool))
    monkeypatch.setattr(pool_mod, "features_of_images", redness)
    return pool
