"""Fixtures for the model-backed evaluation tests (CLI, predictor, lmms-eval plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA checkpoint directory (model, tokenizer, processor)."""
    from tests.eval.tiny_model import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def one_thread():
    """Run torch on one thread: the tiny model is latency-bound, and on a shared machine
    extra threads only wait for each other. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
