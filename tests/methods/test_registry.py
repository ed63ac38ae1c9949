"""Properties every registered method must have; a new method is tested by registering it."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prumerge.methods import METHODS, VisionInputs, build_method, method_names
from prumerge.ops import budget_count, pooled_grid

NAMES = method_names()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def takes(name: str, option: str) -> bool:
    return option in inspect.signature(METHODS[name].__init__).parameters


def build(name: str, keep=None, **options):
    """The method with a fixed budget where it takes one (prumerge's default is adaptive)."""
    if keep is not None and takes(name, "keep"):
        options["keep"] = keep
    return build_method(name, **options)


def make_inputs(batch=3, side=8, width=16, key_width=8, seed=0, peak=4.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    features = torch.randn(batch, n, width, generator=gen)
    keys = torch.randn(batch, n, key_width, generator=gen)
    attn = (torch.randn(batch, n, generator=gen) * peak).softmax(dim=-1)
    # A second layer's importance, for methods that read two (HiPrune's object layer).
    second = (torch.randn(batch, n, generator=gen) * peak).softmax(dim=-1)
    return VisionInputs(
        features=features.to(dtype),
        keys=keys.to(dtype),
        cls_attn=attn.to(dtype),
        grid=(side, side),
        object_importance=second.to(dtype),
    )


def expected_length(name: str, keep, num: int, side: int) -> int:
    # Methods that prune inside the LLM (FastV) hand all N tokens on from the vision side, and
    # downsample's tower already ran on the smaller image: reduce() keeps what it gets.
    cls = METHODS[name]
    if not takes(name, "keep") or cls.side == "llm" or getattr(cls, "resizes_input", False):
        return num
    budget = budget_count(keep, num)
    if name == "pool" and budget < num:
        rows, cols = pooled_grid(side, side, budget)
        return rows * cols
    return budget


def row(inputs: VisionInputs, b: int) -> VisionInputs:
    pick = slice(b, b + 1)
    return VisionInputs(
        features=inputs.features[pick],
        keys=None if inputs.keys is None else inputs.keys[pick],
        cls_attn=None if inputs.cls_attn is None else inputs.cls_attn[pick],
        grid=inputs.grid,
        object_importance=None
        if inputs.object_importance is None
        else inputs.object_importance[pick],
    )


def check_invariants(result, inputs: VisionInputs) -> None:
    batch, num, width = inputs.features.shape
    lengths = result.lengths
    assert result.tokens.shape[:2] == result.index.shape
    assert result.tokens.shape[2] == width
    assert result.assignment.shape == result.attention_selected.shape == (batch, num)
    assert int(lengths.max()) == result.tokens.shape[1]
    # Padding is zeros and index -1.
    padding = ~result.valid_mask
    assert (result.tokens[padding] == 0).all()
    assert (result.index[padding] == -1).all()
    # Every patch is represented by a valid slot; a kept patch by its own.
    assert (result.assignment >= 0).all()
    assert (result.assignment < lengths[:, None]).all()
    slots = result.index.gather(1, result.assignment)
    positions = torch.arange(num).expand(batch, num)
    assert torch.equal(slots == positions, result.kept_mask)
    # Kept patches come in raster order, each at most once, before any index -1 token.
    for index, length in zip(result.index, lengths.tolist(), strict=True):
        patches = index[:length]
        kept = patches[patches >= 0]
        assert (kept[1:] > kept[:-1]).all()
        if (patches < 0).any():
            first_free = int((patches < 0).nonzero()[0])
            assert (patches[first_free:] < 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("keep", [16, 0.25, 10, 1])
def test_output_count_matches_budget(name, keep):
    inputs = make_inputs()
    result = build(name, keep).reduce(inputs)
    assert result.lengths.tolist() == [expected_length(name, keep, 64, 8)] * 3
    check_invariants(result, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name):
    @settings(max_examples=12, deadline=None)
    @given(
        seed=st.integers(0, 10_000),
        batch=st.integers(2, 4),
        side=st.integers(2, 7),
        keep=st.one_of(st.integers(1, 60), st.floats(0.02, 1.0)),
        peak=st.sampled_from([0.0, 1.0, 6.0]),
    )
    def check(seed, batch, side, keep, peak):
        inputs = make_inputs(batch, side, seed=seed, peak=peak)
        method = build(name, keep)
        together = method.reduce(inputs)
        check_invariants(together, inputs)
        for b in range(batch):
            alone = method.reduce(row(inputs, b))
            length = int(alone.lengths[0])
            assert int(together.lengths[b]) == length
            assert torch.equal(together.index[b, :length], alone.index[0, :length])
            assert torch.equal(together.assignment[b], alone.assignment[0])
            torch.testing.assert_close(
                together.tokens[b, :length], alone.tokens[0, :length], rtol=1e-5, atol=1e-6
            )

    check()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_preserved(name, dtype, device):
    inputs = make_inputs(dtype=dtype)
    inputs = VisionInputs(
        features=inputs.features.to(device),
        keys=inputs.keys.to(device),
        cls_attn=inputs.cls_attn.to(device),
        grid=inputs.grid,
        object_importance=inputs.object_importance.to(device),
    )
    result = build(name, 16).reduce(inputs)
    assert result.tokens.dtype == dtype
    for tensor in (result.tokens, result.lengths, result.index, result.assignment):
        assert tensor.device.type == device
    assert torch.isfinite(result.tokens.float()).all()
    # Same selection as at float32 on the same (rounded) values.
    exact = VisionInputs(
        features=inputs.features.float(),
        keys=inputs.keys.float(),
        cls_attn=inputs.cls_attn.float(),
        grid=inputs.grid,
        object_importance=inputs.object_importance.float(),
    )
    assert torch.equal(result.index, build(name, 16).reduce(exact).index)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    inputs = make_inputs(peak=0.0)  # flat attention: every selection is a tie
    options = {"seed": 7} if takes(name, "seed") else {}
    first = build(name, 12, **options).reduce(inputs)
    again = build(name, 12, **options).reduce(inputs)
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.index, again.index)
    assert torch.equal(first.assignment, again.assignment)


def test_random_seed_changes_the_sample():
    inputs = make_inputs()
    a = build_method("random", keep=12, seed=1).reduce(inputs)
    b = build_method("random", keep=12, seed=2).reduce(inputs)
    assert not torch.equal(a.index, b.index)


@pytest.mark.parametrize("name", NAMES)
def test_budget_at_least_n_returns_all_tokens_unchanged(name):
    inputs = make_inputs(side=5)
    for keep in (25, 1000, 1.0):
        result = build(name, keep).reduce(inputs)
        assert torch.equal(result.tokens, inputs.features)
        assert result.index.tolist() == [list(range(25))] * 3
        assert result.assignment.tolist() == [list(range(25))] * 3


@pytest.mark.parametrize("name", NAMES)
def test_methods_without_attention_need_no_keys(name):
    method = build(name, 16)
    inputs = make_inputs()
    if method.needs_attention:
        return
    bare = VisionInputs(features=inputs.features, grid=inputs.grid)
    assert torch.equal(method.reduce(bare).tokens, method.reduce(inputs).tokens)


@pytest.mark.parametrize("name", ["cls_topk", "visionzip", "tome"])
def test_missing_attention_raises_value_error(name):
    inputs = make_inputs()
    with pytest.raises(ValueError, match="needs the"):
        build(name, 16).reduce(VisionInputs(features=inputs.features, grid=inputs.grid))


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_and_describe_budget(name):
    method = build(name, 16)
    again = build_method(name, **method.options())
    assert again.options() == method.options()
    assert method.name == name
    assert isinstance(method.describe_budget(), str) and method.describe_budget()
    with pytest.raises(ValueError, match="does not take"):
        build_method(name, no_such_option=1)


@pytest.mark.parametrize("name", [n for n in NAMES if takes(n, "keep")])
@pytest.mark.parametrize("keep", [0, -3, 1.5, 0.0, True, "64"])
def test_bad_budget_raises_value_error_at_build_time(name, keep):
    # Every constructor checks its options, so a command fails before any model loads.
    with pytest.raises(ValueError, match="keep"):
        build_method(name, keep=keep)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("prumerge", {"merge": "maybe"}, "merge must be one of 'sum', 'mean', 'none'; got 'maybe'"),
        ("prumerge", {"knn": -3}, "knn must be >= 0; got -3"),
        ("prumerge", {"knn": "abc"}, "knn must be an int; got 'abc'"),
        ("prumerge", {"min_keep": 0}, "min_keep must be >= 1; got 0"),
        ("prumerge+", {"supplement": "yes"}, "supplement must be true or false"),
        ("prumerge+", {"whisker": "wide"}, "whisker must be a number"),
        ("prumerge", {"order": "random"}, "order must be one of"),
        ("prumerge", {"attention": "single"}, "attention must be one of"),
        ("prumerge", {"importance": "max"}, "importance must be one of 'auto', 'cls', 'mean'"),
        ("prumerge", {"importance": "mean", "attention": "reference"}, "cannot be combined"),
        ("visionzip", {"importance": "patch"}, "importance must be one of"),
        ("cls_topk", {"importance": 1}, "importance must be one of"),
        ("fastv", {"layer": 0}, "layer must be >= 1; got 0"),
        ("fastv", {"keep": None}, "no adaptive mode"),
        ("tome", {"r": "2"}, "r must be an int"),
        ("random", {"seed": 2**32}, "seed must be >= 0 and <= 4294967295"),
    ],
)
def test_bad_options_raise_one_line_value_errors(name, options, message):
    with pytest.raises(ValueError, match=message) as info:
        build_method(name, **options)
    assert "\n" not in str(info.value)


