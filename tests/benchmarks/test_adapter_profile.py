"""benchmarks/probes/adapter_profile.py: the split of a step into frozen GEMMs, adapter GEMMs and the rest adds up."""

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def profiler():
    return load_script("probes/adapter_profile")


def test_split_adds_up_and_names_the_adapter_gemms(profiler):
    n, m, tokens = 64, 96, 32
    frozen = profiler.profile_variant("frozen", n, m, tokens, steps=1, warmup=1)
    lora = profiler.profile_variant("lora_r64", n, m, tokens, steps=1, warmup=1)
    for r in (frozen, lora):
        parts = r["frozen_mm_ms"] + r["adapter_mm_ms"] + r["other_ms"]
        assert parts == pytest.approx(r["total_ms"], rel=1e-9)
    assert frozen["adapter_mm_ms"] == 0 and frozen["frozen_mm_ms"] > 0
    shapes = {o["shapes"] for o in lora["ops"] if o["op"] == "aten::mm"}
    # LoRA r64: x A^T (T, n) @ (n, 64) and h B^T (T, 64) @ (64, m) besides the frozen x W^T (T, n) @ (n, m)
    assert str([[tokens, n], [n, 64]]) in shapes and str([[tokens, 64], [64, m]]) in shapes
    assert str([[tokens, n], [n, m]]) in shapes
    assert lora["adapter_mm_ms"] > 0


def test_unknown_variant_is_refused(profiler, capsys):
    assert profiler.main(["--variants", "nope"]) == 2
    assert "unknown variants" in capsys.readouterr().err
