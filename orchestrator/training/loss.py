"""The trial's language-model loss with the LM head run only where labels exist.

For a batch ``x`` (B, T) with labels ``y`` (B, T) (``-100`` on prompt and padding), final hidden states
``h = backbone(x)`` (B, T, H) and head ``W`` (V, H) (tied to the input embedding or not; the backbone holds the
final norm, if the model has one)::

    S = {(b, t) : y[b, t + 1] != -100}              # positions whose next token carries loss, |S| = P
    L = -1/P  sum_{(b, t) in S}  log softmax(W h[b, t])[y[b, t + 1]]

This is HF's ``model(x, labels=y).loss`` (shift by one, ignore ``-100``, mean over the P kept positions, half
precision logits upcast to float32; HF also casts float64 down to float32, we keep float64), but the (B, T, V)
logits of the full computation become (P, V): with 6.7 % of the positions carrying loss in the intra-domain mix,
and a 49,152 x 576 head that is about a fifth of SmolLM2's FLOPs, the head and its softmax shrink fifteen-fold.
Gradients are the same as the full computation's, since positions outside S contribute nothing to L either way.

``ResponseLoss`` is a module whose forward returns L, so that DDP can wrap it: DDP's gradient all-reduce is
prepared in its own forward, and calling the backbone of a DDP-wrapped model directly would skip that. Its only
parameters are the model's own, under the prefix ``model.``. ``h`` comes from the model's own forward with the
head applied to no position (``orchestrator.evaluation.scoring.final_hidden``), so the model's forward hooks run
as in ``model(**batch)``: malora's routing context sees the attention mask, padding stays out of routing, and
``malora.collect_aux_loss(model)`` after the forward holds this batch's balance loss, the same as before.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data.tokenize import IGNORE_INDEX
from orchestrator.evaluation.scoring import final_hidden, lm_parts

logger = logging.getLogger(__name__)


class ResponseLoss(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> L`` (0-dim), the head at response positions only.

    ``full_logits=True`` (or a model that ``lm_parts`` cannot split) computes the model's own
    ``model(..., labels=labels).loss`` over every position instead: the loop as it was before this module.
    """

    def __init__(self, model: nn.Module, *, full_logits: bool = False):
        super().__init__()
        self.model = model
        self._parts = None if full_logits else lm_parts(model)  # a plain tuple: registers no second module path
        if self._parts is None and not full_logits:
            logger.info("%s: no backbone/head split reproduces its logits; computing the loss over all "
                        "positions", type(model).__name__)

    @property
    def gathered(self) -> bool:
        """Whether the head runs only at the response positions."""
        return self._parts is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._parts is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        backbone, head = self._parts
        hidden = final_hidden(self.model, backbone, input_ids=input_ids, attention_mask=attention_mask)  # (B, T, H)
        target = labels[:, 1:]                                 # (B, T-1): position t predicts token t + 1
        keep = target != IGNORE_INDEX                          # (B, T-1), P true entries
        logits = head(hidden[:, :-1][keep])                    # (P, V)
        # at least float32 for the softmax (HF upcasts half precision too), float64 kept as it is
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, target[keep])
