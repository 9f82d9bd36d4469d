"""The experiment YAML file, validated once at load with pydantic.

One file describes one experiment: data, tokenizer, model, training, output. An
unknown key, a wrong type or an out-of-range value fails here, before any work
starts, with the key path, the value and what is allowed. ``--set a.b=c``
overrides are applied before validation, so they are checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

import chatforge.families  # noqa: F401  (fills the registry: the config names a family)
from chatforge.registry import FamilySpec, UnknownFamilyError, get_family
from chatforge.tokenizer import BYTE_VOCAB_SIZE

TASKS = ("generation", "classification")
UNLABELLED_TASKS = ("mlm",)  # the tasks data.unlabelled feeds: they read text alone


class ConfigError(ValueError):
    """A configuration problem, with every offending key listed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CrossFitFold(_Strict):
    """Train without one fold of the training split: ``folds`` folds dealt per label in an order fixed by ``seed``
    (``chatforge.data.splits.fold_ids``); the run trains on the others. K such runs are a cross-fitted teacher for
    ``train.distill_from`` (a list): each training example's soft targets come from the run that did not see it."""

    folds: int = Field(5, ge=2, le=100)
    fold: int = Field(..., ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _fold_in_range(self) -> CrossFitFold:
        if self.fold >= self.folds:
            raise ValueError(f"fold={self.fold} must be in [0, folds={self.folds})")
        return self


class DataConfig(_Strict):
    path: str = Field(description="corpus file; 'sample' means the corpus shipped with chatforge")
    # tagged_jsonl: {"tokens": [...], "tags": [...]} per line, for task token_classification only.
    format: Literal["auto", "chatbot_csv", "clinc150", "csv", "tsv", "jsonl", "tagged_jsonl"] = "auto"
    text_field: str | None = None
    response_field: str | None = None
    label_field: str | None = None
    # jsonl only: the field holding a list of the conversation's earlier turns (oldest first), and how many of
    # them a generation model reads before the message (``turn [SEP] turn [SEP] message``); the same number is
    # used when serving (the Reply RPC's context, the HTTP API's earlier messages). 0: single-turn.
    context_field: str | None = None
    context_turns: int = Field(0, ge=0, le=64)
    split: Literal["random", "predefined"] = "random"
    # With split=predefined (CLINC150): which lists of the JSON file are train / valid.
    train_keys: list[str] = Field(default_factory=lambda: ["train", "oos_train"])
    valid_keys: list[str] = Field(default_factory=lambda: ["val", "oos_val"])
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    stratify: bool = False
    # With split=predefined: hold out this fraction of the train_keys lists (stratified by label, seeded by
    # dev_seed, not by the run's seed, so every member of an ensemble holds out the same examples) as a
    # development test that nothing is fitted or chosen on; its figures are reported as dev_*.
    dev_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    dev_seed: int = 0
    # Hold near-duplicates out together: texts of one label at char n-gram TF-IDF cosine >= this are one group
    # (chatforge.data.splits.hold_out); None: one by one.
    dev_group_similarity: float | None = Field(None, gt=0.0, le=1.0)
    # Which examples of each label the dev split takes: 'hashed' (in an order fixed by dev_seed) or 'tail' (the
    # last dev_fraction of the label's examples in file order). CLINC150's lists are in collection order, one
    # crowd worker's paraphrases in a run, so a hashed dev example usually has its siblings in training and
    # scores ~3 points easier than the official val and test lists; the tail shares one cut with training per
    # label (docs/results/clinc150.md: "A development split that predicts val"). dev_seed plays no part in 'tail'.
    dev_split: Literal["hashed", "tail"] = "hashed"
    # Leave one fold of the training split (what remains after the dev split) out of training: see CrossFitFold.
    crossfit_fold: CrossFitFold | None = None
    on_error: Literal["raise", "skip"] = "raise"
    max_examples: int | None = Field(None, gt=0)
    # Outlier exposure for torch classifiers (Hendrycks et al. 2019): a UTF-8 text file of unlabelled
    # out-of-domain sentences, one per line (CLINC150 ships 14,750 Wikipedia sentences, all_wiki_sents.txt). They
    # join the training set without a label; the loss pushes the model's distribution on them towards uniform,
    # weighted by train.outlier_weight. The linear baseline takes the same file as model.outliers.
    outliers: str | None = None
    # Unlabelled in-domain (or any) text for self-supervised pre-training (BERT's task 'mlm'): a UTF-8 text file, one
    # sentence per line, whose lines join the training texts (and the tokenizer's). Validation and dev are untouched.
    unlabelled: str | None = None

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"valid_fraction + test_fraction must be < 1 (got {self.valid_fraction} + {self.test_fraction})"
            )
        if self.dev_fraction and self.split != "predefined":
            raise ValueError(
                f"dev_fraction={self.dev_fraction} holds out part of the predefined train lists (split: predefined);"
                " with split 'random', test_fraction is the held-out part: set that instead"
            )
        if self.dev_group_similarity is not None and not self.dev_fraction:
            raise ValueError(f"dev_group_similarity={self.dev_group_similarity} groups the examples data.dev_fraction "
                             "holds out, but dev_fraction is 0; set dev_fraction (e.g. 0.2) or remove it")
        # dev_split with dev_fraction 0 is a no-op, not an error: `--set data.dev_fraction=0` on a config that
        # sets dev_split (every CLINC150 config) is how a model is trained on everything for release.
        if self.dev_split == "tail" and self.dev_group_similarity is not None:
            raise ValueError(f"dev_group_similarity={self.dev_group_similarity} groups a hashed dev split; "
                             "dev_split 'tail' holds out a contiguous run per label already: drop one of the two")
        return self


