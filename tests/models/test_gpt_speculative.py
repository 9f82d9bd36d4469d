"""GPT's speculative verification (``GPTStepModel.verify``/``accept``): feeding a row its last token and a
draft in one step gives, at every position, the logits it gets feeding them one at a time; after ``accept``
keeps a different number of them per row, every row goes on exactly as if only its kept tokens had ever been
fed (rejected columns cut off or masked), through merges and drops of rows."""

from __future__ import annotations

import pytest
import torch
from tests.models.test_gpt_step import Alone, lm

from chatforge.models.gpt import GPTStepModel

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
def test_verified_drafts_give_each_position_the_logits_of_feeding_them_one_by_one(variant):
    m = lm(variant)
    step = GPTStepModel(m)
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18]]
    with torch.inference_mode():
        alone = [Alone(m, p) for p in prompts]
        state, logits = step.prefill(prompts, bos_id=1)
        last = logits.argmax(-1).tolist()
        drafts = [[20, 21, 22], [23, 24, 25], [26, 27, 28]]
        fed = torch.tensor([[t, *d] for t, d in zip(last, drafts, strict=True)])
        got = step.verify(state, fed)  # (3, 4, V)
        assert got.shape[:2] == (3, 4)
        want = [[a.feed(int(tok)) for tok in row] for a, row in zip(alone, fed, strict=False)]
        for i in range(3):
            torch.testing.assert_close(got[i], torch.stack(want[i]), **TOL)


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
def test_rows_keep_different_numbers_of_tokens_and_go_on_as_if_only_those_were_fed(variant):
    m = lm(variant)
    step = GPTStepModel(m)
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18]]
    with torch.inference_mode():
        state, logits = step.prefill(prompts, bos_id=1)
        history = [[int(t)] for t in logits.argmax(-1)]  # tokens each row has chosen, the last not yet fed
        rounds = [([[30, 31, 32], [33, 34, 35], [36, 37, 38]], [1, 4, 2]),  # row 0 rejects all, row 1 keeps all
                  ([[40, 41], [42, 43], [44, 45]], [3, 1, 1]),  # a tail no row keeps is cut off
                  ([[46], [47], [48]], [2, 2, 2])]
        for drafts, keep in rounds:
            fed = torch.tensor([[h[-1], *d] for h, d in zip(history, drafts, strict=True)])
            step.verify(state, fed)
            step.accept(state, keep, fed.size(1))
            for h, d, k in zip(history, drafts, keep, strict=True):
                h.extend(d[: k - 1])  # kept drafts; the row's next token is chosen below
                h.append(49 - len(h) % 5)  # any token: the model's "own" next one
        assert state.next_pos.tolist() == [len(p) + 2 + len(h) - 1 for p, h in zip(prompts, history, strict=True)]
        # A row leaves and a new one joins: rejected columns stay masked through select and merge.
        state = step.select(state, torch.tensor([0, 2]))
        state_b, _ = step.prefill([[19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]], bos_id=1)
        state = step.merge(state, state_b)
        rows = [(prompts[0], history[0]), (prompts[2], history[2])]
        alone = []
        for p, h in rows:
            a = Alone(m, p)
            for tok in h[:-1]:
                a.feed(tok)
            alone.append(a)
        b = Alone(m, [19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29])
        tokens = torch.tensor([rows[0][1][-1], rows[1][1][-1], int(b.logits.argmax())])
        alone.append(b)
        for _ in range(3):
            got = step.step(state, tokens)
            want = torch.stack([a.feed(int(t)) for a, t in zip(alone, tokens, strict=True)])
            torch.testing.assert_close(got, want, **TOL)
            tokens = got.argmax(-1)


def test_a_lone_row_that_rejects_its_draft_is_cut_back_not_masked():
    m = lm()
    step = GPTStepModel(m)
    with torch.inference_mode():
        state, logits = step.prefill([[7, 8, 9]], bos_id=1)
        width = len(state.caches[0])
        step.verify(state, torch.tensor([[int(logits.argmax()), 30, 31, 32]]))
        step.accept(state, [2], 4)
        assert len(state.caches[0]) == width + 2 and state.key_mask is None  # no mask: the lone row's fast path


def test_masked_columns_past_n_positions_do_not_end_a_row_that_has_positions_left():
    m = lm(n_positions=16)
    step = GPTStepModel(m)
    with torch.inference_mode():
        state, logits = step.prefill([[7, 8], [9, 10]], bos_id=1)  # 4 positions each: <s> q q [SEP]
        tok = logits.argmax(-1).tolist()
        for _ in range(3):  # each round adds 5 columns, row 0 keeps 1 position of them
            fed = torch.tensor([[tok[0], 1, 1, 1, 1], [tok[1], 1, 1, 1, 1]])
            step.verify(state, fed)
            step.accept(state, [1, 5], 5)
            tok = [30, 31]
        assert len(state.caches[0]) > 16 > int(state.next_pos[0])
        state = step.select(state, torch.tensor([0]))  # the row that kept few positions goes on alone
        assert step.step(state, torch.tensor([30])).shape == (1, 50)
