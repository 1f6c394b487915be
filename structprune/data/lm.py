"""Language-model evaluation data: perplexity corpora and zero-shot sets, read from the staged files.

:data:`LM_TASKS` holds one :class:`LMTask` per built-in name; ``text:FILE`` names any UTF-8 text file.
Kinds: ``perplexity`` (:func:`load_text` gives one string), ``multiple_choice`` (:func:`load_items` gives
:class:`MultipleChoice` items, scored by acc / acc_norm) and ``last_word`` (:class:`Completion` items,
LAMBADA). Prompts follow lm-evaluation-harness (0.4) task configs as far as the staged files allow; each
task's ``description`` says where its file differs from lm-eval's source (see each folder's SOURCE.txt).
The ``gensim-*`` corpora ship with the ``gensim`` wheel and need no data folder (CI, demos).
Expert corpora (``xquad-<lang>``, ``pubmed``, ``pubmedqa``) are read by :mod:`structprune.data.expert_corpora`.
"""

from __future__ import annotations

import bz2
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from structprune.data.readers import read_lines
from structprune.data.root import DATA_DIR_ENV, resolve_data_dir

PERPLEXITY, MULTIPLE_CHOICE, LAST_WORD = "perplexity", "multiple_choice", "last_word"
LM_KINDS = (PERPLEXITY, MULTIPLE_CHOICE, LAST_WORD)
TEXT_PREFIX = "text:"
GENSIM = "gensim"
"""``LMTask.folder`` of the corpora read from the installed gensim package's test data."""


@dataclass(frozen=True)
class MultipleChoice:
    """One zero-shot item; :meth:`requests` gives the (context, continuation) pairs to score.

    Usually every choice continues ``context`` (after ``delimiter``). With ``partial`` set (WinoGrande's
    partial scoring) each choice is a context of its own and all share the continuation ``partial``.
    acc_norm divides by ``len(choice)`` in characters, as lm-eval does.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    source: str
    partial: str | None = None
    delimiter: str = " "

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or not 0 <= self.gold < len(self.choices):
            raise ValueError(f"{self.source}: {len(self.choices)} choices and gold index {self.gold}; an item needs "
                             "at least 2 choices and a gold index among them")

    def requests(self) -> list[tuple[str, str]]:
        if self.partial is None:
            return [(self.context, self.delimiter + choice) for choice in self.choices]
        return [(choice, self.delimiter + self.partial) for choice in self.choices]


@dataclass(frozen=True)
class Completion:
    """A context and the continuation to predict (LAMBADA: ``" " + last word``)."""

    context: str
    continuation: str
    source: str


@dataclass(frozen=True)
class LMTask:
    """A language-model task: kind, metrics (the first is the main one), splits (the first is reported), the
    split used as calibration text (``None``: the task has none), the data folder it reads, and a description
    that states the prompt and the staged file's differences from lm-eval."""

    name: str
    kind: str
    metrics: tuple[str, ...]
    splits: tuple[str, ...]
    calibration: str | None
    folder: str | None
    description: str
    read: Callable[[Path, str], str | list] = field(repr=False, compare=False)


def _malformed(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}; the file is not in the staged format its SOURCE.txt describes "
                      "(re-copy it from the data folder)")


def _json_lines(path: Path) -> list[tuple[dict, str]]:
    """The objects of a JSON Lines file, each with its ``file:line``."""
    out = []
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise _malformed(f"{path}:{i}", f"not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise _malformed(f"{path}:{i}", f"expected a JSON object, found {type(obj).__name__}")
        out.append((obj, f"{path}:{i}"))
    return out


def _json_file(path: Path):
    """The parsed content of a JSON file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the {path.parent.name}/ folder of the task data should contain it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise _malformed(f"{path}:{err.lineno}", f"not valid JSON ({err.msg})") from None


def _field(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _malformed(where, f"{key!r} should be a {kind.__name__}, found {value!r}")
    return value


# --------------------------------------------------------------------------------------------- perplexity

def wikitext2(folder: Path, split: str) -> str:
    """The paper string: rows are the file's lines with their ``\\n``, blank lines (``" "``) empty, joined by
    ``"\\n\\n"`` (Hugging Face's ``wikitext-2-raw-v1`` rows, as SparseGPT / Wanda / lm-eval-style scripts join them)."""
    lines = read_lines(folder / {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}[split])
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def text_file(path: Path, split: str = "test") -> str:
    """A user's UTF-8 text file, as is (a byte-order mark dropped)."""
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; text:FILE takes the path of a UTF-8 text file")
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); convert it, e.g. "
                         f"`iconv -f cp1252 -t utf-8 {path.name}`") from None