class TokenizerConfig(_Strict):
    """``kind: sentencepiece`` trains (or reuses, ``path``) a SentencePiece model; ``kind: byte`` is the fixed
    byte-level vocabulary (chatforge.tokenizer.ByteTokenizer), so the SentencePiece keys do not apply to it."""

    kind: Literal["sentencepiece", "byte"] = "sentencepiece"
    path: str | None = Field(None, description="reuse an existing SentencePiece .model instead of training")
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(8000, ge=16, le=1_000_000)
    character_coverage: float = Field(0.9995, gt=0.9, le=1.0)
    on_vocab_too_large: Literal["error", "lower"] = "error"

    @model_validator(mode="after")
    def _byte_kind(self) -> TokenizerConfig:
        if self.kind != "byte":
            return self
        # A resolved config (run folder, bundle) spells out every default, so a key is only wrong when
        # it asks for something a byte vocabulary cannot do; vocab_size is then recorded as the real size.
        bad = [f"tokenizer.{k}={getattr(self, k)!r}" for k in ("path", "model_type", "character_coverage",
                                                              "on_vocab_too_large")
               if k in self.model_fields_set and getattr(self, k) != type(self).model_fields[k].default]
        if "vocab_size" in self.model_fields_set and self.vocab_size != BYTE_VOCAB_SIZE:
            bad.insert(0, f"tokenizer.vocab_size={self.vocab_size}")
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: not used with tokenizer.kind 'byte', whose vocabulary is fixed (7 special ids"
                f" + 256 bytes = {BYTE_VOCAB_SIZE}) and has nothing to train; remove these keys, or use"
                " tokenizer.kind 'sentencepiece'")
        self.__dict__["vocab_size"] = BYTE_VOCAB_SIZE  # bypasses validate_assignment (it would re-enter here)
        return self


