"""Tests of structprune.data.lm: each reader on small files in the staged formats (prompts as lm-eval builds
them), malformed files named with file and line, the registry's errors, the gensim corpora, and the real
staged files when the data folder exists."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from structprune.data.expert_corpora import XQUAD_ORDER, XQUAD_SPLITS
from structprune.data.lm import (
    LM_TASKS,
    MULTIPLE_CHOICE,
    XQUAD_LANGUAGES,
    Completion,
    MultipleChoice,
    get_lm_task,
    list_lm_tasks,
    load_items,
    load_text,
)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _jsonl(*objects: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


ARC_ITEM = {"instruction": "Please choose the correct answer to the question: Which gas do we breathe?\n\n"
                           "Answer1: nitrogen Answer2: oxygen Answer3: water vapor\n\n"
                           "Answer format: answer1/answer2/answer3", "input": "", "answer": "answer2"}


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """A data folder with two items per set, in each staged format."""
    _write(tmp_path, "WIKITEXT2/wiki.test.raw", " \n = Title = \n \n First line .\n")
    _write(tmp_path, "WIKITEXT2/wiki.valid.raw", " Valid .\n")
    _write(tmp_path, "HELLASWAG/hellaswag_val_full.txt",
           "Baking: A man  mixes flour. he\n2\nsits.\nruns [title] away.\nbakes a cake.\nsings.\n"
           "Cooking: A woman cooks.\n0\nserves it.\neats it.\ndrops it.\nburns it.\n")
    _write(tmp_path, "PIQA/valid.jsonl", _jsonl({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it "},
                                               {"goal": "dresser", "sol1": "a", "sol2": "b"}))
    _write(tmp_path, "PIQA/valid-labels.lst", "0\n1\n")
    _write(tmp_path, "ARC/ARC-Easy/test.json", json.dumps([ARC_ITEM], indent=4))
    _write(tmp_path, "BOOLQ/boolq.jsonl", _jsonl({"query": "Passage: Water is wet.\nQuestion: is water wet?",
                                                 "choices": ["no", "yes"], "gold": 1}))
    _write(tmp_path, "WINOGRANDE/winogrande.jsonl", _jsonl({"context_options": ["Sam beat Al so Sam", "Sam beat Al so Al"],
                                                           "continuation": "was sad.", "gold": 1}))
    _write(tmp_path, "OPENBOOKQA/test.jsonl", _jsonl({"id": "1", "question": {"stem": "The sun is a", "choices": [
        {"text": "star", "label": "A"}, {"text": "planet", "label": "B"}]}, "answerKey": "A"}))
    _write(tmp_path, "LAMBADA/lambada_test.jsonl", _jsonl({"text": "He said \"hello\nthere\" to his friend Bob"}))
    return tmp_path


def test_prompts_follow_lm_eval(staged: Path):
    assert load_text("wikitext2", data_dir=staged) == "\n\n = Title = \n" + "\n\n" + "\n\n" + " First line .\n"
    assert load_text("wikitext2", get_lm_task("wikitext2").calibration, data_dir=staged) == " Valid .\n"
    hs = load_items("hellaswag", data_dir=staged)
    assert hs[0] == MultipleChoice("Baking: A man mixes flour. he", ("sits.", "runs. away.", "bakes a cake.", "sings."),
                                   2, f"{staged}/HELLASWAG/hellaswag_val_full.txt:1")
    assert hs[1].source.endswith("hellaswag_val_full.txt:7")
    piqa = load_items("piqa", data_dir=staged)
    assert piqa[0].requests() == [("Question: Open a jar\nAnswer:", " twist the lid"),
                                  ("Question: Open a jar\nAnswer:", " eat it ")]
    assert [i.gold for i in piqa] == [0, 1]
    (arc,) = load_items("arc_easy", data_dir=staged)
    assert (arc.context, arc.choices, arc.gold) == ("Question: Which gas do we breathe?\nAnswer:",
                                                   ("nitrogen", "oxygen", "water vapor"), 1)
    (boolq,) = load_items("boolq", data_dir=staged)
    assert boolq.requests() == [("Water is wet.\nQuestion: is water wet?\nAnswer:", " no"),
                                ("Water is wet.\nQuestion: is water wet?\nAnswer:", " yes")]
    (wino,) = load_items("winogrande", data_dir=staged)
    assert wino.requests() == [("Sam beat Al so Sam", " was sad."), ("Sam beat Al so Al", " was sad.")]
    (obqa,) = load_items("openbookqa", data_dir=staged)
    assert obqa.requests() == [("The sun is a", " star"), ("The sun is a", " planet")] and obqa.gold == 0
    assert load_items("lambada", data_dir=staged) == [
        Completion("He said \"hello\nthere\" to his friend", " Bob", f"{staged}/LAMBADA/lambada_test.jsonl:1")]


@pytest.mark.parametrize(("task", "relative", "text", "message"), [
    ("hellaswag", "HELLASWAG/hellaswag_val_full.txt", "ctx\n4\na\nb\nc\nd\n", r"hellaswag_val_full\.txt:2: gold index '4'"),
    ("hellaswag", "HELLASWAG/hellaswag_val_full.txt", "ctx\n1\na\n", "not a multiple of 6"),
    ("piqa", "PIQA/valid.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g", "sol1": "a"}\n',
     r"valid\.jsonl:2: 'sol2' should be a str"),
    ("boolq", "BOOLQ/boolq.jsonl", '{"query": "Passage: p", "choices": ["no", "yes"], "gold": 1}\n',
     r"boolq\.jsonl:1: expected query"),
    ("winogrande", "WINOGRANDE/winogrande.jsonl", '{"context_options": ["a"], "continuation": "c", "gold": 0}\n',
     r"winogrande\.jsonl:1: context_options should be 2 strings"),
    ("openbookqa", "OPENBOOKQA/test.jsonl",
     _jsonl({"question": {"stem": "s", "choices": [{"text": "t", "label": "A"}]}, "answerKey": "B"}),
     r"test\.jsonl:1: answerKey 'B'"),
    ("lambada", "LAMBADA/lambada_test.jsonl", '{"text": "ok text"}\n{not json\n', r"lambada_test\.jsonl:2: not valid JSON"),
    ("arc_easy", "ARC/ARC-Easy/test.json", json.dumps([ARC_ITEM | {"answer": "answer4"}]),
     r"test\.json item 0: answer 'answer4' is not one of answer1\.\.answer3"),
    ("arc_easy", "ARC/ARC-Easy/test.json", json.dumps([ARC_ITEM | {"instruction": "Pick: x"}]),
     r"test\.json item 0: instruction is not"),
])
def test_malformed_files_name_file_and_line(tmp_path: Path, task, relative, text, message):
    _write(tmp_path, relative, text)
    if task == "piqa":
        _write(tmp_path, "PIQA/valid-labels.lst", "0\n1\n")
    with pytest.raises(ValueError, match=message):
        load_items(task, data_dir=tmp_path)


def test_registry_errors(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown language-model task 'hellaswa'\. Did you mean 'hellaswag'.*"
                                         r"Known: wikitext2, .*text:FILE"):
        get_lm_task("hellaswa")
    with pytest.raises(FileNotFoundError, match=r"PIQA not found: task 'piqa' .*STRUCTPRUNE_DATA_DIR"):
        load_items("piqa", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"multiple_choice task; read it with load_items\(\)"):
        load_text("piqa", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'train'"):
        load_text("wikitext2", "train", data_dir=tmp_path)
    _write(tmp_path, "PIQA/valid.jsonl", _jsonl({"goal": "g", "sol1": "a", "sol2": "b"}) * 2)
    _write(tmp_path, "PIQA/valid-labels.lst", "0\n")
    with pytest.raises(ValueError, match=r"valid-labels\.lst: 1 labels for the 2 items"):
        load_items("piqa", data_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 2 choices"):
        MultipleChoice("c", ("only",), 0, "here")


def test_text_file_task(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffCaf\u00e9 text.\n".encode())
    assert load_text(f"text:{path}") == "Caf\u00e9 text.\n"
    assert get_lm_task(f"text:{path}").kind == "perplexity" and list_lm_tasks()[-1] == "text:FILE"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"notes\.txt is not valid UTF-8"):
        load_text(f"text:{path}")
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        load_text(f"text:{tmp_path / 'missing.txt'}")


def test_gensim_corpora():
    pytest.importorskip("gensim")
    news = load_text("gensim-news")
    assert news.startswith("Hundreds of people have been forced") and news.count("\n") == 299
    assert "\u00a3" in load_text("gensim-news", "validation")  # lee.cor's one Latin-1 byte, decoded
    wiki = load_text("gensim-wiki")
    assert wiki.startswith("Anarchism is a political philosophy") and "[[" not in wiki and "'''" not in wiki


SIZES = {"hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270,
         "winogrande": 1267, "openbookqa": 500, "lambada": 5153, "pubmedqa": 500}
PERPLEXITY_TASKS = {"wikitext2", "gensim-news", "gensim-wiki", "pubmed", *(f"xquad-{lang}" for lang in XQUAD_LANGUAGES)}


def test_real_staged_files(data_dir: Path):
    assert set(SIZES) | PERPLEXITY_TASKS == set(LM_TASKS)
    text = load_text("wikitext2", data_dir=data_dir)
    assert len(text.split("\n\n")) >= 4358 and text.startswith("\n\n = Robert Boulter = \n")
    for name, size in SIZES.items():
        items = load_items(name, data_dir=data_dir)
        assert len(items) == size, name
        if LM_TASKS[name].kind == MULTIPLE_CHOICE:
            assert all(c.strip() for item in items for c in item.choices), name
    arc = load_items("arc_easy", data_dir=data_dir)
    assert Counter(len(i.choices) for i in arc) == {4: 2365, 3: 7, 5: 4}
    assert Counter(i.gold for i in arc) == {0: 596, 1: 585, 2: 633, 3: 561, 4: 1}
    assert Counter(i.gold for i in load_items("boolq", data_dir=data_dir))[1] == 2033
    assert Counter(i.gold for i in load_items("openbookqa", data_dir=data_dir)) == {0: 138, 1: 126, 2: 132, 3: 104}
    assert len(load_items("openbookqa", "validation", data_dir=data_dir)) == 500


# --------------------------------------------------------------------------------------------- expert corpora

def _squad(articles: int = 48, paragraphs: int = 2) -> str:
    """A SQuAD v1.1 file whose contexts name their article and paragraph: ``a{article}p{paragraph}``."""
    return json.dumps({"version": "1.1", "data": [
        {"title": f"T{a}", "paragraphs": [{"context": f"a{a}p{p}", "qas": []} for p in range(paragraphs)]}
        for a in range(articles)]})


def _pubmed_item(contexts: list[str], question: str, long_answer: str, decision: str) -> dict:
    return {"QUESTION": question, "CONTEXTS": contexts, "LABELS": ["A"] * len(contexts), "MESHES": [],
            "YEAR": "2000", "final_decision": decision, "LONG_ANSWER": long_answer}


@pytest.fixture
def pubmed_dir(tmp_path: Path) -> Path:
    """ori_pqal.json with three items, two of them test items (in the other order in test_ground_truth.json)."""
    _write(tmp_path, "DOMAIN_BIOMED/ori_pqal.json", json.dumps({
        "1": _pubmed_item(["Aim one.", "Result one."], "Does one work?", "One works.", "yes"),
        "2": _pubmed_item(["Aim two."], "Does two work?", "Unclear.", "maybe"),
        "3": _pubmed_item(["Aim three.", "Result three."], "Does three work?", "It does not.", "no")}, indent=2))
    _write(tmp_path, "DOMAIN_BIOMED/test_ground_truth.json", json.dumps({"3": "no", "1": "yes"}))
    return tmp_path


def test_xquad_split_by_article(tmp_path: Path):
    assert sorted(XQUAD_ORDER) == list(range(48))
    validation, test = set(XQUAD_SPLITS["validation"]), set(XQUAD_SPLITS["test"])
    assert not validation & test and validation | test == set(range(48)) and len(validation) == len(test) == 24
    assert XQUAD_SPLITS["validation"] == tuple(sorted(XQUAD_ORDER[:24]))
    _write(tmp_path, "MULTILINGUAL/xquad.de.json", _squad())
    for split, articles in XQUAD_SPLITS.items():
        expected = "\n\n".join(f"a{a}p{p}" for a in articles for p in (0, 1))
        assert load_text("xquad-de", split, data_dir=tmp_path) == expected
    task = get_lm_task("xquad-DE")
    assert task is LM_TASKS["xquad-de"] and (task.splits, task.calibration) == (("test", "validation"), "validation")
    assert load_text("xquad-de", data_dir=tmp_path).startswith(f"a{XQUAD_SPLITS['test'][0]}p0\n\n")
    with pytest.raises(ValueError, match=r"unknown language-model task 'xquad-xx'\. Did you mean 'xquad-"):
        get_lm_task("xquad-xx")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"MULTILINGUAL not found: task 'xquad-en'"):
        load_text("xquad-en", data_dir=tmp_path / "other")


@pytest.mark.parametrize(("text", "message"), [
    (json.dumps({"version": "1.1"}), r"xquad\.en\.json: expected a SQuAD v1\.1 object with a 'data' list"),
    (_squad(articles=47), r"xquad\.en\.json: 47 articles; XQuAD has 48"),
    (_squad().replace('"context": "a0p1"', '"context": null'),
     r"xquad\.en\.json article 0 paragraph 1: 'context' should be a str, found None"),
    (_squad().replace('"context": "a3p0"', '"text": "a3p0"'), r"xquad\.en\.json article 3 paragraph 0: 'context'"),
    ('{"data": [\n', r"xquad\.en\.json:2: not valid JSON"),
])
def test_malformed_xquad_names_the_file(tmp_path: Path, text, message):
    _write(tmp_path, "MULTILINGUAL/xquad.en.json", text)
    with pytest.raises(ValueError, match=message):
        load_text("xquad-en", "validation", data_dir=tmp_path)


def test_pubmed_texts_and_items(pubmed_dir: Path):
    assert load_text("pubmed", data_dir=pubmed_dir) == ("Aim one. Result one. One works.\n\n"
                                                        "Aim three. Result three. It does not.")
    assert load_text("pubmed", LM_TASKS["pubmed"].calibration, data_dir=pubmed_dir) == "Aim two. Unclear."
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_items("pubmedqa", "validation", data_dir=pubmed_dir)
    items = load_items("pubmedqa", data_dir=pubmed_dir)
    assert [i.gold for i in items] == [0, 1] and all(i.choices == ("yes", "no", "maybe") for i in items)
    assert items[0].requests()[2] == ("Abstract: Aim one.\nResult one.\nQuestion: Does one work?\nAnswer:", " maybe")
    assert items[1].source == f"{pubmed_dir}/DOMAIN_BIOMED/ori_pqal.json PMID 3"


@pytest.mark.parametrize(("truth", "message"), [
    ({"1": "no"}, r"ori_pqal\.json PMID 1: final_decision 'yes' disagrees with test_ground_truth\.json \('no'\)"),
    ({"1": "yes", "9": "no"}, r"test_ground_truth\.json PMID 9: not a PMID of ori_pqal\.json"),
    ({"1": "perhaps"}, r"test_ground_truth\.json PMID 1: answer 'perhaps'"),
])
def test_malformed_pubmedqa(pubmed_dir: Path, truth, message):
    _write(pubmed_dir, "DOMAIN_BIOMED/test_ground_truth.json", json.dumps(truth))
    with pytest.raises(ValueError, match=message):
        load_items("pubmedqa", data_dir=pubmed_dir)


def test_real_expert_corpora(data_dir: Path):
    files = {lang: json.loads((data_dir / "MULTILINGUAL" / f"xquad.{lang}.json").read_text(encoding="utf-8"))["data"]
             for lang in ("en", "de")}
    for split, articles in XQUAD_SPLITS.items():
        titles = {lang: [data[a]["title"] for a in articles] for lang, data in files.items()}
        assert titles["en"] == titles["de"]  # every file keeps the English titles: the same articles
        for lang, data in files.items():
            text = load_text(f"xquad-{lang}", split, data_dir=data_dir)
            assert text == "\n\n".join(p["context"] for a in articles for p in data[a]["paragraphs"])
            assert text.count("\n\n") + 1 == 120  # 24 articles of 5 paragraphs
    for lang in XQUAD_LANGUAGES:
        validation, test = (load_text(f"xquad-{lang}", split, data_dir=data_dir) for split in ("validation", "test"))
        assert validation.strip() and test.strip() and validation != test, lang
    assert len(load_text("xquad-en", data_dir=data_dir)) == 97492
    assert len(load_text("xquad-en", "validation", data_dir=data_dir)) == 91346
    test, validation = (load_text("pubmed", split, data_dir=data_dir).split("\n\n") for split in ("test", "validation"))
    assert len(test) == len(validation) == 500 and not set(test) & set(validation)
    truth = json.loads((data_dir / "DOMAIN_BIOMED" / "test_ground_truth.json").read_text(encoding="utf-8"))
    items = load_items("pubmedqa", data_dir=data_dir)
    assert {i.source.rsplit(" ", 1)[1]: i.choices[i.gold] for i in items} == truth
    assert Counter(i.gold for i in items) == {0: 276, 1: 169, 2: 55}
