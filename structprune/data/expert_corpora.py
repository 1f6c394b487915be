"""Readers of the expert corpora: text for pruning a language model into a language or a domain expert.

XQuAD (``MULTILINGUAL/``: the same 48 Wikipedia articles in 12 languages) split by article into calibration
and held-out text, and PubMedQA PQA-L (``DOMAIN_BIOMED/``): its abstracts as perplexity text and its
yes/no/maybe test questions. Readers only: the tasks (``xquad-<lang>``, ``pubmed``, ``pubmedqa``) are
registered in :mod:`structprune.data.lm`, which imports this module when one of them is first read.
"""

from __future__ import annotations

from pathlib import Path

from structprune.data.lm import MultipleChoice, _field, _json_file, _malformed

XQUAD_ARTICLES = 48
XQUAD_ORDER = (24, 26, 2, 16, 32, 31, 25, 19, 30, 22, 37, 13, 43, 8, 18, 34, 6, 40, 41, 35, 17, 38, 29, 39,
               4, 9, 3, 45, 10, 15, 27, 21, 11, 42, 5, 46, 47, 44, 28, 7, 12, 14, 23, 20, 0, 36, 33, 1)
"""``random.Random(0).sample(range(48), 48)`` (CPython 3.11), written out because :mod:`random` does not promise
that ``sample`` stays the same across Python versions. Its first 24 article indices are the validation
(calibration) articles, its last 24 the test articles; the same in every language (the files are parallel)."""
XQUAD_SPLITS = {"validation": tuple(sorted(XQUAD_ORDER[:24])), "test": tuple(sorted(XQUAD_ORDER[24:]))}
"""The article indices (file order) of each XQuAD split."""

PUBMEDQA_CHOICES = ("yes", "no", "maybe")


# --------------------------------------------------------------------------------------------- XQuAD

def xquad_paragraphs(path: Path) -> list[list[str]]:
    """The paragraph contexts of each article of a SQuAD v1.1 JSON file (48 articles, in file order)."""
    data = _json_file(path)
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise _malformed(str(path), "expected a SQuAD v1.1 object with a 'data' list of articles")
    if len(articles) != XQUAD_ARTICLES:
        raise _malformed(str(path), f"{len(articles)} articles; XQuAD has {XQUAD_ARTICLES} (the split is by article)")
    out = []
    for a, article in enumerate(articles):
        where = f"{path} article {a}"
        if not isinstance(article, dict):
            raise _malformed(where, f"expected an object, found {type(article).__name__}")
        contexts = []
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            if not isinstance(paragraph, dict):
                raise _malformed(f"{where} paragraph {p}", f"expected an object, found {type(paragraph).__name__}")
            contexts.append(_field(paragraph, "context", str, f"{where} paragraph {p}"))
        out.append(contexts)
    return out


def xquad(folder: Path, split: str, language: str) -> str:
    """The contexts of the split's articles (:data:`XQUAD_SPLITS`), in file order, joined by ``"\\n\\n"``."""
    articles = xquad_paragraphs(folder / f"xquad.{language}.json")
    return "\n\n".join(context for a in XQUAD_SPLITS[split] for context in articles[a])


# --------------------------------------------------------------------------------------------- PubMedQA

def pubmedqa_items(folder: Path) -> tuple[dict[str, dict], dict[str, str], Path]:
    """``ori_pqal.json`` (PMID -> item), ``test_ground_truth.json`` (test PMID -> answer) and the former's path."""
    path, truth_path = folder / "ori_pqal.json", folder / "test_ground_truth.json"
    items, truth = _json_file(path), _json_file(truth_path)
    if not isinstance(items, dict) or not all(isinstance(item, dict) for item in items.values()):
        raise _malformed(str(path), "expected an object of PMID -> item objects")
    if not isinstance(truth, dict):
        raise _malformed(str(truth_path), "expected an object of PMID -> 'yes' / 'no' / 'maybe'")
    for pmid, answer in truth.items():
        if answer not in PUBMEDQA_CHOICES:
            raise _malformed(f"{truth_path} PMID {pmid}", f"answer {answer!r} is not 'yes', 'no' or 'maybe'")
        if pmid not in items:
            raise _malformed(f"{truth_path} PMID {pmid}", f"not a PMID of {path.name}")
    return items, truth, path


def _contexts(item: dict, where: str) -> list[str]:
    contexts = _field(item, "CONTEXTS", list, where)
    if not contexts or not all(isinstance(c, str) for c in contexts):
        raise _malformed(where, "'CONTEXTS' should be a non-empty list of strings")
    return contexts


def pubmed(folder: Path, split: str) -> str:
    """Abstracts, ``" ".join(CONTEXTS) + " " + LONG_ANSWER``, joined by ``"\\n\\n"`` in ori_pqal.json order: test
    the 500 PMIDs of test_ground_truth.json, validation the other 500."""
    items, truth, path = pubmedqa_items(folder)
    abstracts = []
    for pmid, item in items.items():
        if (pmid in truth) == (split == "test"):
            where = f"{path} PMID {pmid}"
            abstracts.append(" ".join(_contexts(item, where)) + " " + _field(item, "LONG_ANSWER", str, where))
    return "\n\n".join(abstracts)


def pubmedqa(folder: Path, split: str = "test") -> list[MultipleChoice]:
    """The 500 test items in ori_pqal.json order, lm-eval's ``pubmedqa`` prompt: ``"Abstract: {CONTEXTS joined by
    \\n}\\nQuestion: {QUESTION}\\nAnswer:"`` + ``" yes"`` / ``" no"`` / ``" maybe"``; gold from
    test_ground_truth.json, which must agree with the item's ``final_decision``."""
    items, truth, path = pubmedqa_items(folder)
    out = []
    for pmid, item in items.items():
        if pmid not in truth:
            continue
        where = f"{path} PMID {pmid}"
        if _field(item, "final_decision", str, where) != truth[pmid]:
            raise _malformed(where, f"final_decision {item['final_decision']!r} disagrees with test_ground_truth.json "
                                    f"({truth[pmid]!r})")
        abstract, question = "\n".join(_contexts(item, where)), _field(item, "QUESTION", str, where)
        out.append(MultipleChoice(f"Abstract: {abstract}\nQuestion: {question}\nAnswer:", PUBMEDQA_CHOICES,
                                  PUBMEDQA_CHOICES.index(truth[pmid]), where))
    return out