class ModelConfig(BaseModel):
    """``family`` and ``task`` plus the family's own keys, validated once against its config class.

    The YAML keeps the family's keys flat beside ``family``/``task`` (every existing config and bundle
    reads that way); after validation the typed object is held here (:meth:`family_config`) and flows
    unchanged to the family's builder, which takes exactly that type.
    """

    # Frozen: the typed config is built once from these keys, so they cannot change underneath it.
    model_config = ConfigDict(extra="allow", frozen=True)

    family: str
    task: str = Field(description="one of the tasks the family supports (see chatforge.registry)")
    init_from: str | None = None
    _family_config: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _family_params(self) -> ModelConfig:
        try:
            spec = get_family(self.family)
        except UnknownFamilyError as e:
            raise ValueError(str(e)) from None
        if self.task not in spec.tasks:
            raise ValueError(f"family {self.family!r} supports tasks {list(spec.tasks)}, not {self.task!r}")
        try:
            self._family_config = spec.config_cls(**(self.model_extra or {}))
        except ValidationError as err:
            raise ValueError(_family_errors(err, spec.config_cls, self.family)) from None
        except TypeError as err:  # a plain dataclass rejecting an unknown keyword
            raise ValueError(f"{err}; allowed keys for family {self.family!r}: "
                             f"{', '.join(_field_names(spec.config_cls))}") from None
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The family's keys as written (what the YAML and the tracking params show)."""
        return dict(self.model_extra or {})

    def family_config(self) -> Any:
        """The family's typed config (e.g. ``TransformerConfig``), built once at validation."""
        return self._family_config

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)


def _field_names(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(getattr(cls, "model_fields", {}))


def _family_errors(err: ValidationError, cls: type, family: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"model.{loc}: unknown key for family {family!r}; "
                         f"allowed: family, task, init_from, {', '.join(_field_names(cls))}")
        else:
            got = e.get("input")
            # a model-level check (d_model vs n_heads) gets the whole argument set as its input: not worth showing
            shown = ("" if isinstance(got, dict) or type(got).__name__ == "ArgsKwargs" else
                     " (got null)" if got is None else f" (got {got!r})")
            msg = _plain_message(e["msg"])
            parts.append(f"model.{loc}: {msg}{shown}" if loc else f"model: {msg}{shown}")
    return "; ".join(parts)


def _plain_message(msg: str) -> str:
    """pydantic's message without its "Value error, " prefix (our checks raise ValueError with the whole text)."""
    return msg.removeprefix("Value error, ")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    max_source_len: int = Field(64, ge=2, le=8192)
    max_target_len: int = Field(64, ge=2, le=8192)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: bf16 where the device computes it natively (a bf16 GPU; a CPU with AMX or avx512_bf16), else fp32
    # (chatforge.runtime.pick_train_precision); the run's metrics record what was used.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    early_stopping_patience: int | None = Field(None, ge=1)
    # What picks the best epoch (the weights kept) and drives early stopping: the validation loss, or (generation)
    # the chrF of greedy replies to the first monitor_examples validation questions, computed every epoch.
    monitor: Literal["valid_loss", "valid_chrf"] = "valid_loss"
    monitor_examples: int = Field(200, ge=1, le=100_000)
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: the CPUs available to "
                                       "the process (affinity, cgroup CPU quota), split between torchrun's local processes")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="write a resumable checkpoint into the run folder every N optimizer steps")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (exact resume on CPU)")
    # With data.outliers: the weight of the outlier-exposure term (cross-entropy from the model's distribution on
    # an outlier to the uniform one) beside the classification loss; Hendrycks et al. use 0.5.
    outlier_weight: float = Field(0.5, gt=0.0, le=100.0)
    # Knowledge distillation (Hinton et al. 2015) for torch classifiers: a trained classifier bundle or run folder
    # (any family with class probabilities: linear, ensemble, a torch classifier) whose probabilities on the
    # training texts become soft targets. The loss is (1 - distill_weight) x the model's own loss + distill_weight x
    # T^2 x KL(teacher at T || student at T), T = distill_temperature (the teacher's probabilities p become
    # p^(1/T), renormalised). The teacher must hold out the same development split (checked at the start).
    # A list of K runs is a cross-fitted teacher: run i was trained with data.crossfit_fold {folds: K, fold: i}
    # (checked), and gives the soft targets of the examples of fold i, which it never saw.
    distill_from: str | list[str] | None = None
    distill_weight: float = Field(0.5, gt=0.0, le=1.0)
    distill_temperature: float = Field(2.0, gt=0.0, le=100.0)
    # Supervised contrastive learning (Khosla et al. 2020) for torch classifiers: contrastive_weight x the SupCon
    # loss on the unit vectors the classification head reads is added to the model's loss; an example's positives
    # are the rows of its label in the batch and in a queue of the last contrastive_queue rows' vectors (a batch of
    # 64 over 151 intents holds few pairs of one label). 0 = off. It shapes the space whose nearest-neighbour
    # distances score out-of-scope text (benchmarks/clinc150_oos_scores.py).
    contrastive_weight: float = Field(0.0, ge=0.0, le=100.0)
    contrastive_temperature: float = Field(0.1, gt=0.0, le=10.0)
    contrastive_queue: int = Field(4096, ge=0, le=1_000_000)
    # Subword regularization (Kudo 2018) for torch models on a SentencePiece tokenizer: every epoch the training
    # texts are segmented afresh by sampling SentencePiece's segmentations (unigram: from the lattice, smoothed by
    # subword_alpha, smaller = more varied; BPE: BPE-dropout with probability subword_alpha), over the subword_nbest
    # best ones (-1: all). 0 = off: the one best segmentation, as validation, evaluation and serving always use.
    subword_alpha: float = Field(0.0, ge=0.0, le=1.0)
    subword_nbest: int = Field(-1, ge=-1, le=1000)


