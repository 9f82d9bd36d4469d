"""benchmarks/draft_settings.py counts the decoding steps speculative decoding takes offline, from greedy replies;
those counts are only worth choosing settings on if they are the batcher's own. Parity: for one stream at a time,
the replayed step count equals the ``steps`` the engine's continuous batcher records serving the same requests,
for every draft budget and for stored replies the model partly rejects."""

from __future__ import annotations

import pytest
from tests.benchmarks.conftest import load
from tests.serving.test_speculative_decoding import GREEDY, _datastore, _run
from tests.serving_fakes import TinyGPTGenerator, TinySeq2SeqGenerator

from chatforge.serving.engine import Engine

ds = load("draft_settings")
# The first GREEDY request runs out of positions before its max_new_tokens, which replay's cap does not model.
REQUESTS = GREEDY[1:]


@pytest.mark.parametrize("make", [TinySeq2SeqGenerator, TinyGPTGenerator], ids=["transformer", "gpt"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_replayed_steps_are_the_batchers_steps(make, k):
    plain = make()
    store = _datastore(plain)
    replayed = []
    for text, opts in REQUESTS:
        reply = plain.reference(text, opts)
        if len(reply) < opts.max_new_tokens:
            reply = [*reply, 2]  # it ended at </s>
        replayed.append(ds.replay(reply, store, k, opts.max_new_tokens, opts.min_new_tokens))
    served = []
    for request in REQUESTS:  # one request per engine: its steps alone
        engine = Engine({"tiny": make(drafts=store)}, {}, max_running=1, draft_tokens=k)
        _run(engine, [request])
        served.append(engine.stats.snapshot()["steps"])
    assert [s for s, _ in replayed] == served
    no_drafts = [ds.replay(plain.reference(t, o) + [2], store, 0, o.max_new_tokens)[0] for t, o in REQUESTS]
    assert sum(served) < sum(no_drafts)  # the drafts were taken somewhere


def test_replay_without_drafts_is_one_step_per_token_after_the_first():
    from chatforge.drafts import DraftIndex

    index = DraftIndex([[5, 6, 7, 2]], eos_id=2)
    assert ds.replay([5, 6, 7, 2], index, 0, 10) == (3, 3)
    assert ds.replay([5, 6, 7, 2], index, 4, 10) == (1, 4)  # one step: 6, 7, </s> drafted and accepted
    # astray after 5: 6, 7, </s> drafted and refused; 9 unknown, no draft; after 7 the n-gram table drafts </s>
    assert ds.replay([5, 9, 7, 2], index, 4, 10) == (3, 4 + 1 + 2)
    assert ds.replay([5, 6, 7, 2], index, 4, 10, min_new=2) == (2, 1 + 3)  # no draft before the second token
