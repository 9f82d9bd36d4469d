"""The hybrid reply policy: which path answers a chat message, decided by config, not code.

Production Korean chit-chat is retrieval-first (Rasa's ResponseSelector, ParlAI's bi-/poly-encoders):

1. classify the intent (optional); an out-of-scope intent gets the ``fallback`` reply;
2. an intent with a ``scripted`` answer gets that answer;
3. a message the retriever finds unlike its training questions (``min_familiarity``: the message's mean
   log-probability per character under a character model of them, ``baselines.retrieval.familiarity``) is out
   of scope: the ``fallback`` reply, before any model answers it;
4. otherwise the retrieval model's best pool answer, if its score clears ``retrieval_threshold``
   (chosen on validation; see ``chatforge.evaluation.replies.choose_retrieval_threshold``);
5. otherwise generation (``generator``, or the default generator), when one is hosted; else the ``fallback`` reply.

The policy is pure: :meth:`ReplyPolicy.route` takes the classify and retrieve calls as arguments, so
the engine keeps its runners and this module stays testable without models. A YAML file holds it::

    classifier: intent            # hosted classifier name, or omit to skip step 1-2
    oos_labels: [oos]             # labels of the classifier that mean out of scope (checked at start); omitted:
                                  # "oos" where the classifier has it (its own out-of-scope answers always count)
    intent_threshold: 0.0         # a top intent score below this is out of scope
    scripted: {greeting: "안녕하세요! 무엇을 도와드릴까요?"}   # intents: labels of the classifier (checked at start)
    retriever: selector           # hosted selection bundle name, or omit
    min_familiarity: -5.6         # below it, the message is out of scope (needs retriever; omit: no guard)
    retrieval_threshold: 0.9
    generate: true                # fall to the generator below the threshold
    generator: chat               # which hosted generator (omit: the default one, the first given)
    fallback_reply: "잘 모르겠어요. 다르게 말씀해 주시겠어요?"
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import read_yaml, yaml_error_line
from chatforge.predictions import ClassPrediction

PATHS = ("scripted", "retrieval", "generation", "fallback")
_KEYS = ("classifier", "oos_labels", "intent_threshold", "scripted", "retriever", "min_familiarity",
         "retrieval_threshold", "generate", "generator", "fallback_reply")
DEFAULT_OOS_LABELS = ("oos",)  # oos_labels not given: CLINC150's label, not required of the classifier


def classifier_labels(model: Any) -> list[str] | None:
    """The labels a hosted classifier answers with: its ``labels`` and the label of its bundle's out-of-scope policy
    (``oos.label``, which need not be one of its columns); None when the model does not say."""
    labels = getattr(model, "labels", None)
    if labels is None:
        return None
    out = [str(x) for x in labels]
    oos_label = getattr(getattr(model, "oos", None), "label", None)
    if isinstance(oos_label, str) and oos_label not in out:
        out.append(oos_label)
    return out


def oos_labels_problem(owner: str, oos_labels: tuple[str, ...] | None, classifier: str, model: Any) -> str | None:
    """Why ``oos_labels`` (given explicitly by ``owner``, the policy or the pipeline) cannot work with ``model``, the
    classifier hosted as ``classifier``: a label it never answers with never sends a message to the fallback, and
    nothing said so (a typo, or another classifier's label). None when they all are its labels, none were given,
    or the model does not say its labels."""
    labels = classifier_labels(model)
    if not oos_labels or labels is None:
        return None
    missing = list(dict.fromkeys(x for x in oos_labels if x not in labels))
    if not missing:
        return None
    one = len(missing) == 1
    return (f"{owner} oos_labels: {', '.join(missing)} {'is not a label' if one else 'are not labels'} of classifier "
            f"{classifier!r} (it never answers with {'it' if one else 'them'}, so no message would go to the fallback "
            f"through {'it' if one else 'them'}); its labels: {', '.join(sorted(labels))}")


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Route:
    """Where a message goes. ``reply`` is None only for ``path == "generation"``."""

    path: str
    reply: str | None = None
    score: float = 0.0  # retrieval: the best answer's score (also when it fell short); else the intent's
    intent: str = ""
    intent_score: float = 0.0
    model: str = ""  # the model that chose the reply (classifier or retriever); "" for generation
    out_of_scope: bool = False  # the classifier or the familiarity guard judged the message out of scope (not: no
    #                             path could answer)
    familiarity: float | None = None  # min_familiarity set: the message's familiarity to the retriever


@dataclass(frozen=True)
class ReplyPolicy:
    fallback_reply: str
    classifier: str | None = None
    oos_labels: tuple[str, ...] | None = None  # None: DEFAULT_OOS_LABELS, which the classifier need not have
    intent_threshold: float = 0.0
    scripted: Mapping[str, str] = field(default_factory=dict)
    retriever: str | None = None
    min_familiarity: float | None = None  # None: no familiarity guard
    retrieval_threshold: float = 0.0
    generate: bool = True
    generator: str | None = None  # the generation path's model; None: the default generator

    def __post_init__(self) -> None:
        if not isinstance(self.fallback_reply, str) or not self.fallback_reply.strip():
            raise PolicyError("policy fallback_reply is empty; allowed: a non-empty reply text")
        if not 0.0 <= self.intent_threshold <= 1.0:
            raise PolicyError(f"policy intent_threshold={self.intent_threshold!r} is out of range; allowed: [0, 1]")
        if self.scripted and self.classifier is None:
            raise PolicyError("policy scripted answers need a classifier to recognise their intents; set classifier")
        if self.min_familiarity is not None:
            if self.retriever is None:
                raise PolicyError("policy min_familiarity needs a retriever (the familiarity is to its training "
                                  "questions); set retriever or remove min_familiarity")
            if not (math.isfinite(self.min_familiarity) and self.min_familiarity < 0.0):
                raise PolicyError(f"policy min_familiarity={self.min_familiarity!r} is out of range; allowed: a "
                                  "number below 0 (a mean log-probability per character; chatforge replies "
                                  "--hybrid chooses one on validation)")
        if self.generator is not None and not self.generate:
            raise PolicyError(f"policy generator {self.generator!r} is unused with generate: false; remove it or "
                              "set generate: true")
        if self.oos_labels is not None and (not isinstance(self.oos_labels, tuple)
                                            or not all(isinstance(x, str) for x in self.oos_labels)):
            raise PolicyError(f"policy oos_labels={self.oos_labels!r} is not a list of labels; allowed: labels of the "
                              "classifier, e.g. [oos]")
        bad = [k for k, v in self.scripted.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise PolicyError(f"policy scripted answers must be non-empty texts; empty or not text for: {bad}")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "policy") -> ReplyPolicy:
        if not isinstance(doc, Mapping):
            raise PolicyError(f"{source}: a reply policy is a mapping of {', '.join(_KEYS)}; got {type(doc).__name__}")
        unknown = sorted(set(doc) - set(_KEYS))
        if unknown:
            raise PolicyError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
        if "fallback_reply" not in doc:
            raise PolicyError(f"{source}: fallback_reply is required (the reply to out-of-scope messages)")
        kw = dict(doc)
        if "oos_labels" in kw:
            labels = kw["oos_labels"]
            if not isinstance(labels, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                       for x in labels):
                # a bare string was iterated into its letters: oos_labels: oos named "o" and "s"
                raise PolicyError(f"{source}: oos_labels must be a list of the classifier's labels, e.g. [oos]; "
                                  f"got {labels!r}")
            kw["oos_labels"] = tuple(str(x) for x in labels)
        if kw.get("min_familiarity") is None:
            kw.pop("min_familiarity", None)  # `min_familiarity:` left empty: no guard, as when omitted
        for key in ("intent_threshold", "retrieval_threshold", "min_familiarity"):
            if key in kw and (isinstance(kw[key], bool) or not isinstance(kw[key], (int, float))):
                raise PolicyError(f"{source}: {key} must be a number, got {kw[key]!r}")
            if key in kw:
                kw[key] = float(kw[key])
        kw["scripted"] = dict(kw.get("scripted") or {})
        try:
            return cls(**kw)
        except PolicyError as e:
            raise PolicyError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ReplyPolicy:
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"reply policy file not found: {p}")
        try:
            tree = read_yaml(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise PolicyError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None
        except yaml.YAMLError as e:
            raise PolicyError(yaml_error_line(p, e)) from None
        return cls.from_dict(tree or {}, source=str(p))

    def check_hosted(self, classifiers: Any, retrievers: Any, has_generator: bool, generators: Any = ()) -> None:
        """Fail at startup, naming what is missing, when the policy names a model that is not hosted, or one
        hosted for another task (a classifier named as the retriever is hosted, but cannot retrieve)."""
        tasks = {**{n: "generation" for n in generators}, **{n: "classification" for n in classifiers},
                 **{n: "selection" for n in retrievers}}

        def why(name: str) -> str:
            return f"is a {tasks[name]} model" if name in tasks else "is not hosted"

        if self.classifier is not None and self.classifier not in classifiers:
            raise PolicyError(f"policy classifier {self.classifier!r} {why(self.classifier)}; classifiers: "
                              f"{', '.join(classifiers) or 'none'}")
        if self.retriever is not None and self.retriever not in retrievers:
            raise PolicyError(f"policy retriever {self.retriever!r} {why(self.retriever)}; selection models: "
                              f"{', '.join(retrievers) or 'none'}")
        if self.generate and not has_generator:
            raise PolicyError("policy generate: true needs a hosted generation model; host one or set generate: false")
        if self.generator is not None and self.generator not in generators:
            raise PolicyError(f"policy generator {self.generator!r} {why(self.generator)}; generators: "
                              f"{', '.join(generators) or 'none'}")
        labels = getattr(classifiers[self.classifier], "labels", None) if self.classifier is not None else None
        unknown = sorted(set(self.scripted) - {str(x) for x in labels}) if labels is not None else []
        if unknown:  # a typo, or another classifier's label: that answer could never be given
            raise PolicyError(f"policy scripted intent(s) {', '.join(unknown)} are not labels of classifier "
                              f"{self.classifier!r}; its labels: {', '.join(sorted(str(x) for x in labels))}")
        if self.classifier is not None:
            problem = oos_labels_problem("policy", self.oos_labels, self.classifier, classifiers[self.classifier])
            if problem:
                raise PolicyError(problem)

    def out_of_scope(self, p: ClassPrediction) -> bool:
        labels = DEFAULT_OOS_LABELS if self.oos_labels is None else self.oos_labels
        return p.label in labels or p.out_of_scope or p.score < self.intent_threshold

    async def route(self, text: str,
                    classify: Callable[[str, str], Awaitable[ClassPrediction]],
                    retrieve: Callable[[str, str], Awaitable[tuple[str, float]]],
                    familiarity: Callable[[str, str], float] | None = None) -> Route:
        """Decide the path for ``text``; ``classify(name, text)`` and ``retrieve(name, text)`` run the models,
        ``familiarity(name, text)`` (needed with ``min_familiarity``) is the retriever's familiarity of ``text``."""
        intent, intent_score = "", 0.0
        if self.classifier is not None:
            pred = await classify(self.classifier, text)
            intent, intent_score = pred.label, pred.score
            if self.out_of_scope(pred):
                return Route("fallback", self.fallback_reply, intent_score, intent, intent_score, self.classifier,
                             out_of_scope=True)
            if intent in self.scripted:
                return Route("scripted", self.scripted[intent], intent_score, intent, intent_score, self.classifier)
        familiar = None
        if self.min_familiarity is not None:
            if familiarity is None:
                raise TypeError("a policy with min_familiarity routes with a familiarity(name, text) callable")
            familiar = familiarity(self.retriever, text)
            if familiar < self.min_familiarity:
                return Route("fallback", self.fallback_reply, intent_score, intent, intent_score, self.retriever,
                             out_of_scope=True, familiarity=familiar)
        score = 0.0
        if self.retriever is not None:
            reply, score = await retrieve(self.retriever, text)
            if score >= self.retrieval_threshold:
                return Route("retrieval", reply, score, intent, intent_score, self.retriever, familiarity=familiar)
        if self.generate:
            return Route("generation", None, score, intent, intent_score, familiarity=familiar)
        return Route("fallback", self.fallback_reply, score, intent, intent_score,
                     self.retriever or self.classifier or "", familiarity=familiar)
