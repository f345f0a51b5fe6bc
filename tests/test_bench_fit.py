"""python -m loop.bench fit: the control that trains one unit on the base's own pictures, chosen by the taste alone."""

import numpy as np
import pytest
from PIL import Image

from loop.config import RateConfig


def test_the_control_learns_from_all_the_pictures_or_the_ones_the_taste_rates_ur(ws):
    from loop.bench.fit import training_pictures

    folder = ws.cache("pool", "test")
    folder.mkdir(parents=True)
    pool = []
    for i, colour in enumerate([(230, 30, 30), (30, 30, 230)]):  # a red and a blue square
        img = np.full((16, 16, 3), 128, dtype=np.uint8)
        img[2:14, 2:14] = colour
        Image.fromarray(img).save(folder / f"p{i}.png")
        pool.append({"sha256": str(i), "path": ws.rel(folder / f"p{i}.png"), "caption": "a square", "pool": True})
    warm = RateConfig(preference="warm", noise=0.0)
    assert [it["sha256"] for it in training_pictures(ws, pool, warm, "ur", 1)] == ["0"]  # only the red one is UR
    every = training_pictures(ws, pool, warm, "all", 2)
    assert len(every) == 4 and all(it["winner"] for it in every)
    assert [it["tier"] for it in every][:2] == ["UR", "N"]
    # turned half way round, the red square is cyan and the blue one yellow: the copies are rated as themselves
    assert [it.get("hue") for it in training_pictures(ws, pool, warm, "ur", 2)] == [None, 180]


def test_a_wrong_hues_or_taste_is_one_clear_line():
    from loop.bench.__main__ import main

    with pytest.raises(SystemExit, match="--pool and --hues"):
        main(["fit", "--hues", "0"])
    with pytest.raises(SystemExit, match="--taste sour: unknown sour"):
        main(["fit", "--taste", "sour"])
