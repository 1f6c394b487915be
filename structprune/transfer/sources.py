"""Auxiliary sources of the ``transfer`` method: parsing, loading, deduplication against the target, MLM
masking, and the auxiliary output heads.

An auxiliary *source* (:class:`AuxSource`, :func:`parse_aux` reads ``--aux``) is either

* a labelled task of :mod:`structprune.data` (``sst2``, ``mnli``, ``snli``, ``sick``, ``qqp``,
  ``agnews``, ``vader-movies``, ...), read from its ``train`` split when it has one, else from its
  first split that is not the target's evaluation data (``mnli``, ``snli``, ``qnli``: ``dev``), or
  rows the caller loaded (``AuxSource(name, data=load_file(...))``); each gets its own
  classification head (:func:`classification_head`);
* ``"mlm"``: masked-language modelling on the target task's own training text, with an MLM head
  whose decoder is the model's input word embedding matrix (:class:`MLMHead`, tied, as in BERT).

:func:`load_auxiliary` loads and encodes every source. **Deduplication**: a labelled auxiliary example is
dropped when any of its sentences (``text_a``, and ``text_b`` for pairs), normalised (:func:`normalise`:
lower-cased, punctuation removed, whitespace collapsed), occurs as a sentence of the target's evaluation
splits or of the target's training rows; the MLM text (the target's training rows themselves) is checked
against the evaluation splits. The removed counts are reported per source. Matching is per sentence, so an
auxiliary pair that shares one sentence with a test pair is dropped. Punctuation is dropped because copies
differ in it (SICK's sentences are STS-B's without the final period; SNLI's files are tokenised, "sleeping ."
for "sleeping."). Empty texts never match.

Then each source is capped at ``max_examples`` rows drawn with the seed (:meth:`TaskData.subset`).

**Batches** (:meth:`AuxData.draw`) are drawn without replacement from a caller's generator, so a
training step seeded by ``(seed, step, micro-batch)`` draws the same rows after a resume. MLM
batches are masked at draw time (dynamic masking, :func:`mask_tokens`): 15% of the real,
non-special tokens are chosen; of those 80% become the mask token, 10% a random token and 10% stay.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from structprune.data import (
    TaskData,
    TaskSpec,
    encode,
    get_task,
    is_task_file,
    load_file,
    load_task,
)
from structprune.modeling_structprune import ClassificationHead, activation
from structprune.transfer.config import config_from_options

MLM = "mlm"
"""The name of the masked-language-modelling source."""
DEFAULT_MAX_EXAMPLES = 8000
MASK_PROBABILITY = 0.15
IGNORE_INDEX = -100
"""Label of the positions the MLM loss ignores (not chosen for masking)."""


@dataclass(frozen=True)
class AuxSource:
    """One auxiliary source: a task name (or :data:`MLM`), its loss weight and its row cap.

    ``data``: rows already loaded (e.g. a user's file via :func:`structprune.data.load_file`),
    used instead of looking ``name`` up in the task registry.
    """

    name: str
    weight: float = 1.0
    max_examples: int = DEFAULT_MAX_EXAMPLES
    data: TaskData | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("an auxiliary source needs a name: a task of structprune.data or 'mlm'")
        if isinstance(self.weight, bool) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"auxiliary source {self.name!r}: weight must be a finite number >= 0, "
                             f"got {self.weight!r}")
        if self.max_examples < 1:
            raise ValueError(f"auxiliary source {self.name!r}: max_examples must be >= 1, got {self.max_examples}")
        if self.data is not None and (self.data.labels is None or len(self.data) == 0):
            raise ValueError(f"auxiliary source {self.name!r}: its data must be labelled and non-empty")
        if self.data is None and self.name != MLM and not is_file_source(self):
            get_task(self.name)  # unknown names fail here, listing the known tasks


def parse_aux(text: str, max_examples: int = DEFAULT_MAX_EXAMPLES) -> list[AuxSource]:
    """Sources from ``"mnli:1.0,sst2:0.5,mlm"`` (a missing weight is 1). Task files (``.csv``, ``.tsv``,
    ``.jsonl``) are returned by name; the caller loads them (``AuxSource(path, data=...)``)."""
    sources, seen = [], set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                name, weight = head.strip(), float(tail)
            except ValueError:
                raise ValueError(f"auxiliary source {item!r}: the weight after ':' must be a number, "
                                 "e.g. 'mnli:0.5'") from None
        if name.lower() in seen:
            raise ValueError(f"auxiliary source {name!r} is listed twice; give each source once with its weight")
        seen.add(name.lower())
        sources.append(AuxSource(MLM if name.lower() == MLM else name, weight, max_examples))
    if not sources:
        raise ValueError(f"no auxiliary source in {text!r}; list tasks such as 'mnli,snli:0.5' or 'mlm'")
    return sources


def is_file_source(source: AuxSource) -> bool:
    """Whether ``source`` names a task file (``.csv``, ``.tsv``, ``.jsonl``) rather than a registered task."""
    return is_task_file(source.name)


def aux_sources(text: str | None, max_examples: int | None = None, text_columns: Sequence[str] = ("sentence",),
                label_column: str = "label") -> tuple[AuxSource, ...]:
    """The sources of ``--aux`` (:func:`parse_aux`), task files loaded with the target's columns."""
    if not text:
        raise ValueError("the transfer method needs auxiliary sources: --aux TASK[:WEIGHT],... (e.g. --aux mnli,mlm)")
    sources = parse_aux(text, DEFAULT_MAX_EXAMPLES if max_examples is None else max_examples)
    return tuple(dataclasses.replace(source, data=load_file(source.name, text_columns=list(text_columns),
                                                            label_column=label_column, name=Path(source.name).stem))
                 if is_file_source(source) else source for source in sources)


def method_inputs(options: Mapping[str, object], train: TaskData, target_eval: Sequence[TaskData], tokenizer, *,
                  max_length: int = 128, data_dir: str | None = None, text_columns: Sequence[str] = ("sentence",),
                  label_column: str = "label") -> tuple[dict, dict, dict]:
    """The ``transfer`` method's command-line options with ``aux`` loaded (the registry's inputs builder).

    Returns (the options for :func:`structprune.transfer.prune`, report entries, log entries): the sources are
    loaded and deduplicated here, so a bad source fails before any training.
    """
    options = dict(options)
    sources = aux_sources(options.pop("aux", None), options.pop("aux_max_examples", None), text_columns, label_column)
    config = config_from_options(options)  # for the report; the CLI checked the settings before any work
    seed = options.get("seed", 0)
    aux, dedup = load_auxiliary(sources, train, target_eval, tokenizer, max_length, seed, data_dir)
    for name, counts in dedup.items():
        print(f"[transfer] {name}: {counts['kept']} examples from {counts['split']}, {counts['removed']} removed as "
              "duplicates of the target's data", flush=True)
    used = "; ".join(f"{s.name} (weight {s.weight:g}, {dedup[s.name]['split']} split: {dedup[s.name]['kept']} "
                     f"examples used, {dedup[s.name]['removed']} removed as duplicates of target sentences)"
                     for s in sources)
    setup = {"auxiliary": f"{used}. Coupling {config.coupling}, transfer {config.transfer}, schedule "
                          f"{config.schedule}, aux weight {config.aux_weight:g}, guard {config.guard}"}
    return options | {"aux": aux}, setup, {"aux_dedup": dedup}


@dataclass
class AuxData:
    """One encoded auxiliary source: its tensors (``encoded``, from :func:`structprune.data.encode`), its task
    (``None`` for MLM), weight and name.

    Labelled sources hold ``labels``; MLM holds ``special_tokens_mask`` instead (tokens never masked)
    and needs ``mask_token_id`` and ``vocab_size`` (range of the random replacement tokens).
    """

    name: str
    weight: float
    encoded: dict[str, torch.Tensor]
    task: TaskSpec | None
    mask_token_id: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.task is None and (self.mask_token_id is None or self.vocab_size is None
                                  or "special_tokens_mask" not in self.encoded):
            raise ValueError(f"auxiliary source {self.name!r}: MLM data needs special_tokens_mask, mask_token_id "
                             "and vocab_size")
        if self.task is not None and "labels" not in self.encoded:
            raise ValueError(f"auxiliary source {self.name!r}: labelled data needs labels")

    @property
    def is_mlm(self) -> bool:
        return self.task is None

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def draw(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        """``size`` rows (all of them if fewer) drawn without replacement with ``generator``; MLM rows come
        masked, with ``labels`` = the original token where masked, :data:`IGNORE_INDEX` elsewhere."""
        rows = torch.randperm(len(self), generator=generator)[:size]
        batch = {name: t[rows] for name, t in self.encoded.items()}
        if self.is_mlm:
            special = batch.pop("special_tokens_mask").bool()
            maskable = batch["attention_mask"].bool() & ~special
            batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], maskable, self.mask_token_id,
                                                              self.vocab_size, generator)
        return batch


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, vocab_size: int,
                generator: torch.Generator, probability: float = MASK_PROBABILITY
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each ``maskable`` token is chosen with ``probability``; a chosen token becomes
    ``mask_token_id`` (80%), a uniformly random token (10%) or stays (10%). Returns (inputs, labels)."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    how = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, labels