class OutputConfig(_Strict):
    dir: str = "runs"
    run_name: str | None = None


class TrackingConfig(_Strict):
    """MLflow tracking; ``tracking_uri`` None means MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db."""

    enabled: bool = True
    tracking_uri: str | None = Field(None, description="any MLflow tracking URI; env MLFLOW_TRACKING_URI wins")
    experiment: str | None = Field(None, description="MLflow experiment name; default: the config's name")
    artifact_location: str | None = Field(None, description="where a new experiment stores artifacts")
    log_bundle: bool = Field(True, description="upload the bundle folder as a run artifact")


class OOSConfig(_Strict):
    """Out-of-scope handling for intent classifiers (Larson et al. 2019, section 4).

    ``train``: ``label`` is an ordinary class (oos-train; the data's oos examples train it).
    ``threshold``: also predict ``label`` when the best in-scope probability is below a threshold,
    chosen on the validation split (in-scope accuracy + OOS recall) unless ``threshold`` is given.
    ``binary``: a separate in-scope vs ``label`` TF-IDF classifier runs first; the intent model is
    trained on in-scope examples only.
    ``scorer``: a logistic regression over the model's confidences (per kind of member for an
    ensemble) and the text's TF-IDF similarity to its intent's training examples, fitted on the
    validation split, answers ``label`` when its P(oos) reaches a threshold chosen there
    (``threshold`` fixes it instead); see chatforge.oos_scorer.
    """

    policy: Literal["train", "threshold", "binary", "scorer"] = "train"
    label: str = Field("oos", min_length=1)
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="fixed threshold instead of choosing one")
    # policies threshold and scorer: only thresholds losing at most this much validation in-scope accuracy (a fraction,
    # e.g. 0.005) are candidates (chatforge.evaluation.metrics.choose_oos_threshold); None: the paper's criterion.
    max_in_scope_drop: float | None = Field(None, ge=0.0, le=1.0)


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # NumPy's seed range; torch's sampler seeds seed + epoch, which overflowed mid-run for seeds near 2**64
    seed: int = Field(0, ge=0, le=2**32 - 1)
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    oos: OOSConfig = Field(default_factory=OOSConfig)

    @model_validator(mode="after")
    def _context(self) -> ExperimentConfig:
        if self.train.monitor == "valid_chrf" and self.model.task != "generation":
            raise ValueError(f"train.monitor='valid_chrf' scores generated replies; task {self.model.task!r} "
                             "generates none: use 'valid_loss'")
        if self.data.context_turns and self.model.task != "generation":
            raise ValueError(f"data.context_turns={self.data.context_turns}: earlier turns are read by generation "
                             f"models only (task 'generation'), not task {self.model.task!r}; set it to 0")
        if self.data.outliers is not None:
            if self.model.spec.kind != "torch":
                raise ValueError(f"data.outliers is outlier exposure for torch classifiers; family "
                                 f"{self.model.family!r} is not one (the linear baseline takes model.outliers)")
            if self.model.task != "classification":
                raise ValueError(f"data.outliers is outlier exposure for task 'classification', not "
                                 f"{self.model.task!r}; remove it")
        if self.data.unlabelled is not None and self.model.task not in UNLABELLED_TASKS:
            raise ValueError(f"data.unlabelled adds text to self-supervised pre-training (task "
                             f"{' or '.join(map(repr, UNLABELLED_TASKS))}); task {self.model.task!r} "
                             "learns from labelled examples: remove it (outlier exposure is data.outliers)")
        if self.train.contrastive_weight > 0 and (self.model.spec.kind != "torch"
                                                  or self.model.task != "classification"):
            raise ValueError(f"train.contrastive_weight trains the feature space of a torch classifier; family "
                             f"{self.model.family!r} with task {self.model.task!r} is not one (families: the torch "
                             "ones, task 'classification'); set it to 0")
        if self.train.subword_alpha > 0:
            if self.tokenizer.kind != "sentencepiece":
                raise ValueError(f"train.subword_alpha={self.train.subword_alpha} samples SentencePiece segmentations; "
                                 f"tokenizer.kind {self.tokenizer.kind!r} has one segmentation per text: set it to 0 "
                                 "or use tokenizer.kind 'sentencepiece'")
            if self.model.spec.kind != "torch":
                raise ValueError(f"train.subword_alpha re-segments the training texts of torch models each epoch; "
                                 f"family {self.model.family!r} is not one (families: the torch ones): set it to 0")
        if self.train.subword_nbest in (0, 1) and self.train.subword_alpha > 0:
            raise ValueError(f"train.subword_nbest={self.train.subword_nbest} leaves nothing to sample from; use -1 "
                             "(every segmentation) or at least 2")
        if self.train.distill_from is not None:
            if isinstance(self.train.distill_from, list) and len(self.train.distill_from) < 2:
                raise ValueError(f"train.distill_from: a list names one run per cross-fitting fold and needs at "
                                 f"least 2, got {self.train.distill_from}; give a single run as a string")
            if isinstance(self.train.distill_from, list) and self.data.crossfit_fold is not None:
                raise ValueError("train.distill_from (a cross-fitted teacher) gives soft targets for every training "
                                 "example; this run leaves a fold out itself (data.crossfit_fold): remove one")
            if self.model.spec.kind != "torch" or self.model.task != "classification":
                raise ValueError(f"train.distill_from distils a classifier into a torch classifier; family "
                                 f"{self.model.family!r} with task {self.model.task!r} is not one (families: "
                                 f"the torch ones, task 'classification')")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def resolved_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the model section resolved too: the family's every key, defaults filled in (the
        model section otherwise keeps the keys as written, and the family config fills the rest when built).
        What ``chatforge config check`` prints; it validates back to the same configuration."""
        from pydantic import TypeAdapter

        out = self.to_dict()
        family_config = self.model.family_config()
        if family_config is not None:
            keys = TypeAdapter(type(family_config)).dump_python(family_config, mode="json")
            written = out["model"]
            out["model"] = {**{k: written[k] for k in ("family", "task", "init_from") if k in written}, **keys,
                            **{k: v for k, v in written.items() if k not in keys}}
        return out

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section (it is {child!r})")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (``3`` -> int, ``true`` -> bool)."""
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_path(tree, key, _override_value(item, raw))
    return tree


