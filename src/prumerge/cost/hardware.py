"""Hardware presets for the roofline model.

A roofline needs two numbers per device: the memory bandwidth (bytes/s) and the peak
arithmetic rate (ops/s). The presets take their figures from LLM-Viewer's
``hardwares/hardware_params.py`` (hahnyuan/LLM-Viewer), which quotes NVIDIA's dense
(non-sparse) tensor-core rates, so that our numbers are comparable with the PruMerge paper's
efficiency table. The H200 is not in LLM-Viewer; its entry uses the H200 SXM data sheet
(4.8 TB/s HBM3e, the same GH100 die and tensor-core rates as the H100 SXM).

``onchip_buffer`` (bytes of register file + shared memory, as LLM-Viewer sets it) is only used
to size the FlashAttention row blocks. ``memory`` (device memory, from the data sheets; not in
LLM-Viewer) is only used to warn when a request's weights and KV cache cannot fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prumerge.errors import PrumergeError


@dataclass(frozen=True)
class Hardware:
    """One accelerator as the roofline model sees it.

    Attributes:
        name: Display name.
        bandwidth: Off-chip memory bandwidth in bytes/s.
        peak_fp16: Peak dense FP16 rate in ops/s (one multiply-add counts as 2 ops).
        peak_int8: Peak dense INT8 rate in ops/s, or None when unknown; the FP16 peak is then
            used for low-bit runs as well.
        onchip_buffer: On-chip buffer in bytes, used to size FlashAttention blocks; None means
            "large enough", which makes the block as tall as the head dimension.
        memory: Device memory in bytes, or None when unknown (no capacity warning then).
    """

    name: str
    bandwidth: float
    peak_fp16: float
    peak_int8: float | None = None
    onchip_buffer: float | None = None
    memory: float | None = None

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise PrumergeError(f"hardware bandwidth must be positive, got {self.bandwidth}")
        if not self.peak_fp16 > 0:
            raise PrumergeError(f"hardware FP16 peak must be positive, got {self.peak_fp16}")
        if self.peak_int8 is not None and not self.peak_int8 > 0:
            raise PrumergeError(f"hardware INT8 peak must be positive, got {self.peak_int8}")
        if self.onchip_buffer is not None and not self.onchip_buffer > 0:
            raise PrumergeError(f"on-chip buffer must be positive, got {self.onchip_buffer}")
        if self.memory is not None and not self.memory > 0:
            raise PrumergeError(f"device memory must be positive, got {self.memory}")

    def peak_ops(self, w_bits: float, a_bits: float, kv_bits: float) -> float:
        """Peak ops/s for the given bit widths.

        LLM-Viewer's rule (``ModelAnalyzer.get_hardware_info``): the INT8 peak applies only if
        the weight, activation and KV-cache widths are all at most 8 bits; anything wider runs
        at the FP16 peak. INT4 and lower also run at the INT8 peak (there is no INT4 entry).
        """
        if w_bits <= 8 and a_bits <= 8 and kv_bits <= 8 and self.peak_int8 is not None:
            return self.peak_int8
        return self.peak_fp16

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


GiB = 2**30

# Figures from LLM-Viewer's hardware_params.py (dense rates: its sparse-rate entries are
# divided by 2 there), except H200 (data sheet, see the module docstring). Memory sizes are
# NVIDIA's data-sheet capacities (the V100's larger, 32 GB model; the H200's 141 GB HBM3e).
HARDWARE: dict[str, Hardware] = {
    "v100": Hardware("V100", 900e9, 112e12, 62e12, 20480e3, 32 * GiB),
    "a100-40g": Hardware("A100-40G", 1555e9, 312e12, 624e12, 27648e3, 40 * GiB),
    "a100-80g": Hardware("A100-80G", 2039e9, 312e12, 624e12, 27648e3, 80 * GiB),
    "h100-sxm": Hardware("H100-SXM", 3072e9, 1979e12 / 2, 3958e12 / 2, 33792e3, 80 * GiB),
    "h100-pcie": Hardware("H100-PCIe", 2048e9, 1513e12 / 2, 3026e12 / 2, 29184e3, 80 * GiB),
    "h200": Hardware("H200-SXM", 4.8e12, 1979e12 / 2, 3958e12 / 2, 33792e3, 141e9),
    "a6000": Hardware("A6000", 768e9, 309.677e12 / 2, 309.7e12, 21504e3, 48 * GiB),
    "a40": Hardware("A40", 696e9, 149.7e12, 299.3e12, 21504e3, 48 * GiB),
    "l40": Hardware("L40", 864e9, 181e12, 362e12, 36352e3, 48 * GiB),
}

# Other spellings, LLM-Viewer's among them ("nvidia_A100" means the 40 GB card there).
_ALIASES: dict[str, str] = {
    "a100": "a100-40g",
    "h100": "h100-sxm",
    "h200-sxm": "h200",
}


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = key.removeprefix("nvidia-")
    return _ALIASES.get(key, key)


def get_hardware(name: str) -> Hardware:
    """Look up a hardware preset by name (case-, underscore- and ``nvidia_``-insensitive).

    Raises:
        PrumergeError: if the name is unknown; the message lists the presets.
    """
    key = _normalise(name)
    if key not in HARDWARE:
        raise PrumergeError(
            f"unknown hardware {name!r}; supported: {', '.join(HARDWARE)}, or 'custom' "
            "with --bandwidth and --peak-fp16"
        )
    return HARDWARE[key]


def custom_hardware(
    bandwidth: float,
    peak_fp16: float,
    peak_int8: float | None = None,
    onchip_buffer: float | None = None,
    name: str = "custom",
    memory: float | None = None,
) -> Hardware:
    """A hardware spec from raw numbers (bytes/s, ops/s and bytes)."""
    return Hardware(name, bandwidth, peak_fp16, peak_int8, onchip_buffer, memory)
