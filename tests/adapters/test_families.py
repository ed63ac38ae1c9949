"""The guarantees every supported family gives, on tiny random configurations of its Hugging
Face class (no downloads). Parametrised over ``families.CASES``, which must cover every
family registered in ``prumerge.adapters.FAMILIES``."""

import pytest
import torch

import prumerge
from prumerge.adapters import FAMILIES
from prumerge.errors import PrumergeError
from prumerge.models import tiny

from .families import CASES, build_batch

FAMILY = pytest.mark.parametrize("family", list(CASES))
ROWS = [([[3, 4], [5, 6, 7]], [0]), ([[7, 8, 9, 3, 4], [5, 6, 8]], [1]), ([[5], [6, 7]], [2])]
EOS = tiny.EOS
#: Image, video and vision start/end ids: a random model may pick them, and a prompt that
#: ends in a placeholder no longer matches its images.
SPECIAL = [tiny.END_ID, tiny.START_ID, tiny.VIDEO_ID, tiny.IMAGE_ID]
MULTI = [([[3, 4], [5], [6, 7]], [0, 1]), ([[5], [6, 7]], [2])]


def family_methods(pairs):
    """``(family, method, options)`` for every family and every ``(method, options)`` of
    ``pairs`` it runs; what a family refuses, ``test_refused_methods_give_one_line_errors``
    checks."""
    return [
        pytest.param(family, method, options, id=f"{method}-{i}-{family}")
        for family, case in CASES.items()
        for i, (method, options) in enumerate(pairs)
        if method not in case.refuses
    ]


def model_inputs(inputs):
    return {k: v for k, v in inputs.items() if k != "counts"}


def generate(model, inputs, **kwargs):
    kwargs.setdefault("max_new_tokens", 5)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(**model_inputs(inputs), **kwargs)


def answers(out, inputs, eos=EOS):
    """The new tokens of every row, up to and with its first end-of-sequence token (a row
    that ends early in a batch is padded after it, alone it just stops)."""
    rows = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def greedy_without_cache(model, inputs, steps):
    """Greedy decoding with the (patched) forward over the whole sequence at every step, no
    KV cache. ``generate(use_cache=False)`` cannot check the cache: given ``inputs_embeds``,
    as the patched ``generate`` is, transformers always caches."""
    given = model_inputs(inputs)
    ids, mask = given.pop("input_ids"), given.pop("attention_mask")
    # Inputs that run along the sequence (token types) get text entries for new tokens.
    along = {k for k, v in given.items() if torch.is_tensor(v) and v.shape == ids.shape}
    for _ in range(steps):
        grow = {k: torch.cat([given[k], given[k].new_zeros(ids.shape[0], 1)], 1) for k in along}
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **given)
        scores = out.logits[:, -1].index_fill(1, torch.tensor(SPECIAL), float("-inf"))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(ids.shape[0], 1)], dim=1)
        given.update(grow)
    return ids


def logits(model, inputs):
    with torch.no_grad():
        return model(**model_inputs(inputs)).logits


def test_every_family_has_a_case():
    assert set(CASES) == set(FAMILIES)


@pytest.mark.parametrize(
    ("family", "method", "options"),
    family_methods(
        [
            ("none", {}),
            ("prumerge", {"keep": 1.0}),
            ("visionzip", {"keep": 1.0}),
            ("fastv", {"keep": 1.0}),
            ("dart", {"keep": 1.0}),
            ("pdrop", {"keep": 1.0}),
            ("sparsevlm", {"keep": 1.0, "layers": "0,1"}),
        ]
    ),
)
def test_nothing_removed_matches_the_unpatched_model(family, method, options):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    expected, expected_logits = generate(model, inputs), logits(model, inputs)
    with prumerge.apply(model, method, **options) as handle:
        got, got_logits = generate(model, inputs), logits(model, inputs)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert handle.stats.tokens_out == handle.stats.tokens_in == inputs["counts"]


