"""The serving configuration: validation, hf_overrides, and the fixed count K per image."""

from __future__ import annotations

import json

import pytest
import torch

from prumerge.errors import PrumergeError
from prumerge.methods import VisionInputs, build_method, method_names
from prumerge.serve import ARCHITECTURE, hf_overrides, output_count, parse_serve_config
from prumerge.serve.config import is_adaptive

# Every vision-side method at a fixed budget (the registry minus FastV, which prunes inside
# the LLM); a new registered method must be added here or to UNSERVABLE.
SERVABLE = {
    "none": {},
    "prumerge": {"keep": 64},
    "prumerge+": {"keep": 64},
    "visionzip": {"keep": 64},
    "cls_topk": {"keep": 64},
    "vispruner": {"keep": 64},
    "pool": {"keep": 64},
    "random": {"keep": 64},
    # ToMe merges inside the tower by default; the plugin merges after it.
    "tome": {"keep": 64, "where": "after"},
    # The plugin reduces before its projector runs: DivPrune on the tower's features.
    "divprune": {"keep": 64, "space": "tower"},
}
UNSERVABLE = {"fastv", "dart", "pdrop", "sparsevlm", "downsample", "hiprune", "cdpruner"}


def test_every_registered_method_is_classified():
    assert set(method_names()) == set(SERVABLE) | UNSERVABLE


def test_hf_overrides_select_the_plugin_and_carry_the_config():
    overrides = hf_overrides("prumerge+", keep=64)
    assert overrides == {
        "architectures": [ARCHITECTURE],
        "prumerge": {"method": "prumerge+", "keep": 64},
    }
    json.dumps(overrides)  # what `vllm serve --hf-overrides` takes


def test_parse_accepts_json_text():
    config = parse_serve_config('{"method": "pool", "keep": 0.25}')
    assert config.method == "pool" and config.options == {"keep": 0.25}
    assert config.build().keep == 0.25


def test_text_values_are_typed_as_on_the_command_line():
    # One parser (prumerge.methods.spec) for the CLI, the API, lmms-eval and serving: "64" is a
    # count, "1.0" a ratio of all the patches, and a string option keeps its string.
    count = parse_serve_config({"method": "prumerge+", "keep": "64", "merge": "none"})
    assert count.options == {"keep": 64, "merge": "none"}
    ratio = parse_serve_config({"method": "pool", "keep": "1.0"})
    assert ratio.options == {"keep": 1.0} and isinstance(ratio.options["keep"], float)
    assert parse_serve_config({"method": "pool", "keep": "1"}).options == {"keep": 1}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "prumerge+", "keep": 64, "knn": "abc"}, "knn takes an integer"),
        ({"method": "prumerge+", "keep": 64, "min_keep": 0}, "min_keep must be >= 1"),
        ({"method": "fastv", "keep": 64}, "inside the language model"),
        ({"method": "downsample", "keep": 64}, "resized image"),
        ({"method": "divprune", "keep": 64}, "projector's outputs"),
        ({"method": "tome", "keep": 64}, "inside the vision tower"),
        ({"method": "nope", "keep": 64}, "unknown method"),
        ({"method": "pool", "keep": 64, "knn": 3}, "does not take option"),
        ({"method": "pool", "keep": -1}, "keep"),
        ({"keep": 64}, "must be a dict with a 'method'"),
        ("[1, 2", "not valid JSON"),
        (["prumerge"], "must be a dict"),
    ],
)
def test_parse_rejects_bad_configs_with_a_reason(value, message):
    with pytest.raises(PrumergeError, match=message):
        parse_serve_config(value)


@pytest.mark.parametrize(("num", "grid"), [(256, (16, 16)), (576, (24, 24)), (192, (12, 16))])
@pytest.mark.parametrize("name", sorted(SERVABLE))
def test_output_count_is_what_the_method_keeps_on_any_image(name, num, grid):
    method = build_method(name, **SERVABLE[name])
    count = output_count(method, num, grid)
    # Images unlike output_count's made-up ones: flat attention, and a sharply peaked one.
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, num, 16, generator=generator) * 5
    inputs = VisionInputs(features=features, grid=grid)
    if method.needs_attention:
        inputs.keys = torch.randn(2, num, 16, generator=generator)
        logits = torch.zeros(2, num)
        logits[1, :3] = 30.0
        inputs.cls_attn = logits.softmax(dim=-1)
    assert method.reduce(inputs).lengths.tolist() == [count, count]
    assert count == (num if name == "none" else 64)


def test_output_count_of_a_budget_that_pooling_cannot_meet():
    # 32 cells do not tile a 24 x 24 grid; the pooled grid that fits is 5 x 6 = 30.
    assert output_count(build_method("pool", keep=32), 576, (24, 24)) == 30


def test_a_two_layer_method_is_refused_in_one_line():
    with pytest.raises(PrumergeError, match="two vision-tower layers") as info:
        parse_serve_config({"method": "hiprune", "keep": 64})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        {"method": "prumerge"},
        {"method": "prumerge+", "keep": None},
        {"method": "prumerge", "keep": "adaptive"},
        '{"method": "prumerge+", "keep": "adaptive"}',
    ],
)
def test_an_adaptive_budget_is_served(value):
    config = parse_serve_config(value)
    assert is_adaptive(config)
    assert config.build().options()["keep"] is None
    assert hf_overrides(config.method, **config.options)["prumerge"] == config.as_dict()


@pytest.mark.parametrize(
    "value", [{"method": "prumerge", "keep": 32}, {"method": "visionzip"}, {"method": "none"}]
)
def test_a_fixed_budget_is_not_adaptive(value):
    assert not is_adaptive(parse_serve_config(value))


def test_output_count_refuses_an_adaptive_method():
    with pytest.raises(PrumergeError, match="different number of tokens"):
        output_count(build_method("prumerge"), 256, (16, 16))


def test_the_plugin_is_declared_for_vllm():
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("prumerge") == "prumerge.serve.vllm:register"


@pytest.mark.parametrize(
    "value",
    [
        {"method": "divprune", "keep": 8},
        {"method": "tome", "keep": 8},
        {"method": "prumerge"},
    ],
)
def test_a_family_that_reduces_projected_tokens_serves_their_defaults(value):
    """Qwen2.5-VL's merger is its projector: selection on its outputs and ToMe's default
    (merging after the tower there) are served, refused for LLaVA."""
    assert parse_serve_config(value, projected=True).method == value["method"]
    if value["method"] != "prumerge":
        with pytest.raises(PrumergeError):
            parse_serve_config(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "cdpruner", "keep": 8}, "reads the prompt's instruction"),
        ({"method": "downsample", "keep": 8}, "resized image"),
        ({"method": "tome", "keep": 8, "where": "tower"}, "where='tower'"),
        ({"method": "fastv", "keep": 8}, "inside the language model"),
    ],
)
def test_what_a_projected_family_cannot_serve_is_refused_in_one_line(value, message):
    with pytest.raises(PrumergeError, match=message) as error:
        parse_serve_config(value, projected=True)
    assert "\n" not in str(error.value)