def normalise(text: str) -> str:
    """The form texts are compared in: lower-case, punctuation removed, runs of whitespace as one space."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def sentences(data: Iterable[TaskData]) -> set[str]:
    """Every normalised, non-empty sentence (``text_a`` and ``text_b``) of ``data``."""
    out = set()
    for part in data:
        for texts in (part.text_a, part.text_b or []):
            out.update(normalise(t) for t in texts)
    out.discard("")
    return out


def deduplicate(data: TaskData, against: set[str]) -> tuple[TaskData, int]:
    """``data`` without the examples any of whose sentences is in ``against`` (see :func:`sentences`),
    and how many were removed."""
    pairs = zip(data.text_a, data.text_b or [None] * len(data))
    keep = [i for i, (a, b) in enumerate(pairs)
            if normalise(a) not in against and (b is None or normalise(b) not in against)]
    return data.select(keep), len(data) - len(keep)


def auxiliary_split(spec: TaskSpec, target: TaskSpec) -> str:
    """The split an auxiliary task is read from: ``train`` when it has one, else its first split that
    is not the target's evaluation data (a split of the same dataset folder other than train)."""
    if spec.name == target.name:
        raise ValueError(f"auxiliary source {spec.name!r} is the target task itself; use 'mlm' to train on the "
                         "target's own text, or choose another task")
    if "train" in spec.splits:
        return "train"
    if spec.source == target.source:  # another view of the target's data set: its splits are the target's
        raise ValueError(f"auxiliary task {spec.name!r} has no usable split: it has no train split and its splits "
                         f"{list(spec.splits)} are evaluation data of the target {target.name!r}")
    return spec.splits[0]


