import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the suite's models are tiny: one thread is fastest and immune to a busy second core


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~5 s (deselect with -m 'not slow')")


@pytest.fixture
def small_corpus(tmp_path):
    """250 shuffled stdlib docstrings in one text file: about 800 sequences of 32 tokens, a study in seconds."""
    from data import stdlib_corpus
    docs = list(stdlib_corpus())
    random.Random(0).shuffle(docs)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs[:250]))
    return path


def png(path):
    """The PNG at path as an (height, width, 4) array of RGBA floats in [0, 1] (matplotlib reads PNG itself)."""
    import matplotlib.image
    return matplotlib.image.imread(path)


def pixels(image, colour, tol=0.06):
    """How many pixels of the image are drawn in `colour` (a matplotlib colour: "red", "C3", "#1f77b4"), within tol."""
    import matplotlib.colors
    import numpy as np
    return int((np.abs(image[..., :3] - np.array(matplotlib.colors.to_rgb(colour))) <= tol).all(-1).sum())
