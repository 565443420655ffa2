"""benchmarks/eval_throughput.py and train_precision.py: the paired statistics and the GEMM limit are what they
say (checked against hand-computed values), and both scripts end with the JSON line the issue asks for."""
import json

import pytest
import torch

from tests.benchmarks import load_script as load


@pytest.fixture(scope="module")
def evalb():
    return load("eval_throughput")


@pytest.fixture(scope="module")
def trainp():
    return load("train_precision")


def test_paired_counts_mcnemar_and_ci(evalb):
    # right in fp32 only on 5 items, never the other way: exact two-sided p = 2 * 0.5^5
    fp32 = [1] * 5 + [1, 0, 1, 0] * 5
    bf16 = [0] * 5 + [1, 0, 1, 0] * 5
    out = evalb.paired(fp32, bf16)
    assert (out["right_in_fp32_only"], out["right_in_bf16_only"]) == (5, 0)
    assert out["mcnemar_exact_p"] == pytest.approx(2 * 0.5 ** 5)
    assert out["diff"] == pytest.approx(-5 / 25)
    low, high = out["diff_ci95"]
    assert low < -5 / 25 < high <= 0                                  # the mean lies inside; no item favours bf16
    same = evalb.paired([1, 0, 1], [1, 0, 1])
    assert same["diff_ci95"] == [0.0, 0.0] and same["mcnemar_exact_p"] == 1.0


def test_gemm_limit_is_the_flop_weighted_harmonic_rate(trainp, monkeypatch):
    monkeypatch.setattr(trainp, "gemm_rate", lambda m, k, n, dtype: float(k) * (4 if dtype == torch.bfloat16 else 1))
    model = torch.nn.Module()
    model.body = torch.nn.Linear(8, 16, bias=False)
    model.head = torch.nn.Linear(16, 32, bias=False)
    model.get_output_embeddings = lambda: model.head
    out = trainp.gemm_limits(model, positions=10, response=3)
    # products: body fwd (10, 8, 16) and bwd (10, 16, 8); head fwd (3, 16, 32) and bwd (3, 32, 16); rate = K
    flops = {(10, 8, 16): 2 * 10 * 8 * 16, (10, 16, 8): 2 * 10 * 16 * 8, (3, 16, 32): 2 * 3 * 16 * 32,
             (3, 32, 16): 2 * 3 * 32 * 16}
    expected = sum(flops.values()) / sum(f / k[1] for k, f in flops.items())
    assert out["limit"]["fp32"] == pytest.approx(expected)
    assert out["limit"]["bf16"] == pytest.approx(4 * expected)


def test_eval_script_quick_run_ends_with_the_json_line(evalb, capsys, shared_data_dir):
    assert evalb.main(["--quick", "--json", "--data-dir", str(shared_data_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["items_per_s"]) == {"fp32", "bf16"} and result["items"] == 8
    assert result["paired"]["n"] == 8 and result["max_abs_loglik_diff"] >= 0


@pytest.mark.slow  # tiny-llama, three variants (one compiled), ~40 s of CPU
def test_train_precision_quick_run_ends_with_the_json_line(trainp, capsys, shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    tt = load("train_throughput")
    names = {"ours_fp32", "ours_bf16", "ours_bf16_compiled"}
    assert tt.main(["--precision", "--quick", "--json", "--variants", ",".join(sorted(names))]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["tokens_per_s"]) == names
    assert set(result["gemm_gflops"]) == {"fp32", "bf16"} and set(result["limit_share"]) == names
    assert set(result["compile_s"]) == {"ours_bf16_compiled"} and result["compile_s"]["ours_bf16_compiled"] > 0
    assert set(result["ratios"]) >= {"ours bf16 / ours fp32", "ours bf16 compiled / ours fp32"}
    assert "bf16_flags" in result["cpu"] and result["cpu"]["model"]
