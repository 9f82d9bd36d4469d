"""The continuous batcher over a GPT or a Transformer with the scripted decoding step (chatforge.models.gpt.scripted,
chatforge.models.transformer.scripted) serves what it serves with the eager step, logits bit for bit, on the seeded scenarios of test_speculative_parity.py: prompts of
different lengths joining mid-reply, greedy rows beside sampled, penalised and n-gram-banned ones, rows cancelled,
failed and finished, drafts verified and rejected (caches holding masked columns), and, with a packing policy small
enough for these models, every kernel a PackedLinear picks (one row on the transposed copy, oneDNN, F.linear); and
the same with the models quantized to int8 as load_model(precision="int8") does."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from tests.models.test_gpt_scripted import int8
from tests.serving.test_speculative_parity import _datastore, _model, _requests, _serve

from chatforge.modules.linear import PackPolicy, onednn_linear_available, pack_linear_layers

SCENARIOS = 40
# d_model 16: one row on the transposed copy where outputs >= inputs, oneDNN from 2 rows, F.linear past 3.
TINY_POLICY = PackPolicy(min_weights=0, min_macs=2 * 16 * 16, max_rows=3, name="tiny", one_row_transposed=True)


class _Recording:
    """A step model that keeps a copy of every logits tensor it returns (prefill, step, verify)."""

    def __init__(self, step) -> None:
        self._step, self.logits = step, []

    def __getattr__(self, name):
        return getattr(self._step, name)

    def _keep(self, out):
        self.logits.append(out.clone())
        return out

    def prefill(self, prompts, bos_id):
        state, logits = self._step.prefill(prompts, bos_id)
        return state, self._keep(logits)

    def step(self, state, tokens):
        return self._keep(self._step.step(state, tokens))

    def verify(self, state, tokens):
        return self._keep(self._step.verify(state, tokens))


def _step_model(seed: int, family: str, layers: str, scripted: bool):
    rng = random.Random(f"{seed}-{family}")  # the same draws as test_speculative_parity's scenario: the same weights
    step, n = _model(rng, family, torch.float32)
    if layers == "PackedLinear":
        pack_linear_layers(step.model, policy=TINY_POLICY)
    elif layers == "int8":  # as load_model(precision="int8"), full-range activations
        step = type(step)(int8(step.model, "full"))
    if scripted:
        assert step.model.use_scripted_step() is None
    return step, n, rng


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.ERROR)  # failed rows log their traceback by design
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["gpt", "transformer"])
@pytest.mark.parametrize("layers", ["nn.Linear", "PackedLinear", "int8"])
def test_served_replies_and_logits_with_the_scripted_step_are_the_eager_ones(layers, family):
    if layers == "PackedLinear" and not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    failures, compared, verified = [], 0, 0
    for seed in range(SCENARIOS):
        eager, n, rng = _step_model(seed, family, layers, scripted=False)
        scripted, _, _ = _step_model(seed, family, layers, scripted=True)
        reqs = _requests(rng, family, n)
        eos = rng.choice([2, 2, rng.randrange(4, 44)])
        max_running, k = rng.randint(1, 4), rng.choice([1, 2, 4, 8])
        off, _ = _serve(eager, reqs, eos=eos, drafts=None, draft_tokens=0, max_running=max_running)
        index = _datastore(rng, reqs, [o.tokens for o in off], eos)
        for drafts, tokens in ((None, 0), (index, k)):
            runs = []
            for step in (eager, scripted):
                rec = _Recording(step)
                outs, _ = _serve(rec, reqs, eos=eos, drafts=drafts, draft_tokens=tokens, max_running=max_running)
                runs.append((outs, rec.logits))
            (out_a, log_a), (out_b, log_b) = runs
            if [(o.tokens, o.end) for o in out_a] != [(o.tokens, o.end) for o in out_b]:
                failures.append(f"seed {seed} drafts {tokens}: replies differ")
            if len(log_a) != len(log_b) or any(not torch.equal(x, y) for x, y in zip(log_a, log_b, strict=False)):
                failures.append(f"seed {seed} drafts {tokens}: logits differ")
            compared += len(log_a)
            verified += sum(1 for x in log_a if x.dim() == 3)  # verify's (B, T, V)
    assert not failures, "\n".join(failures)
    assert compared > 500 and verified > 20, (compared, verified)  # the scenarios did decode, and verify drafts
