"""A tiny random LLaVA, loaded the way `prumerge demo --model DIR` loads a checkpoint."""

import numpy as np
import pytest
from PIL import Image

from prumerge.demo import DemoModel
from tests.eval.tiny_model import save_tiny_llava


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    folder = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    return DemoModel.load(str(folder))


@pytest.fixture
def photo():
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
