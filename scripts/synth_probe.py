"""Where does the default model lose synth's cell questions: in its image features or in reading them?

Synth's colour and shape questions name a cell of the 3×3 grid ("What color is the object in the
top left of the image?"). The shipped default answers about a third of them with all tokens.
This script fits linear probes, on generated training scenes, that read an object's colour and
shape from the mean of the patch tokens in its cell, and scores them on test scenes:

- on the vision tower's output (the projector's input), and
- on the projector's output (the language model's visual tokens).

High probe accuracy with a low model score means the features hold the answer and the language
model has not learned to find the named cell.

With ``--predictions``, it reads an evaluation's answers instead (the ``predictions.jsonl`` of a
``prumerge eval --benchmark synth`` configuration) and says, for the colour and shape questions,
how many wrong answers name another object of the same scene, and what naming a random object of
the scene would score.

Usage: python scripts/synth_probe.py [--train-scenes 600] [--test-scenes 300] [--variant default]
       python scripts/synth_probe.py --predictions results/RUN/none/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prumerge.data.synth import COLORS, SHAPES, SynthConfig, generate, generate_scene


def cell_patch_index(grid: int, cells: int = 3) -> list[list[int]]:
    """Flat patch indices of each cell, row-major over cells and patches.

    A patch belongs to the cell that holds its centre, so the cells partition the grid.

    Args:
        grid: patches per side (16 for 224 px and 14 px patches).
        cells: cells per side.

    Returns:
        ``cells * cells`` lists of indices into the ``grid * grid`` patches.
    """
    band = [min((2 * p + 1) * cells // (2 * grid), cells - 1) for p in range(grid)]
    index: list[list[int]] = [[] for _ in range(cells * cells)]
    for row in range(grid):
        for col in range(grid):
            index[band[row] * cells + band[col]].append(row * grid + col)
    return index


def features(model, processor, scenes, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision tower output and projector output of each scene's patches: two (S, N, C) tensors."""
    cfg = model.config
    tower, projected = [], []
    for start in range(0, len(scenes), batch):
        images = [scene.image for scene in scenes[start : start + batch]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.model.vision_tower(pixels, output_hidden_states=True)
            hidden = out.hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                hidden = hidden[:, 1:]  # drop [CLS]
            tower.append(hidden.float())
            projected.append(model.model.multi_modal_projector(hidden).float())
    return torch.cat(tower), torch.cat(projected)


def pooled_objects(feats: torch.Tensor, scenes, cell_index) -> tuple[torch.Tensor, ...]:
    """One row per coloured shape: its cell's mean feature, its colour label, its shape label."""
    rows, colours, shapes = [], [], []
    for scene_feats, scene in zip(feats, scenes, strict=True):
        for obj in scene.objects:
            if obj.shape is None or obj.color is None:  # photo patches have neither
                continue
            row, col = obj.cell
            rows.append(scene_feats[cell_index[row * 3 + col]].mean(0))
            colours.append(list(COLORS).index(obj.color))
            shapes.append(SHAPES.index(obj.shape))
    return torch.stack(rows), torch.tensor(colours), torch.tensor(shapes)


def probe_accuracy(x_train, y_train, x_test, y_test, classes: int, steps: int = 500) -> float:
    """Test accuracy (%) of a softmax regression fitted on standardised features."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(x_test).argmax(1) == y_test).float().mean().item() * 100


def answer_errors(records, scenes) -> dict[str, dict[str, float]]:
    """How colour and shape answers go wrong.

    Args:
        records: an evaluation's prediction records, ``dict`` s with ``subtask``, ``prediction``,
            ``answers`` and ``meta`` (``scene`` and ``cell``); other subtasks are skipped.
        scenes: the scenes named by ``meta["scene"]``, by id.

    Returns:
        Per subtask (``color``, ``shape``): ``n``, ``right``, ``wrong``, ``wrong_in_scene`` (wrong
        answers that are the attribute of another object in the scene) and ``random_object`` (the
        expected score, in %, of naming the attribute of a random object of the scene).
    """
    out: dict[str, dict[str, float]] = {}
    for record in records:
        subtask = record["subtask"]
        if subtask not in ("color", "shape"):
            continue
        scene = scenes[record["meta"]["scene"]]
        cell = tuple(record["meta"]["cell"])
        truth = record["answers"][0]
        if [getattr(obj, subtask) for obj in scene.objects if obj.cell == cell] != [truth]:
            raise ValueError(f"{record['id']}: the answer is not the object in cell {cell}")
        values = [getattr(obj, subtask) for obj in scene.objects if getattr(obj, subtask)]
        others = {getattr(obj, subtask) for obj in scene.objects if obj.cell != cell}
        others -= {truth, None}
        prediction = record["prediction"].strip().lower()
        row = out.setdefault(
            subtask, {"n": 0, "right": 0, "wrong": 0, "wrong_in_scene": 0, "random_object": 0.0}
        )
        row["n"] += 1
        row["right"] += prediction == truth
        row["wrong"] += prediction != truth
        row["wrong_in_scene"] += prediction in others
        row["random_object"] += 100 * values.count(truth) / len(values)
    for row in out.values():
        row["random_object"] /= row["n"]
    return out


def report_answers(path: Path) -> None:
    """Print :func:`answer_errors` for one ``predictions.jsonl``."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise SystemExit(f"synth_probe: cannot read {path}: {error}") from None
    records = [
        r for r in records if r.get("task") == "synth" and r.get("subtask") in ("color", "shape")
    ]
    if not records:
        raise SystemExit(f"synth_probe: {path} has no synth colour or shape answers")
    scenes = {}
    for record in records:
        scene_id = record["meta"]["scene"]
        if scene_id not in scenes:
            split, index = scene_id.split("-")[1:]
            scenes[scene_id] = generate_scene(int(index), split=split)
    try:
        table = answer_errors(records, scenes)
    except ValueError as error:  # answers of scenes drawn with another seed or config
        raise SystemExit(f"synth_probe: {error}") from None
    print(f"{path}: colour and shape questions")
    print("subtask | right  | wrong | wrong, naming another object of the scene | a random object")
    for subtask, row in table.items():
        print(
            f"{subtask:7s} | {row['right']:.0f}/{row['n']:<4.0f}| {row['wrong']:5.0f} | "
            f"{row['wrong_in_scene']:41.0f} | {row['random_object']:.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-scenes", type=int, default=600)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--variant", default="default", choices=("default", "base"))
    parser.add_argument("--predictions", type=Path, help="analyse these synth answers instead")
    args = parser.parse_args()
    if args.predictions is not None:
        report_answers(args.predictions)
        return

    from prumerge.models import load_default_model  # only the probes need the model

    start = time.perf_counter()
    model, processor = load_default_model(variant=args.variant)
    size = processor.image_processor.crop_size["height"]
    grid = size // model.config.vision_config.patch_size
    cell_index = cell_patch_index(grid)
    config = SynthConfig(size=size)
    train = generate(args.train_scenes, split="train", config=config)
    test = generate(args.test_scenes, split="test", config=config)
    results = {}
    for name, train_feats, test_feats in zip(
        ("vision tower output", "projector output"),
        features(model, processor, train),
        features(model, processor, test),
        strict=True,
    ):
        x_tr, colour_tr, shape_tr = pooled_objects(train_feats, train, cell_index)
        x_te, colour_te, shape_te = pooled_objects(test_feats, test, cell_index)
        results[name] = (
            probe_accuracy(x_tr, colour_tr, x_te, colour_te, len(COLORS)),
            probe_accuracy(x_tr, shape_tr, x_te, shape_te, len(SHAPES)),
        )
    print(
        f"{args.variant} model; {len(x_tr)} objects in {len(train)} train scenes, "
        f"{len(x_te)} in {len(test)} test scenes; {time.perf_counter() - start:.0f} s"
    )
    print("linear probe on the cell's mean patch token | colour % | shape %")
    for name, (colour, shape) in results.items():
        print(f"{name:43s} | {colour:8.1f} | {shape:7.1f}")


if __name__ == "__main__":
    main()