def gensim_data_dir() -> Path:
    """The test-data folder of the installed gensim package."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the gensim-* corpora are read from the gensim package's test data; "
                                  "`pip install gensim`, or use another task")
    return Path(spec.origin).parent / "test" / "test_data"


def gensim_news(folder: Path, split: str) -> str:
    """The Lee news corpus: 300 background documents (test) or the 50 rated ones (validation), one per line
    (Latin-1: ``lee.cor`` writes the pound sign as byte 0xA3)."""
    return "\n".join(read_lines(folder / {"test": "lee_background.cor", "validation": "lee.cor"}[split], "latin-1"))


WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_wiki(folder: Path, split: str = "test") -> str:
    """The English Wikipedia excerpt: its 106 articles (redirects dropped), markup removed by gensim's
    ``filter_wiki``, bold/italic quotes removed, blank-line runs collapsed; articles joined by ``"\\n\\n"``."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(folder / WIKI_DUMP, "rb") as dump:
        pages = [text for _, text, _ in extract_pages(dump) if not text.lstrip().lower().startswith("#redirect")]
    articles = (re.sub(r"\n\s*\n\s*", "\n\n", filter_wiki(text).replace("'''", "").replace("''", "")) for text in pages)
    return "\n\n".join(article.strip() for article in articles)


# --------------------------------------------------------------------------------------------- multiple choice

def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, ``" [title]"`` -> ``". "``, drop bracket tags, single spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(folder: Path, split: str = "validation") -> list[MultipleChoice]:
    """6 lines per item: ``activity_label: ctx``, the gold index, four endings."""
    path = folder / "hellaswag_val_full.txt"
    lines = read_lines(path)
    if len(lines) % 6:
        raise _malformed(str(path), f"{len(lines)} lines, not a multiple of 6 (6 lines per item)")
    items = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise _malformed(f"{path}:{start + 2}", f"gold index {label!r} is not 0-3")
        endings = tuple(_hellaswag_clean(e) for e in lines[start + 2:start + 6])
        items.append(MultipleChoice(_hellaswag_clean(lines[start]), endings, int(label), f"{path}:{start + 1}"))
    return items


def piqa(folder: Path, split: str = "validation") -> list[MultipleChoice]:
    """``"Question: {goal}\\nAnswer:"``, choices ``sol1`` / ``sol2`` as in the file; gold from valid-labels.lst."""
    path, labels_path = folder / "valid.jsonl", folder / "valid-labels.lst"
    records, labels = _json_lines(path), read_lines(labels_path)
    if len(records) != len(labels):
        raise _malformed(str(labels_path), f"{len(labels)} labels for the {len(records)} items of {path.name}")
    items = []
    for i, ((obj, where), label) in enumerate(zip(records, labels, strict=True), 1):
        if label.strip() not in ("0", "1"):
            raise _malformed(f"{labels_path}:{i}", f"label {label!r} is not 0 or 1")
        goal, sols = _field(obj, "goal", str, where), tuple(_field(obj, k, str, where) for k in ("sol1", "sol2"))
        items.append(MultipleChoice(f"Question: {goal}\nAnswer:", sols, int(label), where))
    return items


ARC_PREFIX = "Please choose the correct answer to the question: "


