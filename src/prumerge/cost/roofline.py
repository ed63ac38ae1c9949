"""The roofline itself: operators, bit widths, and how an operator's time is found.

Conventions follow LLM-Viewer (hahnyuan/LLM-Viewer, ``model_analyzer.py`` and
``roofline_model.py``; Yuan et al., "LLM Inference Unveiled: Survey and Roofline Model
Insights", arXiv 2402.16363):

- An operator is described by its OPs (a multiply-add counts as 2) and five memory terms in
  bytes: load_weight, load_act, store_act, load_kv, store_kv.
- memory_access = load_weight + load_act + store_act + load_kv + store_kv.
- arithmetic intensity I = OPs / memory_access (ops/byte).
- The ridge point is peak / bandwidth. Below it the operator is memory-bound and runs at
  I * bandwidth; at or above it, compute-bound at the peak.
- time = OPs / performance, i.e. max(OPs / peak, memory_access / bandwidth).
- Operator results are summed over one layer and multiplied by the number of layers; the
  operators outside the layer stack (lm_head) are added once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from prumerge.cost.hardware import Hardware
from prumerge.errors import PrumergeError

Bound = Literal["memory", "compute", "none"]

# The quantities that are summed into stage totals (LLM-Viewer's ALL_DATA_NAMES, renamed).
TOTAL_FIELDS: tuple[str, ...] = (
    "ops",
    "memory_access",
    "load_weight",
    "load_act",
    "store_act",
    "load_kv",
    "store_kv",
    "time",
)


@dataclass(frozen=True)
class Precision:
    """Bit widths of weights, activations and the KV cache.

    Attributes:
        w_bits: Weight bits (16 = FP16, 8 = INT8, 4 = INT4, ...).
        a_bits: Activation bits.
        kv_bits: KV-cache bits; None means the same as ``a_bits`` (LLM-Viewer's default).
    """

    w_bits: float = 16
    a_bits: float = 16
    kv_bits: float | None = None

    def __post_init__(self) -> None:
        for label, bits in (("weight", self.w_bits), ("activation", self.a_bits)):
            if not 0 < bits <= 32:
                raise PrumergeError(f"{label} bit width must be in (0, 32], got {bits}")
        if self.kv_bits is not None and not 0 < self.kv_bits <= 32:
            raise PrumergeError(f"KV-cache bit width must be in (0, 32], got {self.kv_bits}")

    @property
    def kv(self) -> float:
        """KV-cache bits, resolved."""
        return self.a_bits if self.kv_bits is None else self.kv_bits

    @property
    def w_byte(self) -> float:
        return self.w_bits / 8

    @property
    def a_byte(self) -> float:
        return self.a_bits / 8

    @property
    def kv_byte(self) -> float:
        return self.kv / 8

    def label(self) -> str:
        """Short label such as ``W16A16KV16``."""
        return f"W{self.w_bits:g}A{self.a_bits:g}KV{self.kv:g}"


@dataclass(frozen=True)
class Op:
    """One operator's work and memory traffic (bytes).

    Attributes:
        name: Operator name, LLM-Viewer's where it has one (q_proj, qk_matmul, ...).
        ops: Arithmetic operations.
        load_weight: Bytes of weights read.
        load_act: Bytes of activations read.
        store_act: Bytes of activations written.
        load_kv: Bytes of KV cache read.
        store_kv: Bytes of KV cache written.
    """

    name: str
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0

    @property
    def memory_access(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv


@dataclass(frozen=True)
class OpResult:
    """An operator placed on the roofline of one device."""

    op: Op
    arithmetic_intensity: float
    performance: float
    bound: Bound
    time: float

    def get(self, name: str) -> float:
        """A summable quantity by name (one of TOTAL_FIELDS)."""
        if name == "time":
            return self.time
        if name == "memory_access":
            return self.op.memory_access
        value: float = getattr(self.op, name)
        return value

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.op.name}
        out.update({k: self.get(k) for k in TOTAL_FIELDS})
        out.update(
            arithmetic_intensity=self.arithmetic_intensity,
            performance=self.performance,
            bound=self.bound,
        )
        return out


def roofline(op: Op, bandwidth: float, peak: float) -> OpResult:
    """Place one operator on the roofline (LLM-Viewer ``roofline_analyze``).

    Args:
        op: The operator.
        bandwidth: Memory bandwidth in bytes/s.
        peak: Peak rate in ops/s.

    Returns:
        The operator with its intensity (ops/byte), attained performance (ops/s), bound
        regime and time (s).
    """
    memory = op.memory_access
    if op.ops == 0:
        # Pure data movement (none of our operators, but keep the function total).
        return OpResult(op, 0.0, 0.0, "memory" if memory else "none", memory / bandwidth)
    if memory == 0:
        return OpResult(op, float("inf"), peak, "compute", op.ops / peak)
    intensity = op.ops / memory
    ridge = peak / bandwidth
    if intensity < ridge:
        performance = intensity * bandwidth
        bound: Bound = "memory"
    else:
        performance = peak
        bound = "compute"
    return OpResult(op, intensity, performance, bound, op.ops / performance)


@dataclass(frozen=True)
class StageResult:
    """Roofline results of one stage (prefill, one decode step, vision encoder, ...).

    Attributes:
        stage: Stage name.
        layer: Results of the operators of one repeated layer.
        num_layers: How many times the layer repeats.
        extra: Results of operators that run once (lm_head, patch embedding, ...).
        totals: Sums of TOTAL_FIELDS: layer sums times num_layers, plus the extras.
    """

    stage: str
    layer: tuple[OpResult, ...]
    num_layers: int
    extra: tuple[OpResult, ...] = ()
    totals: dict[str, float] = field(default_factory=dict)

    @property
    def ops(self) -> float:
        return self.totals["ops"]

    @property
    def time(self) -> float:
        return self.totals["time"]

    @property
    def memory_access(self) -> float:
        return self.totals["memory_access"]

    @property
    def store_act(self) -> float:
        return self.totals["store_act"]

    def to_dict(self, per_op: bool = False) -> dict[str, object]:
        out: dict[str, object] = {"stage": self.stage, "num_layers": self.num_layers}
        out.update(self.totals)
        if per_op:
            out["layer_ops"] = [r.to_dict() for r in self.layer]
            out["extra_ops"] = [r.to_dict() for r in self.extra]
        return out


def analyze_stage(
    stage: str,
    layer_ops: Sequence[Op],
    num_layers: int,
    hardware: Hardware,
    precision: Precision,
    extra_ops: Iterable[Op] = (),
) -> StageResult:
    """Put every operator on the roofline and total them.

    Args:
        stage: Stage name, for display.
        layer_ops: Operators of one layer.
        num_layers: Number of identical layers.
        hardware: The device.
        precision: Bit widths; they choose the peak (INT8 rule, see Hardware.peak_ops).
        extra_ops: Operators that run once.
    """
    peak = hardware.peak_ops(precision.w_bits, precision.a_bits, precision.kv)
    layer = tuple(roofline(op, hardware.bandwidth, peak) for op in layer_ops)
    extra = tuple(roofline(op, hardware.bandwidth, peak) for op in extra_ops)
    totals = {
        name: sum(r.get(name) for r in layer) * num_layers + sum(r.get(name) for r in extra)
        for name in TOTAL_FIELDS
    }
    return StageResult(stage, layer, num_layers, extra, totals)
