"""Generation options with reduction (beam search, several sequences, sampling, stop strings,
max_new_tokens=0) and right-padded forward passes."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import prumerge

from .families import CASES, build_batch
from .test_families import FAMILY, ROWS, answers, family_methods, generate, model_inputs


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: token i is the word 't<i>', decoded
    without spaces. Stop strings need "abcdef" to be encodable (their criteria probe it)."""
    vocab = {f"t{i}": i for i in range(100)} | {"abcdef": 100}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2")


@FAMILY
@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 20, "num_return_sequences": 3},
    ],
)
def test_beams_and_several_sequences_match_the_unpatched_model(family, options):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    torch.manual_seed(5)
    expected = generate(model, inputs, **options)
    with prumerge.apply(model, "none"):
        torch.manual_seed(5)
        got = generate(model, inputs, **options)
    assert torch.equal(got, expected)
    n = options["num_return_sequences"]
    with prumerge.apply(model, "prumerge", keep=6):
        torch.manual_seed(5)
        reduced = generate(model, inputs, **options)
    assert reduced.shape[0] == 3 * n
    prompt = inputs["input_ids"].repeat_interleave(n, dim=0)
    assert torch.equal(reduced[:, : prompt.shape[1]], prompt)


@FAMILY
def test_beam_search_rows_equal_rows_alone(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "prumerge+", keep=0.4):
        batch = generate(model, inputs, num_beams=2, num_return_sequences=2)
        for i, row in enumerate(ROWS):
            one = build_batch(case, model, [row])
            alone = generate(model, one, num_beams=2, num_return_sequences=2)
            width = inputs["input_ids"].shape[1]
            assert (
                batch[2 * i : 2 * i + 2, width:].tolist()
                == alone[:, one["input_ids"].shape[1] :].tolist()
            )


def test_stop_strings_and_zero_new_tokens():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    tokenizer = tiny_tokenizer()
    free = generate(model, inputs, max_new_tokens=6)
    stop = tokenizer.decode([answers(free, inputs)[0][1]])  # row 0's second new token
    expected = generate(model, inputs, max_new_tokens=6, stop_strings=[stop], tokenizer=tokenizer)
    with prumerge.apply(model, "none"):
        got = generate(model, inputs, max_new_tokens=6, stop_strings=[stop], tokenizer=tokenizer)
        assert torch.equal(got, expected)
        with pytest.raises(ValueError, match="max_new_tokens` must be greater than 0") as info:
            generate(model, inputs, max_new_tokens=0)
    assert "\n" not in str(info.value)
    # Row 0 stops at (or before) its second token and is padded after it.
    row = answers(got, inputs)[0]
    assert row[-1] == 0 and row[:2] != [0, 0]
    with prumerge.apply(model, "prumerge", keep=5):
        reduced = generate(
            model, inputs, max_new_tokens=6, stop_strings=[stop], tokenizer=tokenizer
        )
    assert reduced.shape[0] == 3


@pytest.mark.parametrize(
    ("family", "method", "options"),
    family_methods([("none", {}), ("prumerge", {"keep": 6}), ("fastv", {"keep": 5})]),
)
def test_right_padded_forward_rows_equal_rows_alone(family, method, options):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    # Right padding: move each row's padding to its end.
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    order = torch.argsort((mask == 0).long(), dim=1, stable=True)
    right = dict(inputs, input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order))
    if case.token_types is not None:
        right[case.token_types] = inputs[case.token_types].gather(1, order)
    with prumerge.apply(model, method, **options) as handle, torch.no_grad():
        batch = model(**model_inputs(right)).logits
        images = {
            k: v for k, v in model_inputs(right).items() if k not in ("input_ids", "attention_mask")
        }
        shrunk = handle.prepare_inputs(
            right["input_ids"], attention_mask=right["attention_mask"], **images
        )
        for i, row in enumerate(ROWS):
            one = build_batch(case, model, [row])
            alone = model(**model_inputs(one)).logits[0]
            # Rows stay right-padded: the row's last real token is its last unmasked slot.
            last = int(shrunk["attention_mask"][i].sum()) - 1
            if method == "fastv":
                # Layers >= K pad shorter rows at the front: count back from the end instead.
                last = batch.shape[1] - shrunk["attention_mask"].shape[1] + last
            torch.testing.assert_close(batch[i, last], alone[-1], rtol=1e-4, atol=1e-5)
