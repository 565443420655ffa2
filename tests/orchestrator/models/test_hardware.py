"""Precision follows the hardware: parsed from a cpuinfo text written here, not from the machine running the test."""
import pytest
import torch

from orchestrator.models import hardware

AMX = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n"


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    read = hardware.cpu_info.__wrapped__

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text + text)  # two logical CPUs: the first block is read
        monkeypatch.setattr(hardware, "cpu_info", lambda: read(str(path)))
    return use


def test_cpu_flags_and_model_are_read(fake_cpu):
    fake_cpu(AMX)
    info = hardware.cpu_info()
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma"]


@pytest.mark.parametrize("text, expected", [(AMX, "bf16"), (EPYC, "fp32")])
def test_auto_picks_bf16_only_with_native_units(fake_cpu, text, expected):
    fake_cpu(text)
    used, why = hardware.resolve_precision("auto", "cpu")
    assert used == expected
    assert why.startswith("auto: ") and ("has amx_bf16, avx512_bf16" in why) == (expected == "bf16")


def test_explicit_precision_is_kept_and_unknown_refused(fake_cpu):
    fake_cpu(EPYC)
    assert hardware.resolve_precision("bf16", "cpu") == ("bf16", "asked for explicitly")
    with pytest.raises(ValueError, match="bf32.*auto, bf16, fp32, fp16"):
        hardware.resolve_precision("bf32", torch.device("cpu"))
