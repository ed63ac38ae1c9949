"""Measured speed of visual-token reduction, beside the cost model's prediction.

The logic of ``prumerge bench``: every configuration (a method at a budget, and the ``none``
baseline) runs the same batches of (image, question) pairs through ``generate`` with a fixed
number of new tokens. Configurations are timed round-robin, the starting one rotating each
round, after warm-up rounds, so drift on a shared machine hits all of them alike. Each round
gives one sample per configuration (the mean over its batches); the report gives the median
and the min-max over rounds, and speedups as the median of the per-round paired ratios
against ``none``.

The prediction uses ``prumerge.cost`` on the model's own decoder config, for the same prompt
shapes as measured: each batch's padded prompt length with the full visual tokens and with
the reduced ones.

- ``configs``: the configurations to time (``parse_configs``);
- ``measure``: batches, the round-robin timing and peak memory (``make_batches``, ``measure``);
- ``predict``: the cost model's prediction for the same prompt shapes (``predict``);
- ``report``: the JSON-ready rows, the text tables and the plot (``summarise``,
  ``format_report``, ``save_plot``).
"""

from prumerge.bench.configs import parse_configs
from prumerge.bench.measure import Batch, MemoryMeter, Observed, Sample, make_batches, measure
from prumerge.bench.predict import (
    Prediction,
    decoder_spec,
    hardware_for,
    model_attention,
    model_precision,
    predict,
)
from prumerge.bench.report import format_report, save_plot, summarise, to_json

__all__ = [
    "Batch",
    "MemoryMeter",
    "Observed",
    "Prediction",
    "Sample",
    "decoder_spec",
    "format_report",
    "hardware_for",
    "make_batches",
    "measure",
    "model_attention",
    "model_precision",
    "parse_configs",
    "predict",
    "save_plot",
    "summarise",
    "to_json",
]
