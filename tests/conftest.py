"""Suite-wide settings: the tests use tiny models, for which one torch thread is fastest.

Two threads per process buy nothing at these sizes and, on a shared 2-core machine, make
every op wait for a core; with one, the suite runs several times faster.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses the tests start
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """`(model, processor)` of the shipped default model, built once per session into a tmp
    cache (so the suite never depends on, or writes to, the user's cache)."""
    pytest.importorskip("transformers")
    from prumerge.models.default import DEFAULT_RESOLUTION, shipped_projector_path

    if not shipped_projector_path(DEFAULT_RESOLUTION).is_file():
        pytest.skip("no trained projector ships yet")
    from prumerge.models import load_default_model

    cache = tmp_path_factory.mktemp("prumerge-cache")
    return load_default_model(cache_dir=cache)