def test_merge_none_is_accepted_as_a_string_or_as_none():
    # A command line's merge=none may arrive as the string or as None.
    assert build_method("prumerge", merge="none").merge == "none"
    assert build_method("prumerge", merge=None).merge == "none"


def test_prumerge_plus_describes_its_own_budget():
    plain, plus = build_method("prumerge"), build_method("prumerge+")
    assert plain.describe_budget() != plus.describe_budget()
    assert "spatial samples (every s-th patch in raster order)" in plus.describe_budget()
    assert "(grid)" in build_method("prumerge+", spatial="grid").describe_budget()
    assert "1 : 3" in build_method("prumerge+", keep=64).describe_budget()


def test_adapter_budget_overrides_keep():
    inputs = make_inputs()
    inputs.budget = 5
    for name in NAMES:
        cls = METHODS[name]
        if not takes(name, "keep") or cls.side == "llm" or getattr(cls, "resizes_input", False):
            continue
        expected = 4 if name == "pool" else 5  # pool: the largest grid within 5 cells is 2x2
        assert build(name, 40).reduce(inputs).lengths.tolist() == [expected] * 3, name


def test_zoo_options():
    assert build_method("visionzip").options() == {
        "keep": 64,
        "contextual": 10 / 64,
        "importance": "auto",
        "contextual_merge": "target_plus_mean",
        "metric": "key_mean",
        "cls_token": True,
    }
    assert build_method("tome", r=4).options() == {
        "keep": 64,
        "r": 4,
        "where": "auto",
        "metric": "key_mean",
        "order": "raster",
        "proportional_attention": True,
    }
    with pytest.raises(ValueError, match="round size"):
        build_method("tome", r=4, where="tower")
    assert build_method("random", seed=3).options() == {"keep": 64, "seed": 3}
    with pytest.raises(ValueError, match="seed"):
        build_method("random", seed=-1)
    with pytest.raises(ValueError, match="r must be"):
        build_method("tome", r=0)
    with pytest.raises(ValueError, match="contextual"):
        build_method("visionzip", contextual=2.0)
    needs = {name: METHODS[name].needs_attention for name in NAMES}
    assert needs["random"] is needs["pool"] is needs["divprune"] is needs["none"] is False
    assert needs["cls_topk"] and needs["visionzip"] and needs["tome"]
