"""The README's examples cannot go stale: its Python runs, and its shell commands parse and chain.

Every ``structprune`` command in the README and docs/ must parse with the real parser, and every folder a
command reads must be ``MODEL`` or the output of an earlier command in the same block, of the right kind:
``compact`` takes masks from a masks-only ``prune`` of the same model, ``bench --backend ort`` takes folders
written by ``export``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import needs_minilm

from structprune.cli import build_parser
from structprune.methods import is_learned

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(path.read_text()) if lang == language]


def _commands(block: str) -> list[list[str]]:
    """The ``structprune`` command lines of a shell block (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", block)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["structprune"]:
            commands.append(words[1:])
    return commands


def _check_chain(commands: list[list[str]]) -> None:
    parser = build_parser()
    made: dict[str, tuple[str, object]] = {}  # output folder -> (command, its arguments)

    def produced(path: str, *kinds: str) -> object:
        if path == "MODEL":
            return None
        assert path in made, f"{path} is read before any command writes it"
        assert made[path][0] in kinds, f"{path} comes from `{made[path][0]}`, not from {kinds}"
        return made[path][1]

    for words in commands:
        args = parser.parse_args(words)
        command = args.command
        if command in ("prune", "finetune", "transfer-search", "latency-table"):
            produced(args.model, "finetune")
        if command == "prune":
            made[args.out] = ("prune-masks" if not is_learned(args.method) else "prune-pipeline", args)
        elif command == "compact":
            prune = produced(args.masks, "prune-masks")
            assert args.model == prune.model, f"compact applies masks of {prune.model} to {args.model}"
            made[args.out] = ("compact", args)
        elif command == "export":
            produced(args.model, "finetune", "compact")
            made[args.out] = ("export", args)
        elif command == "bench":
            kinds = ("export",) if args.backend == "ort" else ("finetune", "compact")
            produced(args.dense, *kinds)
            produced(args.pruned, *kinds)
        elif command == "eval":
            produced(args.model, "finetune", "compact", "export")
        elif hasattr(args, "out"):
            made[args.out] = (command, args)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_shell_examples_parse_and_chain(path):
    for block in _blocks(path, "bash"):
        commands = _commands(block)
        if commands:
            _check_chain(commands)


def test_the_readme_shows_commands():
    assert sum(len(_commands(block)) for block in _blocks(REPO / "README.md", "bash")) >= 8


@needs_minilm
def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(REPO / "README.md", "python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    from structprune.compaction import from_pretrained

    small = from_pretrained(tmp_path / "small")
    assert small.spec["layers"][0]["heads"] == 6 and (tmp_path / "small-onnx" / "model.onnx").is_file()
    assert (tmp_path / "small" / "tokenizer.json").is_file() and os.listdir(tmp_path / "small-onnx")