def _override_value(item: str, raw: str) -> Any:
    """The value of ``key=raw`` parsed as YAML; one line naming the override when it is not YAML."""
    if raw == "":
        return None
    try:
        return _yaml_value(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        key = item.split("=", 1)[0].strip()
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); to pass it as text, quote "
                          f"it for YAML: --set \"{key}='...'\"") from None


def _allowed_keys(model_cls: type[BaseModel] | None) -> str:
    if model_cls is None:
        return ""
    return ", ".join(model_cls.model_fields)


_SECTIONS: dict[str, type[BaseModel]] = {
    "": ExperimentConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "train": TrainConfig,
    "output": OutputConfig,
    "tracking": TrackingConfig,
    "oos": OOSConfig,
}


def _format_errors(err: ValidationError, source: str, tree: dict[str, Any]) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in e["loc"][:-1])
            allowed = _allowed_keys(_SECTIONS.get(section))
            lines.append(f"  {loc}: unknown key; allowed keys here: {allowed}")
            continue
        if e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
            continue
        shown = e.get("input")
        if isinstance(shown, dict) or type(shown).__name__ == "ArgsKwargs":
            value = ""
        elif shown is None:  # written as null (or ~, or nothing after the colon) where a value is needed
            value = " (got null)"
        else:
            value = f" (got {shown!r})"
        msg = _plain_message(msg)
        if loc == "model" and msg.startswith(("model: ", "model.")):  # a family's own errors name their keys
            lines.append(f"  {msg}{value}")
            continue
        lines.append(f"  {loc}: {msg}{value}")
    return "\n".join(lines)


