"""Pieces of the projector training that need no real model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def test_standardisation_folds_into_the_stock_projector():
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from prumerge.models.train import StandardizedProjector

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config={"model_type": "dinov2", "hidden_size": 12, "num_attention_heads": 2},
        text_config={"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2},
    )
    trained = LlavaMultiModalProjector(config)
    wrapped = StandardizedProjector(trained, torch.randn(12) * 3, torch.rand(12) + 0.5)
    stock = LlavaMultiModalProjector(config)
    stock.load_state_dict(wrapped.fold())
    features = torch.randn(2, 5, 12) * 4 + 7  # (B, N, C), far from zero mean
    torch.testing.assert_close(stock(features), wrapped(features), atol=1e-5, rtol=1e-5)
    # Folding does not touch the trained module, and unfolding inverts it.
    assert not torch.equal(stock.linear_1.weight, trained.linear_1.weight)
    again = StandardizedProjector(LlavaMultiModalProjector(config), wrapped.mean, wrapped.std)
    again.load_folded(stock.state_dict())
    torch.testing.assert_close(again(features), wrapped(features), atol=1e-5, rtol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero():
    from prumerge.models.train import TrainConfig, lr_at

    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps + 1)]
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    from prumerge.models.train import batch_order

    epoch = [i for step in range(5) for i in batch_order(20, 4, step, seed=3)]
    assert sorted(epoch) == list(range(20))
    assert batch_order(20, 4, 2, seed=3) == batch_order(20, 4, 2, seed=3)  # resumable
    assert batch_order(20, 4, 5, seed=3) != batch_order(20, 4, 0, seed=3)  # new epoch
    assert batch_order(20, 4, 0, seed=3) != batch_order(20, 4, 0, seed=4)


def test_question_types_and_answer_normalisation():
    from prumerge.data.easy_vqa import question_type
    from prumerge.models import normalize_answer

    assert [question_type(a) for a in ("yes", "no", "circle", "teal")] == [
        "yes/no",
        "yes/no",
        "shape",
        "color",
    ]
    assert normalize_answer(" Yes.") == "yes"
    assert normalize_answer("Circle!\n") == "circle"
    assert normalize_answer("") == ""


def test_isolation_mask_by_hand():
    from prumerge.models.train import isolation_mask

    # prefix (0, 0), turn 1 (two tokens), turn 2 (one token), padding (-1)
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # turn 2 sees the prefix and itself, not turn 1
            [0, 0, 0, 0, 0, 1],  # padding sees only itself (no empty softmax row)
        ],
        dtype=torch.bool,
    )
    mask = isolation_mask(segments)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)


def test_negation_and_balanced_yes_no_rates():
    from prumerge.data.easy_vqa import balanced_keep_rates, is_negated

    assert is_negated("is there not a circle?")
    assert is_negated("is no red shape present?")
    assert is_negated("Doesn't the image contain a circle?")
    assert not is_negated("is there a circle?")
    assert not is_negated("is there a red shape in the image?")
    questions = ["is there a circle?"] * 8 + ["is there not a circle?"] * 6 + ["what shape?"]
    answers = ["no"] * 6 + ["yes"] * 2 + ["yes"] * 3 + ["no"] * 3 + ["circle"]
    rates = balanced_keep_rates(questions, answers)
    # plain: 6 no, 2 yes -> keep a third of the no's; negated: 3 and 3 -> keep all.
    assert rates == {
        (False, "yes"): 1.0,
        (False, "no"): pytest.approx(2 / 6),
        (True, "yes"): 1.0,
        (True, "no"): 1.0,
    }