def load_auxiliary(sources: Sequence[AuxSource], target: TaskData, target_eval: Sequence[TaskData], tokenizer,
                   max_length: int = 128, seed: int = 0, data_dir: str | None = None
                   ) -> tuple[list[AuxData], dict[str, dict]]:
    """Load, deduplicate, cap and encode every source (see the module docstring).

    Args:
        target: the target task's training rows (the MLM text, and a deduplication reference).
        target_eval: every evaluation split of the target (deduplication reference).
        data_dir: where the benchmark data sets are (:func:`structprune.data.resolve_data_dir`).

    Returns:
        the encoded sources, and the report ``{source: {"split", "kept", "removed"}}``.
    """
    if not sources:
        raise ValueError("no auxiliary sources given; name at least one task or 'mlm'")
    held_out = sentences(target_eval)
    seen_target = held_out | sentences([target])
    loaded, report = [], {}
    for source in sources:
        if is_file_source(source) and source.data is None:
            raise ValueError(f"auxiliary file {source.name!r} was not loaded; pass "
                             "AuxSource(name, data=load_file(...))")
        if source.name == MLM:
            rows, removed = deduplicate(target, held_out)
            split = target.split
        else:
            if source.data is not None:
                data, split = source.data, source.data.split
            else:
                split = auxiliary_split(get_task(source.name), target.task)
                data = load_task(source.name, split, data_dir=data_dir)
            rows, removed = deduplicate(data, seen_target)
        if len(rows) == 0:
            raise ValueError(f"auxiliary source {source.name!r} has no examples left after removing {removed} that "
                             "occur in the target's training or evaluation data; drop this source")
        if len(rows) > source.max_examples:
            rows = rows.subset(source.max_examples, seed)
        report[source.name] = {"split": split, "kept": len(rows), "removed": removed}
        loaded.append(_encode(source, rows, tokenizer, max_length))
    return loaded, report