def validate_config(tree: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(tree).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, tree)) from None
    problems = _booleans_read_as_numbers(tree, cfg)
    if problems:
        lines = [f"{source}: invalid configuration ({len(problems)} problem(s)):"]
        lines += [f"  {key}: expected a number, got {raw} (a YAML boolean; YAML also reads yes/no/on/off as "
                  f"booleans)" for key, raw in problems]
        raise ConfigError("\n".join(lines))
    return cfg


def _booleans_read_as_numbers(tree: dict[str, Any], cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Keys written as a YAML boolean whose validated value is a number.

    pydantic's lax mode turns ``true`` into 1 for an int or float field, so ``train.epochs: true`` would train one
    epoch. Checked on the validated object rather than per field type, so every section and every family's own
    keys (``model.d_model: yes``) are covered by one rule."""
    found: list[tuple[str, str]] = []

    def child(obj: Any, key: Any) -> Any:
        if isinstance(obj, dict):
            return obj.get(key)
        if isinstance(obj, (list, tuple)):
            return obj[key] if isinstance(key, int) and 0 <= key < len(obj) else None
        return getattr(obj, key, None) if isinstance(key, str) else None

    def walk(raw: Any, obj: Any, path: list[str]) -> None:
        items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
        for key, value in items:
            if obj is cfg.model and key not in ("family", "task", "init_from"):
                sub = child(cfg.model.family_config(), key)
            else:
                sub = child(obj, key)
            here = [*path, str(key)]
            if isinstance(value, bool):
                if isinstance(sub, (int, float)) and not isinstance(sub, bool):
                    found.append((".".join(here), "true" if value else "false"))
            elif isinstance(value, (dict, list)) and sub is not None:
                walk(value, sub, here)

    walk(tree, cfg, [])
    return found


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one, silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' then a key of its own overrides on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first on line {seen[key] + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.1 (PyYAML) needs a dot in a float, so `batch_size: 1e9` or `lr: 1e-3` arrive as the text "1e9"; YAML 1.2
# and every other reader take them as numbers. Read them as floats here, so they are checked as the numbers they are
# (an int key takes 1e3 as 1000; 1e9 is refused by the key's range, not as "not a valid integer").
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """YAML as chatforge reads every file it is given (configs, sweep spaces, reply policies, ``--set`` values): a key
    given twice is refused, and ``1e-3`` is a number. Raises ``yaml.YAMLError`` like ``yaml.safe_load``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _yaml_value(raw: str) -> Any:
    """One ``--set`` value, read as the config file's own values are (same loader)."""
    return read_yaml(raw)


def yaml_error_line(path: Path, e: yaml.YAMLError) -> str:
    """One line: file:line:column and the problem, not PyYAML's multi-line report of a '<unicode string>'."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(path, e)) from None
    return validate_config(apply_overrides(tree, overrides), source=str(path))
