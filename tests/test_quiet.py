"""Quiet by default (issue 29): `ask` prints its answer and figures only; --verbose brings
the libraries' bars and messages back; the GGUF bar and third-party FutureWarnings hide."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prumerge.cli import main


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(path)
    return path


def test_ask_prints_only_its_answer_and_figures(
    tiny_checkpoint: Path, photo: Path, capsys, one_thread: None
) -> None:
    argv = ["ask", str(photo), "what color", "--model", str(tiny_checkpoint)]
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no "Loading weights" bar, no transformers advice
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["answer", "visual tokens", "time"]

    assert main([*argv, "--max-new-tokens", "2", "--verbose"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_library_future_warnings_hide_but_ours_do_not() -> None:
    from prumerge.quiet import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries(verbose=False):
            warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.x")
            warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="prumerge.y")
        with quiet_libraries(verbose=True):
            warnings.warn_explicit("shown", FutureWarning, "x.py", 1, module="transformers.x")
    assert [str(w.message) for w in seen] == ["ours", "shown"]


def test_the_gguf_bar_hides_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from prumerge.quiet import hide_gguf_bar, quiet_libraries

    bars: list[dict] = []

    def recording_tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    monkeypatch.setattr(gguf_utils, "tqdm", recording_tqdm)
    for verbose in (False, True):
        with quiet_libraries(verbose=verbose), hide_gguf_bar():
            assert list(gguf_utils.tqdm([1, 2], desc="Converting")) == [1, 2]
    assert [kwargs.get("disable") for kwargs in bars] == [True, None]
    assert gguf_utils.tqdm is recording_tqdm  # restored


def test_the_first_build_keeps_its_gguf_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from prumerge.quiet import first_build, hide_gguf_bar, quiet_libraries

    bars: list[dict] = []

    def recording_tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    monkeypatch.setattr(gguf_utils, "tqdm", recording_tqdm)
    with quiet_libraries(verbose=False):
        with first_build(), hide_gguf_bar():
            list(gguf_utils.tqdm([1], desc="Converting"))
        with hide_gguf_bar():  # a later build (training, a rebuild of parts) stays quiet
            list(gguf_utils.tqdm([1], desc="Converting"))
    assert [kwargs.get("disable") for kwargs in bars] == [None, True]
