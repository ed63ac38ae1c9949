"""SparseVLM against the release transcription (sparsevlm_release.py) on a tiny random LLaVA:
the same prompt positions reach the last layer, with the same final hidden states (logits);
each row of a batch against the release run alone; v1 with its recycling of dropped tokens
(the default, as the release's without ``USE_VERSION``), v1 without it, and SparseVLM+
(``USE_VERSION=2_0``). The keep tables are the release's at N = 576."""

import pytest
import torch

import prumerge
from prumerge.methods.sparsevlm import release_counts

from .harness import IMAGE_TOKEN, NUM_PATCHES, images, release_llava
from .sparsevlm_release import sparsevlm_release

BEFORE, AFTER = [1, 5, 9], [4, 6, 7, 3, 8, 2, 11, 12]


def _prompts(batch):
    rows = [
        [b + t for t in BEFORE] + [IMAGE_TOKEN] * NUM_PATCHES + [b + t for t in AFTER]
        for b in range(batch)
    ]
    return torch.tensor(rows)


def test_release_tables_at_576_tokens():
    assert release_counts("v2", 192, 576) == [300, 200, 118]
    assert release_counts("v2", 64, 576) == [66, 34, 20]
    assert release_counts("v1", 128, 576) == [303, 110, 36]
    assert release_counts("v1", 96, 576) == [238, 48, 26]


@pytest.mark.parametrize(
    ("version", "keep", "recycle"),
    [
        ("v2", 0.25, None),
        ("v1", 0.4, None),
        ("v1", 0.25, None),
        ("v1", 0.4, False),
        ("v2", 30, None),
    ],
)
@pytest.mark.parametrize("batch", [1, 4])
def test_default_equals_the_release_model_level(batch, version, keep, recycle):
    model = release_llava(text_layers=4)
    model.set_attn_implementation("sdpa")
    ids, pixels = _prompts(batch), images(batch)
    language_model = model.model.language_model
    # Pruning after layers 0, 1, 2 of the tiny decoder's 4 (the release: 2, 6, 15 of 32);
    # 2 of its 4 heads (the release: 14 of 28).
    options = {"keep": keep, "layers": (0, 1, 2), "version": version, "heads": 2}
    options["recycle"] = recycle
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixels).pooler_output
        embeds[ids == IMAGE_TOKEN] = torch.cat(list(features)).to(embeds)
        with prumerge.apply(model, "sparsevlm", **options) as handle:
            handle.fastv.disarm = lambda: None  # keep the call's state for inspection
            logits = model(input_ids=ids, pixel_values=pixels).logits
            dropped = handle.fastv.call.dropped
        stages = handle.method.stages(NUM_PATCHES)
        counts = [ranked for _, ranked, _ in stages]  # kept by rank (+ recycled clusters)
        assert handle.stats.tokens_out == [sum(stages[-1][1:])] * batch
        recycles = version == "v1" and recycle is not False
        assert recycles == all(added > 0 for _, _, added in stages)
        for row in range(batch):
            hidden, kept = sparsevlm_release(
                language_model,
                embeds[row],
                image_start=len(BEFORE),
                image_length=NUM_PATCHES,
                pruning_loc=[0, 1, 2],
                counts=counts,
                version=version,
                heads=2,
                recycle=recycles,
            )
            if recycles:  # cluster tokens sit in the slots after the kept ones
                assert int((~dropped[row]).sum()) == len(kept)
            else:
                assert (~dropped[row]).nonzero().flatten().tolist() == kept
            torch.testing.assert_close(logits[row], model.lm_head(hidden), rtol=1e-4, atol=1e-4)


def test_v1_release_counts_with_recycling_at_576_tokens():
    from prumerge.methods import build_method

    method = build_method("sparsevlm", keep=192)  # v1, recycling, as the release's default
    assert (method.version, method.recycles) == ("v1", True)
    stages = method.stages(576)
    assert [ranked + added for _, ranked, added in stages] == [309, 204, 113]  # the release's
    assert [n for _, n in method.schedule(576)] == [309, 204, 113]
    assert build_method("sparsevlm", keep=192, version="v2").stages(576) == [
        (3, 300, 0),
        (7, 200, 0),
        (16, 118, 0),
    ]
    with pytest.raises(ValueError, match="recycle=True needs version='v1'"):
        build_method("sparsevlm", version="v2", recycle=True)
