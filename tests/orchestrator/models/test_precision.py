"""Precision settings: auto follows the (faked) CPU, weights follow the precision, conflicts are one clear error,
and the mixed CPU attention equals attention computed by hand."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.models import attention, hardware, precision
from orchestrator.spec.space import SpaceError, load_space

AMX = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n"
SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    read = hardware.cpu_info.__wrapped__

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(hardware, "cpu_info", lambda: read(str(path)))
    return use


@pytest.mark.parametrize("cpu, name, weights", [(AMX, "bf16", "bfloat16"), (EPYC, "fp32", "float32")])
def test_auto_holds_the_base_in_the_precision_it_computes(fake_cpu, cpu, name, weights):
    fake_cpu(cpu)
    train, scoring = precision.plan_run("auto", "auto", "auto", "cpu")
    assert (train.name, train.weights) == (name, weights) == (scoring.name, scoring.weights)
    assert train.autocast_dtype is None                          # held in its own dtype: nothing to cast
    rec = train.record()
    assert rec["precision"] == name and rec["precision_reason"].startswith("auto: ")
    assert rec["precision_reason"].endswith(f"base weights {weights}")


def test_float32_weights_with_bf16_run_under_autocast(fake_cpu):
    fake_cpu(EPYC)  # asked for explicitly: kept even without native units
    p = precision.plan_precision("bf16", "float32", "cpu")
    assert p.autocast_dtype is torch.bfloat16
    with p.context("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("model_dtype, train, evaluation, match", [
    ("bfloat16", "fp32", "fp32", r"train\.precision: fp32 with model\.dtype: bfloat16 .* Fix: model\.dtype: auto"),
    ("auto", "bf16", "fp32", r"eval\.precision: fp32 with model\.dtype: bfloat16"),
    ("float16", "bf16", "bf16", r"train\.precision: bf16 with model\.dtype: float16 .* Fix: .* train\.precision: fp16"),
])
def test_disagreeing_settings_are_one_error_naming_the_keys(fake_cpu, model_dtype, train, evaluation, match):
    fake_cpu(AMX)
    with pytest.raises(precision.PrecisionError, match=match):
        precision.plan_run(model_dtype, train, evaluation, "cpu")


def test_fp16_on_a_cpu_is_refused(fake_cpu):
    fake_cpu(AMX)
    with pytest.raises(precision.PrecisionError, match=r"eval\.precision: fp16 needs a GPU"):
        precision.plan_run("auto", "fp32", "fp16", "cpu")


def test_the_spec_refuses_a_conflict_it_can_see_without_a_device(tmp_path, shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    smoke = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    smoke.setdefault("model", {})["dtype"] = "bfloat16"
    smoke.setdefault("eval", {})["precision"] = "fp32"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(smoke))
    with pytest.raises(SpaceError, match=r"eval\.precision: fp32 with model\.dtype: bfloat16"):
        load_space(tmp_path / "s.yaml")


def test_defaults_are_auto(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(SPACES / "smoke.yaml")
    assert (spec.model.dtype, spec.train.precision, spec.eval.precision) == ("auto", "auto", "auto")


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v in float64, GQA by repeating the KV heads. (B, H, T, d)."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("grad", [True, False])
def test_mixed_attention_equals_attention_by_hand_in_bf16(grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 16, generator=g).bfloat16().requires_grad_(grad) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, True
    with torch.set_grad_enabled(grad):
        out, _ = attention.sdpa_cpu_mixed(module, q, k, v, None, scaling=16 ** -0.5)
    ref = reference_attention(q.detach(), k.detach(), v.detach()).transpose(1, 2)   # (B, T, H, d)
    assert out.dtype is torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)            # bf16 output rounding
    if grad:
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        (out.double() * w).sum().backward()
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        (reference_attention(qr, kr, vr).transpose(1, 2) * w).sum().backward()
        for mine, theirs in ((q, qr), (k, kr), (v, vr)):
            torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=5e-2, rtol=5e-2)


def test_a_bf16_model_on_cpu_uses_the_mixed_attention():
    from orchestrator.models.loading import load_model
    model, _ = load_model("tiny-llama", dtype="bfloat16")
    assert model.config._attn_implementation == attention.NAME
    assert load_model("tiny-llama", dtype="float32")[0].config._attn_implementation == "sdpa"


@pytest.mark.parametrize("cpu, dtype", [(AMX, torch.bfloat16), (EPYC, torch.float32)])
def test_load_model_auto_follows_the_cpu(fake_cpu, cpu, dtype):
    from orchestrator.models.loading import load_model
    fake_cpu(cpu)
    model, _ = load_model("tiny-llama", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_glibc_keeps_freed_blocks():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert precision.keep_freed_memory() is True


def test_bf16_training_without_bf16_units_scores_in_bf16_with_eval_auto(monkeypatch):
    # issue 29 item 13: bf16-held weights cannot score fp32, so eval auto follows training instead of failing later
    monkeypatch.setattr(hardware, "native_bf16", lambda device: (False, "AMD EPYC has neither amx_bf16 nor x"))
    train, scoring = precision.plan_run("auto", "bf16", "auto", "cpu")
    assert (train.name, train.weights) == ("bf16", "bfloat16")
    assert (scoring.name, scoring.weights, scoring.autocast_dtype) == ("bf16", "bfloat16", None)
    assert "follows train.precision bf16" in scoring.reason and "cannot compute fp32" in scoring.reason
    with pytest.raises(precision.PrecisionError, match=r"eval\.precision: fp32 with model\.dtype: bfloat16"):
        precision.plan_run("auto", "bf16", "fp32", "cpu")  # an explicit fp32 stays refused, naming both keys


@pytest.mark.parametrize("native, scored", [(True, "bf16"), (False, "fp32")])
def test_fp16_training_with_eval_auto_records_what_scoring_computes_and_why(monkeypatch, native, scored):
    # issue 29 item 15: an A100 scores an fp16 run in bf16, a V100 in fp32; the recorded reason names both
    monkeypatch.setattr(hardware, "native_bf16", lambda device: (native, "the GPU"))
    train, scoring = precision.plan_run("auto", "fp16", "auto", "cuda")
    assert (train.name, train.weights, scoring.name, scoring.weights) == ("fp16", "float32", scored, "float32")
    rec = scoring.record("eval_")
    assert rec["eval_precision"] == scored
    assert f"scoring computes {scored} while training computes fp16" in rec["eval_precision_reason"]
    assert "eval.precision: fp16 scores as trained" in rec["eval_precision_reason"]


def test_explicit_bf16_without_bf16_units_warns_once(monkeypatch, caplog):
    # issue 29 item 14
    monkeypatch.setattr(hardware, "_WARNED", set())
    monkeypatch.setattr(hardware, "native_bf16", lambda device: (False, "AMD EPYC has neither amx_bf16 nor x"))
    with caplog.at_level("WARNING", logger="orchestrator.models.hardware"):
        for _ in range(3):
            assert hardware.resolve_precision("bf16", "cpu") == ("bf16", "asked for explicitly")
        precision.plan_run("auto", "bf16", "bf16", "cpu")
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "bf16 was asked for explicitly" in warned[0].getMessage()
    assert "AMD EPYC" in warned[0].getMessage()
    monkeypatch.setattr(hardware, "native_bf16", lambda device: (True, "a Xeon has amx_bf16"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="orchestrator.models.hardware"):
        hardware.resolve_precision("bf16", "cpu")
    assert not caplog.records  # native units: nothing to warn about