def _arc_item(text: str, answer: str, where: str) -> MultipleChoice:
    """Stem and choices out of an LLM-Adapters instruction (their count from its ``Answer format:`` line)."""
    body, sep, fmt = text.rpartition("\n\nAnswer format: ")
    count = len(fmt.split("/"))
    if not sep or not body.startswith(ARC_PREFIX) or fmt != "/".join(f"answer{k}" for k in range(1, count + 1)):
        raise _malformed(where, "instruction is not 'Please choose the correct answer to the question: <stem>"
                                "\\n\\nAnswer1: ... AnswerN: ...\\n\\nAnswer format: answer1/.../answerN'")
    stem, sep, rest = body[len(ARC_PREFIX):].partition("\n\nAnswer1: ")
    choices = []
    for k in range(2, count + 1):
        choice, sep2, rest = rest.partition(f" Answer{k}: ")
        if not sep2:
            raise _malformed(where, f"no ' Answer{k}: ' although the answer format lists {count} choices")
        choices.append(choice)
    if not sep or not re.fullmatch(r"answer[1-9]", answer) or int(answer[6:]) > count:
        raise _malformed(where, f"answer {answer!r} is not one of answer1..answer{count}")
    return MultipleChoice(f"Question: {stem}\nAnswer:", (*choices, rest), int(answer[6:]) - 1, where)


def arc(folder: Path, split: str = "test") -> list[MultipleChoice]:
    """``"Question: {stem}\\nAnswer:"``, each choice a continuation (lm-eval ``arc_easy`` / ``arc_challenge``).

    The staged file is LLM-Adapters' instruction text; stem and choices are parsed out of it (3-5 choices).
    """
    path = folder / "test.json"
    data = _json_file(path)
    if not isinstance(data, list):
        raise _malformed(str(path), "expected a JSON array of items")
    items = []
    for i, obj in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(obj, dict):
            raise _malformed(where, f"expected an object, found {type(obj).__name__}")
        items.append(_arc_item(_field(obj, "instruction", str, where), _field(obj, "answer", str, where), where))
    return items


def boolq(folder: Path, split: str = "validation") -> list[MultipleChoice]:
    """``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``no`` / ``yes`` (lm-eval ``boolq``).

    The staged llm-foundry file's query is ``"Passage: {passage}\\nQuestion: {question}?"``; the ``Passage: ``
    prefix is dropped and ``\\nAnswer:`` added. Its questions already end with ``?``.
    """
    items = []
    for obj, where in _json_lines(folder / "boolq.jsonl"):
        query, gold = _field(obj, "query", str, where), _field(obj, "gold", int, where)
        passage, sep, question = query.rpartition("\nQuestion: ")
        if not sep or not passage.startswith("Passage: ") or obj.get("choices") != ["no", "yes"]:
            raise _malformed(where, "expected query 'Passage: ...\\nQuestion: ...' and choices ['no', 'yes']")
        items.append(MultipleChoice(f"{passage.removeprefix('Passage: ')}\nQuestion: {question}\nAnswer:",
                                    ("no", "yes"), gold, where))
    return items


def winogrande(folder: Path, split: str = "validation") -> list[MultipleChoice]:
    """Partial scoring: each option's sentence prefix is a context, the text after the blank the shared
    continuation (lm-eval ``winogrande``). The llm-foundry file already holds those parts."""
    items = []
    for obj, where in _json_lines(folder / "winogrande.jsonl"):
        options = _field(obj, "context_options", list, where)
        if len(options) != 2 or not all(isinstance(o, str) for o in options):
            raise _malformed(where, f"context_options should be 2 strings, found {options!r}")
        continuation = _field(obj, "continuation", str, where).strip()
        items.append(MultipleChoice("", tuple(options), _field(obj, "gold", int, where), where, partial=continuation))
    return items


def openbookqa(folder: Path, split: str = "test") -> list[MultipleChoice]:
    """The question stem as context, each choice a continuation (lm-eval ``openbookqa``), official Main JSONL."""
    items = []
    for obj, where in _json_lines(folder / f"{split}.jsonl"):
        question = _field(obj, "question", dict, where)
        choices = _field(question, "choices", list, where)
        if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise _malformed(where, "every question.choices entry should have a 'text'")
        labels = [c.get("label") for c in choices]
        key = _field(obj, "answerKey", str, where).strip()
        if key not in labels:
            raise _malformed(where, f"answerKey {key!r} is not one of the choice labels {labels}")
        items.append(MultipleChoice(_field(question, "stem", str, where), tuple(c["text"] for c in choices),
                                    labels.index(key), where))
    return items


def lambada(folder: Path, split: str = "test") -> list[Completion]:
    """Context: the text before its last space; target: ``" " + last word`` (lm-eval ``lambada_openai``)."""
    items = []
    for obj, where in _json_lines(folder / "lambada_test.jsonl"):
        context, sep, word = _field(obj, "text", str, where).rpartition(" ")
        if not sep or not context or not word:
            raise _malformed(where, "the text needs a context, a space and a last word")
        items.append(Completion(context, " " + word, where))
    return items


