"""`prumerge cost` through the real dispatcher."""

from __future__ import annotations

import json

import pytest

from prumerge.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["cost", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table(capsys) -> None:
    code, out, err = run(capsys, "--model", "vicuna-7b", "--hardware", "v100",
                         "--visual-tokens", "576,144,32", "--text-tokens", "64",
                         "--new-tokens", "128")  # fmt: skip
    assert code == 0 and err == ""
    assert "relative to 576 visual tokens" in out
    for column in ("TFLOPs", "prefill ms", "decode ms/tok", "mem access GB", "stored act GB"):
        assert column in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("576 ", "144 "))]
    assert rows[-2][2:] == ["1.000"] * 6  # the ratio table's first row


def test_json(capsys) -> None:
    code, out, _ = run(capsys, "--visual-tokens", "576,32", "--json", "--vision", "clip",
                       "--per-op", "--batch", "2", "--w-bits", "int8", "--a-bits", "8")  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["precision"] == {"w_bits": 8, "a_bits": 8, "kv_bits": 8}
    assert data["peak_ops_used"] == 62e12  # V100's INT8 figure in LLM-Viewer
    full, pruned = data["results"]
    assert (full["prompt_tokens"], pruned["prompt_tokens"]) == (640, 96)
    assert full["ratios"]["TFLOPs"] == 1.0
    assert 0 < pruned["ratios"]["prefill ms"] < 1
    assert pruned["vision"]["encoder"]["ops"] == full["vision"]["encoder"]["ops"]
    assert {op["name"] for op in full["prefill"]["layer_ops"]} >= {"q_proj", "qk_matmul"}


def test_paper_command(capsys) -> None:
    code, out, _ = run(capsys, "--visual-tokens", "700,70", "--text-tokens", "0",
                       "--new-tokens", "0", "--convention", "llm-viewer-2024-03", "--json")  # fmt: skip
    assert code == 0
    full, pm = (r["prefill"] for r in json.loads(out)["results"])
    assert round(full["ops"] / 1e12, 1) == 9.3 and round(pm["time"] * 1e3, 1) == 15.3


def test_custom_hardware_and_flash(capsys) -> None:
    code, out, _ = run(capsys, "--hardware", "custom", "--bandwidth", "100e9",
                       "--peak-fp16", "1e12", "--flash-attention", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["hardware"]["bandwidth"] == 100e9
    assert data["attention"] == "flash"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt-5"], "supported: vicuna-7b"),
        (["--hardware", "tpu"], "supported: v100"),
        (["--visual-tokens", "576,abc"], "--visual-tokens"),
        (["--visual-tokens", ""], "--visual-tokens"),
        (["--w-bits", "3"], "--w-bits"),
        (["--batch", "0"], "--batch"),
        (["--attention", "sparse"], "supported: eager"),
        (["--hardware", "custom", "--bandwidth", "1e9"], "--peak-fp16"),
        (["--hardware", "v100", "--bandwidth", "1e9"], "--hardware custom"),
        (["--bandwidth", "fast", "--peak-fp16", "1e12"], "--bandwidth"),
        (["--vision", "siglip"], "supported: clip"),
        (["--convention", "2023"], "supported: llm-viewer"),
        (["--visual-tokens", "0", "--text-tokens", "0"], "empty"),
        (
            ["--model", "/nonexistent/config.json"],
            "model config '/nonexistent/config.json' not found",
        ),
        (["--model", "x.json"], "model config 'x.json' not found"),
        (
            ["--hardware", "custom", "--bandwidth", "1e9", "--peak-fp16", "1e12", "--memory", "-1"],
            "--memory",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("prumerge: error:") and message in err


def _config(tmp_path, **fields) -> str:
    base = dict(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base | fields))
    return str(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, "a mixture-of-experts config"),
        ({"n_routed_experts": 64, "moe_intermediate_size": 1408}, "covers dense"),
        ({"hidden_size": 100}, "hidden_size (100) is not a multiple of num_attention_heads (3)"),
    ],
)
def test_configs_the_model_does_not_cover_are_refused(capsys, tmp_path, fields, message) -> None:
    code, out, err = run(capsys, "--model", _config(tmp_path, **fields))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert message in err


def test_a_head_dim_makes_any_width_fine(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "--model", _config(tmp_path, hidden_size=100, head_dim=32))
    assert code == 0 and err == ""


def test_memory_warning_when_a_request_cannot_fit(capsys) -> None:
    code, out, err = run(capsys, "--hardware", "v100", "--batch", "100000000")
    assert code == 0 and "visual" in out
    assert err.strip().splitlines() == [
        "prumerge: warning: 576 visual tokens at batch 100000000 need at least 40.3 PB "
        "(weights 13.2 GB, KV cache 40.3 PB), more than V100 has (34.4 GB); the roofline "
        "times assume it fits"
    ]
    code, out, err = run(capsys, "--hardware", "v100")  # LLaVA-1.5-7B at batch 1 fits
    assert code == 0 and err == ""
    code, out, err = run(capsys, "--hardware", "custom", "--bandwidth", "1e12", "--peak-fp16",
                         "1e14", "--memory", "1e9")  # fmt: skip
    assert "more than custom has (1.0 GB)" in err
    code, out, _ = run(capsys, "--json")
    result = json.loads(out)["results"][0]
    assert result["memory_needed"] == result["weights"] + result["kv_cache_final"]