@pytest.mark.parametrize(
    ("family", "method", "options"),
    family_methods(
        [
            ("prumerge", {}),
            ("prumerge+", {"keep": 0.5}),
            ("visionzip", {"keep": 6}),
            ("fastv", {"keep": 5}),
            ("vispruner", {"keep": 6}),
            ("dart", {"keep": 5}),
            ("pdrop", {"layers": (1, 2)}),
            ("hiprune", {"keep": 6, "alpha": 5 / 6, "object_layer": 1}),
            ("cdpruner", {"keep": 6}),
            ("sparsevlm", {"keep": 0.3, "layers": "0,1"}),
        ]
    ),
)
def test_batched_rows_equal_rows_alone(family, method, options):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, method, **options) as handle:
        batch = generate(model, inputs)
        together = handle.stats.tokens_out
        alone_counts = []
        for i, row in enumerate(ROWS):
            one = build_batch(case, model, [row])
            alone = generate(model, one)
            alone_counts += handle.stats.tokens_out
            assert answers(batch, inputs)[i] == answers(alone, one)[0]
    assert together == alone_counts
    assert all(n < m for n, m in zip(together, inputs["counts"], strict=True))
    assert torch.equal(batch[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@FAMILY
def test_kv_cache_gives_the_same_result_as_no_cache(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    # M-RoPE families always keep their original positions.
    for positions in ["original"] + ([] if FAMILIES[family].mrope else ["compact"]):
        with prumerge.apply(model, "prumerge+", keep=0.3, positions=positions):
            cached = generate(model, inputs, use_cache=True, suppress_tokens=SPECIAL)
            uncached = greedy_without_cache(model, inputs, steps=5)
        assert answers(cached, inputs) == answers(uncached, inputs), positions


@FAMILY
def test_remove_restores_the_model_bit_identically(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    before = logits(model, inputs)
    saved = dict(vars(model))
    handle = prumerge.apply(model, "prumerge", keep=4)
    generate(model, inputs)
    handle.remove()
    assert torch.equal(logits(model, inputs), before)
    assert vars(model).keys() == saved.keys()
    assert "forward" not in vars(model) and "generate" not in vars(model)


@FAMILY
@pytest.mark.parametrize(
    "method",
    [
        "prumerge",
        "prumerge+",
        "visionzip",
        "cls_topk",
        "random",
        "tome",
        "divprune",
        "vispruner",
        "cdpruner",
    ],
)
def test_budgets_are_exact(family, method):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    # 10 of LLaVA's 36: ToMe's two merging layers can halve the tokens twice, to 9 at least.
    with prumerge.apply(model, method, keep=10) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [10, 10, 10]
    with prumerge.apply(model, method, keep=0.25) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [round(0.25 * n) for n in inputs["counts"]]


@pytest.mark.parametrize(
    "family", [f for f, case in CASES.items() if "hiprune" not in case.refuses]
)
def test_hiprune_budgets_are_exact(family):
    # The tiny towers have fewer than the default object layer's 9 layers.
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "hiprune", keep=10, alpha=2.5, object_layer=1) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [10, 10, 10]
    with prumerge.apply(model, "hiprune", keep=0.25, object_layer=1) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [round(0.25 * n) for n in inputs["counts"]]


@FAMILY
def test_the_instruction_reaches_cdpruner(family):
    # Every row's text after its last image, embedded by the LLM, in every reduce call.
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    seen = []
    with prumerge.apply(model, "cdpruner", keep=6) as handle:
        method = handle.adapter.method
        reduce = method.reduce

        def recording(vision_inputs):
            seen.append(vision_inputs.instruction_mask.sum(dim=1).tolist())
            assert vision_inputs.instruction.shape[-1] == vision_inputs.features.shape[-1]
            return reduce(vision_inputs)

        method.reduce = recording
        generate(model, inputs, max_new_tokens=1)
    assert seen and all(n > 0 for counts in seen for n in counts)


@FAMILY
def test_eager_and_sdpa_agree(family):
    case = CASES[family]
    outputs, counts = [], []
    for attn in ("eager", "sdpa"):
        model = case.build(attn, 1)
        inputs = build_batch(case, model, ROWS)
        with prumerge.apply(model, "prumerge") as handle:
            outputs.append(generate(model, inputs))
            counts.append(handle.stats.tokens_out)
    assert torch.equal(outputs[0], outputs[1])
    assert counts[0] == counts[1]


@FAMILY
def test_several_images_per_prompt(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, MULTI)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        batch = generate(model, inputs)
        assert handle.stats.tokens_out == [5, 5, 5]
        one = build_batch(case, model, MULTI[:1])
        alone = generate(model, one)
    assert answers(batch, inputs)[0] == answers(alone, one)[0]


@FAMILY
def test_images_with_different_kept_counts_share_a_batch(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, MULTI)  # row 0 holds two images
    # A ratio of images of different sizes, or PruMerge+'s adaptive count where they all
    # have one size: the images keep different numbers of tokens.
    for options in ({"keep": 0.5}, {}):
        with prumerge.apply(model, "prumerge+", **options) as handle:
            batch = generate(model, inputs)
            counts = handle.stats.tokens_out
            rows = [build_batch(case, model, [row]) for row in MULTI]
            alone = [answers(generate(model, one), one)[0] for one in rows]
        if len(set(counts)) > 1:
            break
    assert len(set(counts)) > 1, counts
    assert answers(batch, inputs) == alone


@FAMILY
def test_unsupported_settings_give_one_line_errors(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    with pytest.raises(PrumergeError) as info:
        prumerge.apply(model, "prumerge", positions="shifted")
    assert "positions must be one of 'compact', 'original'" in str(info.value)
    if family.startswith("qwen"):
        with pytest.raises(
            PrumergeError, match="needs a \\[CLS\\] token and Qwen[23](.5)?-VL has none"
        ):
            prumerge.apply(model, "prumerge", importance="cls")
        with pytest.raises(PrumergeError, match="positions='original'"):
            prumerge.apply(model, "prumerge", positions="compact")
        inputs = build_batch(case, model, ROWS)
        with (
            prumerge.apply(model, "prumerge"),
            pytest.raises(PrumergeError, match="pixel_values_videos is not reduced"),
        ):
            model(**model_inputs(inputs), pixel_values_videos=torch.zeros(1))
    for error in (info.value,):
        assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("family", "method"),
    [(family, method) for family, case in CASES.items() for method in case.refuses],
)
def test_refused_methods_give_one_line_errors(family, method):
    model = CASES[family].build("sdpa", 0)
    with pytest.raises(PrumergeError, match=CASES[family].refuses[method]) as info:
        prumerge.apply(model, method, keep=4)
    assert "\n" not in str(info.value) and str(info.value).startswith(method)
