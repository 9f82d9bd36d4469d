"""Draft tokens for speculative greedy decoding, looked up in the replies a model was trained on.

Retrieval-based speculative decoding (He et al. 2024, "REST"): instead of a small draft model, the
draft for a reply is read from a datastore of token sequences. A chatbot trained on a curated reply
set reproduces those replies, often word for word, so the datastore here is the training replies'
token ids in a trie: a running reply that is still a prefix of some training reply is continued with
the most frequent continuation under that prefix, up to ``k`` tokens; a reply that has left the trie
is continued from its last one or two tokens, as the stored replies continue them. The model then checks
every draft token in one step (``StepModel.verify``) and keeps the longest prefix it would have produced
itself, plus its own next token, so greedy output is the same as without drafts; only the number of
decoding steps changes. Drafts stop where their estimated probability gets low, so an unlikely guess
does not widen the step.

The trie is saved in a bundle as ``drafts/replies.json`` (token id lists; JSON, nothing executes on
load), built by :func:`training_replies` from the training split: at bundle time (``chatforge.training.run``), or
afterwards for a bundle trained without it (``chatforge bundle add-drafts``, ``chatforge.training.bundle_drafts``);
one function, so both write the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chatforge.fileio import atomic_write_bytes

if TYPE_CHECKING:  # annotations only: the datastore itself needs neither
    from chatforge.data import Example
    from chatforge.tokenizer import Tokenizer

DRAFTS_DIR = "drafts"
REPLIES_FILE = "replies.json"
FORMAT = 1
MAX_REPLIES = 1_000_000  # a datastore bigger than this is not a reply set; refused on load
MAX_REPLY_TOKENS = 4096
# Tokens in all the replies, and so the file's size (a token id is at most 10 digits and a comma): a hand-made or
# damaged replies.json of gigabytes is refused by its size before it is read, not parsed into memory first.
MAX_TOTAL_TOKENS = 32_000_000
MAX_FILE_BYTES = 12 * MAX_TOTAL_TOKENS + 8 * MAX_REPLIES + 1024


class DraftIndexError(ValueError):
    """A draft datastore that cannot be used; the message names the file and what is wrong."""


class DraftIndex:
    """A trie over reply token sequences, and a table of what follows each one or two tokens in them.

    Nodes are integers (0 = the root, an empty reply); ``advance(node, token)`` follows one token (None: no
    stored reply continues that way). ``draft(node, k, tail)`` reads up to ``k`` tokens along the most frequent
    path below ``node``; once a reply has left every stored reply (``node`` None) it continues ``tail`` (the
    reply's last tokens) with the most frequent next token after its last two tokens (or its last one), again
    and again (the suffix match of REST, on one and two tokens). Either way a draft stops after ``eos_id`` and
    when its estimated probability (the product of each step's share of the stored continuations) falls under
    ``min_probability``: a guess among many stored replies costs a wider verification step and is rarely right.
    """

    CONTEXT = 2  # tokens of the n-gram table's context

    def __init__(self, replies: Iterable[Sequence[int]], eos_id: int, min_probability: float = 0.2) -> None:
        if not 0.0 <= min_probability <= 1.0:
            raise ValueError(f"min_probability={min_probability!r} is out of range; allowed: a number in [0, 1]")
        self.eos_id = int(eos_id)
        self.min_probability = min_probability
        self._children: list[dict[int, int]] = [{}]
        counts: list[int] = [0]
        following: dict[tuple[int, ...], dict[int, int]] = {}
        self.replies: list[list[int]] = []
        total = 0
        for reply in replies:
            if len(self.replies) == MAX_REPLIES:
                break  # no more than load() accepts: a datastore saved from this one must load again
            # A reply's first MAX_REPLY_TOKENS tokens (GenerationOptions.MAX_NEW_TOKENS_LIMIT is far lower, so no
            # draft needs more), likewise: one long training reply must not make its bundle unloadable.
            ids = [int(t) for t in reply][:MAX_REPLY_TOKENS]
            total += len(ids)
            if total > MAX_TOTAL_TOKENS:
                break  # and no more tokens in all than load() accepts
            self.replies.append(ids)
            node = 0
            counts[0] += 1
            for i, tok in enumerate(ids):
                for n in range(1, self.CONTEXT + 1):
                    if i >= n:
                        after = following.setdefault(tuple(ids[i - n : i]), {})
                        after[tok] = after.get(tok, 0) + 1
                nxt = self._children[node].get(tok)
                if nxt is None:
                    nxt = len(self._children)
                    self._children[node][tok] = nxt
                    self._children.append({})
                    counts.append(0)
                counts[nxt] += 1
                node = nxt
                if tok == self.eos_id:
                    break
        # best[node] = (token, child, share of the node's replies that go on with it); None at a leaf
        self._best: list[tuple[int, int, float] | None] = []
        for node, ch in enumerate(self._children):
            if not ch:
                self._best.append(None)
                continue
            tok, child = max(ch.items(), key=lambda kv: counts[kv[1]])
            self._best.append((tok, child, counts[child] / counts[node]))
        # next[context] = (most frequent next token, its share)
        self._next: dict[tuple[int, ...], tuple[int, float]] = {}
        for ctx, after in following.items():
            tok, n = max(after.items(), key=lambda kv: kv[1])
            self._next[ctx] = (tok, n / sum(after.values()))

    def __len__(self) -> int:
        return len(self.replies)

    @property
    def nodes(self) -> int:
        return len(self._children)

    def advance(self, node: int | None, token: int) -> int | None:
        if node is None:
            return None
        return self._children[node].get(token)

    def draft(self, node: int | None, k: int, tail: Sequence[int] = ()) -> list[int]:
        out: list[int] = []
        p = 1.0
        context = list(tail[-self.CONTEXT :])
        while len(out) < k:
            if node is not None:  # down the trie: the stored replies that begin like this one
                best = self._best[node]
                if best is None:
                    break
                tok, node, share = best
            else:  # after the last tokens, wherever they occur in the stored replies
                hit = (self._next.get(tuple(context[-2:])) or self._next.get((context[-1],))) if context else None
                if hit is None:
                    break
                tok, share = hit
            p *= share
            if p < self.min_probability:
                break
            out.append(tok)
            if tok == self.eos_id:
                break
            context.append(tok)
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "eos_id": self.eos_id, "replies": self.replies}
        atomic_write_bytes(folder / REPLIES_FILE, json.dumps(doc, separators=(",", ":")).encode("utf-8"))

    @classmethod
    def load(cls, folder: str | Path, *, vocab_size: int | None = None) -> DraftIndex:
        path = Path(folder) / REPLIES_FILE
        size = path.stat().st_size if path.is_file() else 0  # not a file: reading it says why, below
        if size > MAX_FILE_BYTES:
            raise DraftIndexError(f"{path}: {size:,} bytes; allowed: a draft datastore of at most "
                                  f"{MAX_FILE_BYTES:,} bytes ({MAX_TOTAL_TOKENS:,} tokens in all)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        # ValueError: also a number of more than sys.get_int_max_str_digits() digits; RecursionError: arrays
        # nested deeper than the interpreter's stack (a hand-edited file is not trusted to be sane JSON)
        except (OSError, ValueError, RecursionError) as e:
            what = "JSON nested too deeply" if isinstance(e, RecursionError) else e
            raise DraftIndexError(f"{path}: cannot read the draft datastore ({what})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DraftIndexError(f"{path}: not a draft datastore of format {FORMAT} "
                                  f"(an object with format, eos_id and replies)")
        eos, replies = doc.get("eos_id"), doc.get("replies")
        if not isinstance(eos, int) or isinstance(eos, bool) or not isinstance(replies, list):
            raise DraftIndexError(f"{path}: eos_id must be an integer and replies a list of token id lists")
        if len(replies) > MAX_REPLIES:
            raise DraftIndexError(f"{path}: {len(replies)} replies; at most {MAX_REPLIES} are allowed")
        hi = vocab_size if vocab_size is not None else 2**31
        if not 0 <= eos < hi:
            raise DraftIndexError(f"{path}: eos_id {eos} is not a token id in [0, {hi})")
        total = 0
        for i, r in enumerate(replies):
            total += len(r) if isinstance(r, list) else 0
            if total > MAX_TOTAL_TOKENS:
                raise DraftIndexError(f"{path}: more than {MAX_TOTAL_TOKENS:,} tokens in all; allowed: at most that")
            if (not isinstance(r, list) or len(r) > MAX_REPLY_TOKENS
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < hi for t in r)):
                raise DraftIndexError(f"{path}: reply {i} must be a list of at most {MAX_REPLY_TOKENS} token ids "
                                      f"in [0, {hi})")
        return cls(replies, eos)


def training_replies(train: Iterable[Example], tok: Tokenizer) -> DraftIndex | None:
    """The datastore a generation bundle stores: each training example's reply as ``tok`` encodes it, plus
    ``</s>``, in the training split's order; None when no example has a reply (nothing to draft from)."""
    replies = [[*tok.encode(e.response), tok.eos_id] for e in train if e.response]
    return DraftIndex(replies, tok.eos_id) if replies else None
