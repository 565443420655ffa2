"""benchmarks/probes/dropout_speed.py: the saved-memory column counts what autograd really keeps."""

import json

import pytest
import torch
from torch import nn

from malora.layers.dropout import InputDropout
from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("probes/dropout_speed")


def test_saved_bytes_are_the_float_mask_for_stock_and_the_drop_positions_for_ours(bench):
    x = torch.randn(300, 70, requires_grad=True)
    assert bench.saved_bytes(nn.Dropout(0.1).train(), x) == x.numel() * 4      # one float32 mask
    torch.manual_seed(5)
    dropped = int((InputDropout(0.1).train()(x) == 0).sum())                 # same seed: same positions
    torch.manual_seed(5)
    assert bench.saved_bytes(InputDropout(0.1).train(), x) == dropped * 8     # int64 positions only
    assert 0.05 * x.numel() < dropped < 0.15 * x.numel()


def test_the_script_prints_a_row_per_variant_and_a_json_line(bench, capsys):
    assert bench.main(["--repeats", "1", "--inner", "1", "--p", "0.05", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert len(result["rows"]) == 2 * len(bench.SHAPES)
    assert all(v["saved"] > 5 for v in result["ratios"].values())             # 4 bytes vs ~0.4 per element
