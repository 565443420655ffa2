"""benchmarks/adapter_speed.py: the GPU preset's pieces, run tiny on the CPU (the device run uses the same code)."""

import json

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("adapter_speed")


def test_gpu_preset_runs_every_dispatch_path_and_they_agree(bench, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = bench.main(["--preset", "gpu", "--device", "cpu", "--quick", "--dtype", "float32", "--threads", "1",
                     "--tokens", "64", "--repeats", "1", "--json-out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["env"]["preset"] == "gpu" and result["env"]["skipped_suites"] == []
    assert [s["title"] for s in result["suites"]] == ["linear 512->512", "linear 512->1376",
                                                      "LLaMA-style model h=256 L=1"]
    routed_not_dense = {n for n in bench.GPU_VARIANTS if n.split("_")[0] in bench.CHECK_AGAINST
                        and not n.endswith("_dense")}
    assert len(routed_not_dense) == 10                                   # loop + 3 methods x (sparse, grouped, bmm)
    for suite in result["suites"]:
        assert suite["errors"] == {}
        assert set(suite["variants"]) == set(bench.GPU_VARIANTS)
        assert all(v["ms"] > 0 for v in suite["variants"].values())
        # fp32: the grouped paths (and sparse, loop) give the dense path's output on the same weights
        assert set(suite["check"]) == routed_not_dense
        assert all(c["max_rel_err"] < 1e-5 for c in suite["check"].values()), suite["check"]
        assert "MALoRA grouped / our LoRA r64" in {r["target"] for r in suite["ratios"]}
    assert "### summary" in capsys.readouterr().out


def test_a_failing_variant_is_dropped_and_reported(bench):
    def bad() -> None:
        raise RuntimeError("no kernel for this")

    ran = []
    steps = {"ok": lambda: ran.append(1), "bad": bad}
    errors: dict[str, str] = {}
    bench.drop_failing(steps, errors)
    assert list(steps) == ["ok"] and ran == [1]
    assert errors == {"bad": "RuntimeError: no kernel for this"}


def test_bad_arguments_are_refused(bench, capsys):
    assert bench.main(["--models", "nope"]) == 2
    assert "unknown models ['nope']" in capsys.readouterr().err
    assert bench.main(["--shapes", "12by4"]) == 2
    assert "--shapes takes NxM" in capsys.readouterr().err