# --------------------------------------------------------------------------------------------- registry

_HS_NOTE = ("llama.cpp's text file (SOURCE.txt): bracket tags already removed and the context is activity_label: "
            "ctx without lm-eval's ctx_b.capitalize(), so scores are close to, not equal to, lm-eval's")


def _task(name, kind, folder, read, description, splits=("validation",), metrics=None, calibration=None) -> LMTask:
    metrics = metrics or {PERPLEXITY: ("perplexity",), MULTIPLE_CHOICE: ("acc", "acc_norm"),
                          LAST_WORD: ("acc", "perplexity")}[kind]
    return LMTask(name, kind, metrics, tuple(splits), calibration, folder, description, read)


def _arc_reader(subset: str) -> Callable[[Path, str], list[MultipleChoice]]:
    return lambda folder, split: arc(folder / subset, split)


def _expert_reader(reader: str, *args) -> Callable[[Path, str], str | list]:
    """A reader of :mod:`structprune.data.expert_corpora`, imported on first read (it imports this module)."""
    def read(folder: Path, split: str) -> str | list:
        from structprune.data import expert_corpora
        return getattr(expert_corpora, reader)(folder, split, *args)
    return read


XQUAD_LANGUAGES = ("en", "ar", "de", "el", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
_XQUAD_SPLIT = ("its 48 articles split by the fixed permutation random.Random(0).sample(range(48), 48) (written out "
                "in expert_corpora.XQUAD_ORDER): first 24 validation (calibration text), last 24 test; the same "
                "articles in every language")


_TABLE = (
    _task("wikitext2", PERPLEXITY, "WIKITEXT2", wikitext2, "WikiText-2 raw test perplexity (validation: calibration "
          "text), the rows joined as the papers do", ("test", "validation"), calibration="validation"),
    _task("gensim-news", PERPLEXITY, GENSIM, gensim_news, "Lee news corpus from the gensim package (test: 300 "
          "background documents, validation: 50 others), for CI and demos", ("test", "validation"),
          calibration="validation"),
    _task("gensim-wiki", PERPLEXITY, GENSIM, gensim_wiki, "106 English Wikipedia articles from the gensim package, "
          "markup removed, for CI and demos", ("test",)),
    _task("hellaswag", MULTIPLE_CHOICE, "HELLASWAG", hellaswag, f"HellaSwag validation, 4 endings; {_HS_NOTE}"),
    _task("piqa", MULTIPLE_CHOICE, "PIQA", piqa, "PIQA validation, 'Question: {goal}\\nAnswer:' + ' {sol}'"),
    _task("arc_easy", MULTIPLE_CHOICE, "ARC", _arc_reader("ARC-Easy"), "ARC-Easy test, 'Question: {stem}\\nAnswer:' "
          "+ ' {choice}'; stem and choices parsed from LLM-Adapters' instruction text", ("test",)),
    _task("arc_challenge", MULTIPLE_CHOICE, "ARC", _arc_reader("ARC-Challenge"), "ARC-Challenge test, 'Question: "
          "{stem}\\nAnswer:' + ' {choice}'; parsed from LLM-Adapters' instruction text", ("test",)),
    _task("boolq", MULTIPLE_CHOICE, "BOOLQ", boolq, "BoolQ validation, '{passage}\\nQuestion: {question}?\\nAnswer:' "
          "+ ' no' / ' yes', rebuilt from llm-foundry's query; majority 'yes' = 62.2%", metrics=("acc",)),
    _task("winogrande", MULTIPLE_CHOICE, "WINOGRANDE", winogrande, "WinoGrande dev, partial scoring (the text after "
          "the blank given each option); llm-foundry's split of the sentences", metrics=("acc",)),
    _task("openbookqa", MULTIPLE_CHOICE, "OPENBOOKQA", openbookqa, "OpenBookQA test, the question stem + ' {choice}'",
          ("test", "validation", "train")),
    _task("lambada", LAST_WORD, "LAMBADA", lambada, "LAMBADA (OpenAI) test: greedy last-word accuracy and target "
          "perplexity, as lm-eval's lambada_openai", ("test",)),
    *(_task(f"xquad-{lang}", PERPLEXITY, "MULTILINGUAL", _expert_reader("xquad", lang), f"XQuAD {lang} perplexity: "
            f"paragraph contexts in file order joined by '\\n\\n'; {_XQUAD_SPLIT}", ("test", "validation"),
            calibration="validation") for lang in XQUAD_LANGUAGES),
    _task("pubmed", PERPLEXITY, "DOMAIN_BIOMED", _expert_reader("pubmed"), "PubMedQA PQA-L abstracts, ' '.join("
          "CONTEXTS) + ' ' + LONG_ANSWER, joined by '\\n\\n' in file order: test the 500 PMIDs of test_ground_truth"
          ".json, validation (calibration text) the other 500", ("test", "validation"), calibration="validation"),
    _task("pubmedqa", MULTIPLE_CHOICE, "DOMAIN_BIOMED", _expert_reader("pubmedqa"), "PubMedQA PQA-L test (500 "
          "PMIDs), 'Abstract: {CONTEXTS joined by \\n}\\nQuestion: {QUESTION}\\nAnswer:' + ' yes' / ' no' / ' maybe'"
          " (lm-eval pubmedqa); gold from test_ground_truth.json", ("test",), metrics=("acc",)),
)
LM_TASKS: Mapping[str, LMTask] = MappingProxyType({task.name: task for task in _TABLE})
"""Every built-in language-model task by name (read-only); ``text:FILE`` is accepted besides."""

_SPLIT_FILES = {"openbookqa": {"validation": "dev"}}


def list_lm_tasks() -> list[str]:
    """The built-in task names, then ``text:FILE``."""
    return [*LM_TASKS, f"{TEXT_PREFIX}FILE"]


def get_lm_task(name: str) -> LMTask:
    """The task ``name`` (case-insensitive) or, for ``text:FILE``, a perplexity task reading that file."""
    if name.startswith(TEXT_PREFIX):
        path = name[len(TEXT_PREFIX):]
        if not path:
            raise ValueError("text:FILE needs a file path after 'text:', e.g. text:notes.txt")
        return LMTask(name, PERPLEXITY, ("perplexity",), ("test",), None, None, f"perplexity of the text of {path}",
                      lambda folder, split: text_file(Path(path).expanduser(), split))
    key = name.strip().lower()
    if key not in LM_TASKS:
        close = difflib.get_close_matches(key, list(LM_TASKS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown language-model task {name!r}.{hint} Known: {', '.join(list_lm_tasks())}")
    return LM_TASKS[key]


def _folder(task: LMTask, data_dir: str | os.PathLike[str] | None) -> Path:
    if task.folder is None:
        return Path()
    if task.folder == GENSIM:
        return gensim_data_dir()
    root = resolve_data_dir(data_dir)
    folder = root / task.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: task {task.name!r} reads the {task.folder}/ folder of the task "
                                f"data folder {root}. Add it there or point data_dir / ${DATA_DIR_ENV} at a folder "
                                "that has it (see the data README, 'Language-model evaluation data').")
    return folder


def _read(name: str, kinds: Sequence[str], split: str | None, data_dir) -> str | list:
    task = get_lm_task(name)
    if task.kind not in kinds:
        loader = "load_text" if task.kind == PERPLEXITY else "load_items"
        raise ValueError(f"task {task.name!r} is a {task.kind} task; read it with {loader}()")
    split = split or task.splits[0]
    if split not in task.splits:
        raise ValueError(f"task {task.name!r} has no split {split!r}; available: {list(task.splits)}")
    return task.read(_folder(task, data_dir), _SPLIT_FILES.get(task.name, {}).get(split, split))


def load_text(name: str, split: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The text of a perplexity task's split (default: the reported one; ``task.calibration`` for calibration)."""
    return _read(name, (PERPLEXITY,), split, data_dir)


def load_items(name: str, split: str | None = None, *,
               data_dir: str | os.PathLike[str] | None = None) -> list[MultipleChoice] | list[Completion]:
    """The items of a multiple-choice or last-word task, in file order."""
    return _read(name, (MULTIPLE_CHOICE, LAST_WORD), split, data_dir)
