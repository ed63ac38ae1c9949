"""Pieces of training that need no real model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def test_standardisation_folds_into_the_stock_projector():
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from prumerge.train.modules import StandardizedProjector

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
    from prumerge.train.loop import lr_at

    lrs = [lr_at(s, 1e-3, 10, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    from prumerge.train.loop import batch_order

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
    from prumerge.train.packing import isolation_mask

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


def test_mixture_parsing_and_a_reproducible_draw():
    from prumerge.train.mixture import draw, parse_mixture

    mixture = parse_mixture("none:1,prumerge:2,prumerge+,visionzip@64:1,cls_topk@0.25:0.5")
    assert [(e.label, e.keep, e.weight) for e in mixture] == [
        ("none", None, 1.0),
        ("prumerge", None, 2.0),
        ("prumerge+", None, 1.0),
        ("visionzip@64", 64, 1.0),
        ("cls_topk@0.25", 0.25, 0.5),
    ]
    draws = [draw(mixture, seed=0, step=s).label for s in range(2000)]
    assert draws == [draw(mixture, seed=0, step=s).label for s in range(2000)]  # resumable
    assert draws != [draw(mixture, seed=1, step=s).label for s in range(2000)]
    share = draws.count("prumerge") / len(draws)
    assert abs(share - 2 / 5.5) < 0.04  # weights are relative frequencies


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty entry"),
        ("none,,prumerge", "empty entry"),
        ("nosuch", "unknown method"),
        ("prumerge@0", "keep"),
        ("prumerge@abc", "budget"),
        ("prumerge:-1", "positive"),
        ("prumerge:x", "not a number"),
        ("fastv@64", "inside the language model"),
        ("prumerge,prumerge:2", "listed twice"),
    ],
)
def test_mixture_errors_are_one_line(text, message):
    from prumerge.errors import PrumergeError
    from prumerge.train.mixture import parse_mixture

    with pytest.raises(PrumergeError, match=message) as info:
        parse_mixture(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"lora_lr": 0.0}, "--lora-lr must be a positive number"),
        ({"warmup_steps": -1}, "--warmup-steps must be a number >= 0"),
        ({"grad_clip": -0.5}, "--grad-clip must be a number >= 0"),
        ({"time_budget_min": 0.0}, "--time-budget-min must be a positive number"),
        ({"steps": 0}, "--steps must be a positive number"),
        ({"lora_rank": -2}, "--lora-rank must be a number >= 0"),
        ({"instruction_rate": 1.5}, "--instruction-rate"),
        ({"synth_scenes": 3}, "give both --synth-scenes and --synth-per-batch"),
        ({"data": "x.json"}, "--data trains a model given with --model"),
        ({"model": "some/llava"}, "--model needs --data"),
        ({"init_projector": "/nonexistent.safetensors"}, "--init-projector: no such file"),
        # a picture given as projector weights: refused from its header, before any build
        ({"init_projector": __file__}, "not a safetensors file of projector weights"),
        ({"init_lora": "/nonexistent"}, "not a LoRA adapter directory"),
        ({"install": "other"}, "--install takes a variant name"),
        ({"reduce": "fastv"}, "inside the language model"),
        ({"train_projector": False}, "nothing to train"),
        ({"minority_repeat": 0}, "--minority-repeat must be a whole number >= 1"),
        ({"synth_questions": "color"}, "--synth-questions needs --synth-scenes"),
        (
            {"synth_scenes": 4, "synth_per_batch": 1, "synth_questions": "color,colour"},
            "--synth-questions: unknown question type 'colour'",
        ),
        ({"minority_repeat": 2.5}, "--minority-repeat must be a whole number >= 1"),
        (
            {"model": "some/llava", "data": __file__, "packing": "chat", "minority_repeat": 2},
            "--minority-repeat applies to the default model only",
        ),
    ],
)
def test_config_checks_are_one_line(changes, message):
    import dataclasses

    from prumerge.errors import PrumergeError
    from prumerge.train.config import TrainConfig, check_config

    cfg = dataclasses.replace(TrainConfig(), **changes)
    with pytest.raises(PrumergeError, match=message) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from prumerge.errors import PrumergeError
    from prumerge.train.config import TrainConfig, check_config

    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(PrumergeError, match="exists and is not a directory"):
        check_config(TrainConfig(output_dir=str(path)))


def test_config_difference_names_the_fields():
    import dataclasses

    from prumerge.train.config import TrainConfig, config_difference

    old = dataclasses.asdict(TrainConfig(lr=1e-3, lora_rank=8))
    del old["reduce"]  # a field added since that run: its default applies
    new = TrainConfig(lr=5e-4, lora_rank=8, eval_images=3, time_budget_min=1.0)
    assert config_difference(old, new) == ["lr: 0.001 -> 0.0005"]


def test_prompt_embedding_replaces_only_its_rows():
    from prumerge.train.modules import PromptEmbedding

    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4).requires_grad_(False)  # frozen, as in training
    rows = torch.randn(2, 4)
    wrapped = PromptEmbedding(base, torch.tensor([7, 9]), rows)
    ids = torch.tensor([[1, 7, 2, 9, 9]])
    out = wrapped(ids)
    torch.testing.assert_close(out[0, [0, 2]], base.weight[[1, 2]])
    torch.testing.assert_close(out[0, 1], rows[0])
    torch.testing.assert_close(out[0, 3:], rows[1].expand(2, 4))
    out.sum().backward()
    assert (
        wrapped.rows.grad is not None and base.weight.grad is None or not base.weight.requires_grad
    )


def _write_llava_json(tmp_path, records):
    import json

    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_reads_conversations(tmp_path):
    from PIL import Image

    from prumerge.data.llava_json import read_llava_json

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = _write_llava_json(
        tmp_path,
        [
            {
                "id": "1",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "A square."},
                    {"from": "human", "value": "Colour?"},
                    {"from": "gpt", "value": "Black."},
                ],
            },
            {
                "id": "2",
                "conversations": [
                    {"from": "human", "value": "text only"},
                    {"from": "gpt", "value": "ok"},
                ],
            },
        ],
    )
    (conversation,) = read_llava_json(path)
    assert conversation.image == tmp_path / "a.png"
    assert conversation.turns == (("What is it?", "A square."), ("Colour?", "Black."))


@pytest.mark.parametrize(
    "records, message",
    [
        ("not a list", "must hold a JSON list"),
        ([{"image": "a.png"}], "has no 'conversations'"),
        ([{"image": "missing.png", "conversations": []}], "image file not found"),
        ([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}], "pairs"),
        (
            [
                {
                    "image": "a.png",
                    "conversations": [
                        {"from": "gpt", "value": "x"},
                        {"from": "human", "value": "y"},
                    ],
                }
            ],
            "must be human then gpt",
        ),
        (
            [
                {
                    "image": "a.png",
                    "conversations": [
                        {"from": "human", "value": "no mark"},
                        {"from": "gpt", "value": "y"},
                    ],
                }
            ],
            "first human turn only",
        ),
        ([], "holds no conversation with an image"),
    ],
)
def test_llava_json_errors_name_the_record(tmp_path, records, message):
    from PIL import Image

    from prumerge.data.llava_json import read_llava_json
    from prumerge.errors import PrumergeError

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = _write_llava_json(tmp_path, records)
    with pytest.raises(PrumergeError, match=message):
        read_llava_json(path)


def test_llava_json_unreadable_file(tmp_path):
    from prumerge.data.llava_json import read_llava_json
    from prumerge.errors import PrumergeError

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PrumergeError, match="not valid JSON"):
        read_llava_json(bad)
    with pytest.raises(PrumergeError, match="cannot read"):
        read_llava_json(tmp_path / "nope.json")


def test_allocator_settings_are_accepted_on_glibc():
    import platform

    from prumerge.train.process import tune_allocator

    applied = tune_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied  # glibc accepted every value (mallopt returns 0 for a bad one)
    else:
        assert not applied


def test_merge_lora_lives_with_models_and_refuses_a_folder_without_an_adapter(tmp_path):
    import torch

    from prumerge.errors import PrumergeError
    from prumerge.models.lora import merge_lora
    from prumerge.train import lora

    assert lora.merge_lora is merge_lora  # training re-exports it; models import nothing above
    with pytest.raises(PrumergeError, match="holds no LoRA adapter"):
        merge_lora(torch.nn.Linear(2, 2), tmp_path)