def _encode(source: AuxSource, rows: TaskData, tokenizer, max_length: int) -> AuxData:
    tensors = encode(rows, tokenizer, max_length)
    if source.name != MLM:
        return AuxData(source.name, source.weight, tensors, rows.task)
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token, which the 'mlm' auxiliary source needs; drop 'mlm' or "
                         "use a tokenizer with a mask token (BERT-style models)")
    tensors.pop("labels", None)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=tensors["input_ids"].dtype)
    tensors["special_tokens_mask"] = torch.isin(tensors["input_ids"], special)
    return AuxData(MLM, source.weight, tensors, None, tokenizer.mask_token_id, len(tokenizer))


def _init_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    """The models' own initialisation (normal, std 0.02; zero bias), from ``generator``."""
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.02)
        if linear.bias is not None:
            linear.bias.zero_()


def classification_head(spec: Mapping, num_labels: int, generator: torch.Generator) -> ClassificationHead:
    """A freshly initialised head of the model's own kind (``spec``) for a task of ``num_labels`` outputs;
    it reads the encoder's final states exactly as the model's head does."""
    head = ClassificationHead({**spec, "num_labels": num_labels})
    for module in head.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module, generator)
    return head


class MLMHead(nn.Module):
    """BERT's MLM head: dense + activation + LayerNorm, then a decoder tied to the input word embeddings
    (their matrix transposed, plus a bias of its own). The embedding module is referenced, not owned: it
    stays the model's parameter (and out of this head's state dict)."""

    def __init__(self, spec: Mapping, word: nn.Embedding, generator: torch.Generator):
        super().__init__()
        width = word.embedding_dim
        self.dense = nn.Linear(spec["hidden_size"], width)
        self.act = activation(spec["activation"])
        self.norm = nn.LayerNorm(width, eps=spec["norm_eps"])
        self.bias = nn.Parameter(torch.zeros(word.num_embeddings))
        self.__dict__["word"] = word  # not a submodule: the model owns it
        _init_linear(self.dense, generator)

    @property
    def decoder_weight(self) -> nn.Parameter:
        """The decoder's ``[vocab, width]`` matrix: the model's word embedding parameter itself."""
        return self.word.weight

    def forward(self, hidden: torch.Tensor, detached: bool = False) -> torch.Tensor:
        """Vocabulary logits ``[..., vocab]`` of hidden states ``[..., hidden]``; ``detached``: the decoder reads
        the embedding matrix detached, so that only the head's own parameters learn from these logits."""
        h = self.norm(self.act(self.dense(hidden)))
        decoder = self.decoder_weight.detach() if detached else self.decoder_weight
        return h @ decoder.t() + self.bias
