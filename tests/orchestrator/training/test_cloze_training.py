"""Training in the cloze formulation teaches per-item answers: the gold option's log-likelihood rank among the
item's options improves on the trained items (tiny model, a few dozen steps), measured by plain forwards."""
from __future__ import annotations

import pytest
import torch

from orchestrator.data.cloze import encode_cloze_example
from orchestrator.data.tasks import get_task, load_task
from orchestrator.data.tokenize import collate
from orchestrator.models.loading import build_tiny_llama


def gold_ranks(model, tok, examples) -> list[int]:
    """Per item, 0-based rank of the gold option by LL(" {option}" | "Question: {q}\\nAnswer:"), each option one
    unpadded forward of the whole string (strings written out here, not taken from the scorer)."""
    ranks = []
    model.eval()
    with torch.no_grad():
        for ex in examples:
            ctx_text = f"Question: {ex.question}\nAnswer:"
            ctx = tok(ctx_text)["input_ids"]
            lls = []
            for option in ex.choices:
                ids = tok(f"{ctx_text} {option}")["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                lls.append(float(sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids)))))
            ranks.append(sum(ll > lls[ex.answer_index] for ll in lls))
    return ranks


@pytest.mark.slow  # 20 steps on the tiny model: ~10 s idle, ~35 s on a busy core
def test_cloze_training_raises_the_gold_options_rank(shared_data_dir):
    torch.manual_seed(0)
    model, tok = build_tiny_llama(seed=0)
    train, _ = load_task("arc_e", shared_data_dir)
    items = [ex for ex in train if len(ex.choices) == 4][:8]
    before = gold_ranks(model, tok, items)
    encoded = [encode_cloze_example(tok, get_task("arc_e"), ex, max_length=256) for ex in items]
    batch = collate(encoded, tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gold_ranks(model, tok, items)
    assert sum(before) >= 6  # the untrained model ranks the gold option first by chance only
    assert sum(after) < sum(before) / 3 and sum(r == 0 for r in after) >= 6, (before, after)
