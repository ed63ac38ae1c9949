"""The default model's training items: balancing yes/no never leaves an image without a turn."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prumerge.errors import PrumergeError
from prumerge.train.items import default_model_items
from prumerge.train.packing import encode_chat, encode_isolated_turns


def test_balancing_skips_images_left_with_no_question():
    # 184 of easy-vqa's 4,000 training images have only yes/no questions; subsampling the
    # majority cells can drop all of an image's turns. Such an image used to reach packing
    # with no turns: a sequence without its image placeholder, and a failed training step.
    messages: list[str] = []
    cfg = SimpleNamespace(
        train_images=None,
        synth_scenes=0,
        seed=2,
        balance_yes_no=True,
        minority_repeat=1,
        instruction_rate=0.0,
    )
    items, num_easy = default_model_items(cfg, messages.append)
    assert num_easy == len(items)
    assert all(turns for _, turns in items)
    skipped = 4000 - len(items)
    assert skipped > 0
    assert f"{skipped} easy-vqa images left with no question after balancing; skipped" in messages


def test_minority_repeat_weights_the_minority_cells_and_drops_nothing():
    from collections import Counter

    from prumerge.data.easy_vqa import is_negated

    def cells(repeat: int) -> tuple[Counter, int]:
        cfg = SimpleNamespace(
            train_images=300,
            synth_scenes=0,
            seed=0,
            balance_yes_no=False,
            minority_repeat=repeat,
            instruction_rate=0.0,
        )
        items, num_easy = default_model_items(cfg, lambda _: None)
        counts = Counter(
            (is_negated(q), a) for _, turns in items for q, a in turns if a in ("yes", "no")
        )
        others = sum(1 for _, turns in items for _, a in turns if a not in ("yes", "no"))
        assert num_easy == len(items) == 300
        return counts, others

    plain, others = cells(1)
    tripled, others_tripled = cells(3)
    # easy-vqa's minority answers: "yes" to a plain question, "no" to a negated one
    assert plain[(False, "yes")] < plain[(False, "no")]
    assert plain[(True, "no")] < plain[(True, "yes")]
    assert tripled[(False, "yes")] == 3 * plain[(False, "yes")]
    assert tripled[(True, "no")] == 3 * plain[(True, "no")]
    assert tripled[(False, "no")] == plain[(False, "no")]
    assert tripled[(True, "yes")] == plain[(True, "yes")]
    assert others_tripled == others


@pytest.mark.parametrize("wanted", ["", "color,shape", "relation"])
def test_synth_questions_keep_only_the_types_asked_for(wanted):
    from prumerge.data import synth

    cfg = SimpleNamespace(
        train_images=2,
        synth_scenes=6,
        synth_questions=wanted,
        seed=1,
        balance_yes_no=False,
        minority_repeat=1,
        instruction_rate=0.0,
    )
    items, num_easy = default_model_items(cfg, lambda _: None)
    scenes = synth.generate(6, split="train", seed=1)
    types = set(wanted.split(",")) if wanted else set(synth.QUESTION_TYPES)
    expected = [
        {(q.question, q.answer) for q in scene.questions if q.subtask in types} for scene in scenes
    ]
    expected = [turns for turns in expected if turns]  # a scene with none of them is skipped
    assert num_easy == 2
    assert [set(turns) for _, turns in items[num_easy:]] == expected
    if wanted == "color,shape":
        assert len(expected) == 6 and all(len(turns) == 2 for turns in expected)


def test_packing_refuses_an_image_with_no_turn():
    from tests.eval.tiny_model import build_processor

    processor = build_processor()
    with pytest.raises(PrumergeError, match="no question-answer turn"):
        encode_isolated_turns(processor, [], 4, lambda q: f"USER : <image> {q}", "</s>")
    with pytest.raises(PrumergeError, match="no question-answer turn"):
        encode_chat(processor, [], 4, lambda messages, prompt: "")


def test_training_doc_lists_every_synth_question_type():
    import re
    from pathlib import Path

    from prumerge.data.synth import QUESTION_TYPES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    sentence = re.search(r"the\s+types are (.*?); default: all", doc, re.S)
    assert sentence is not None
    assert tuple(re.findall(r"`(\w+)`", sentence.group(1))) == QUESTION_TYPES
