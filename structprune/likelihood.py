"""Scoring causal LMs by log-likelihood: :func:`perplexity` over fixed windows, zero-shot
:func:`multiple_choice` (acc / acc_norm) and :func:`lambada` (last-word accuracy), as lm-evaluation-harness
(0.4) defines them; :func:`evaluate_lm` runs a task of :mod:`structprune.data.lm` by name.

One routine, :func:`loglikelihoods`, scores everything: a request is a token sequence whose last ``targets``
tokens are scored given all before them. Requests are batched longest first, right-padded, and fed as
``input_ids`` alone (no attention mask, no position ids, as lm-eval's HFLM does): the model is causal, so
padding after a row changes none of its scored positions. Any model returning ``.logits [B, S, V]`` works: a
structprune model or a Hugging Face causal LM. Accuracies are in percent, like :mod:`structprune.evaluation`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from structprune.data.lm import (
    LAST_WORD,
    MULTIPLE_CHOICE,
    Completion,
    MultipleChoice,
    get_lm_task,
    load_items,
    load_text,
)


@dataclass(frozen=True)
class Request:
    """Tokens ``[context..., target...]``; the last ``targets`` are scored."""

    tokens: tuple[int, ...]
    targets: int


@dataclass(frozen=True)
class Scored:
    """A request's log-probability (nats) summed over its ``tokens`` targets, and whether every target token is
    the model's argmax."""

    logprob: float
    greedy: bool
    tokens: int


def _max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _score_chunk(model, requests: Sequence[Request], device: torch.device) -> list[Scored]:
    width = max(len(r.tokens) for r in requests) - 1
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, :len(r.tokens) - 1] = torch.tensor(r.tokens[:-1])
    logits = model(input_ids=ids.to(device)).logits
    out = []
    for row, r in enumerate(requests):
        n = len(r.tokens)
        logprobs = logits[row, n - 1 - r.targets:n - 1].float().log_softmax(-1)
        target = torch.tensor(r.tokens[n - r.targets:], device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
        out.append(Scored(float(picked.sum()), bool((logprobs.argmax(-1) == target).all()), r.targets))
    return out


def loglikelihoods(model, requests: Sequence[Request], batch_size: int = 8, progress: bool = True,
                   name: Callable[[int], str] = lambda i: f"request {i}") -> list[Scored]:
    """Every request's :class:`Scored`, in order. Raises ``FloatingPointError`` naming the first request
    (``name(index)``) whose log-likelihood is NaN or infinite."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = _max_length(model)
    for i, r in enumerate(requests):
        if not 1 <= r.targets < len(r.tokens):
            raise ValueError(f"{name(i)}: {r.targets} target tokens of {len(r.tokens)}; a request needs at least one "
                             "target and one token before it")
        if limit is not None and len(r.tokens) - 1 > limit:
            raise ValueError(f"{name(i)}: {len(r.tokens) - 1} input tokens exceed the model's maximum of {limit}")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    results: list[Scored | None] = [None] * len(requests)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(requests), disable=not progress, desc="log-likelihoods") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, scored in zip(chunk, _score_chunk(model, [requests[i] for i in chunk], device), strict=True):
                    if not math.isfinite(scored.logprob):
                        raise FloatingPointError(f"{name(i)}: the log-likelihood is {scored.logprob}; the weights or "
                                                 "masks are broken (or the dtype overflows), so nothing is reported")
                    results[i] = scored
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------- perplexity

@dataclass(frozen=True)
class Window:
    """Text tokens ``[begin, end)`` fed to the model; ``[score_from, end)`` are the ones it scores."""

    begin: int
    end: int
    score_from: int


def windows(n_tokens: int, window: int, stride: int, bos: bool) -> list[Window]:
    """Windows of ``window`` tokens every ``stride`` tokens (the last one shorter), as Hugging Face's perplexity
    guide slides them: each window scores only the tokens no earlier window scored, so when ``stride < window``
    the overlap is context only. Each token is scored at most once. With ``bos`` a window's first token is
    predicted from the BOS token before it, so every token is scored once; without, a window's first token has
    nothing before it and is context only (the text's first token always; with ``stride == window``, every
    window's first)."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}: a larger stride would skip "
                         "tokens")
    out, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(scored_until, begin if bos else begin + 1)
        if end > first:
            out.append(Window(begin, end, first))
        scored_until = end
        if end == n_tokens:
            break
    return out


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when it encodes (Llama 1/2 do; SmolLM2, Qwen, GPT-2 do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


@dataclass(frozen=True)
class PerplexityResult:
    """``exp`` of the mean negative log-likelihood (nats per token) over ``tokens`` scored tokens of a text of
    ``text_tokens`` tokens, in ``windows`` windows; ``window``, ``stride``, ``bos`` are the settings used."""

    perplexity: float
    nll: float
    tokens: int
    text_tokens: int
    windows: int
    window: int
    stride: int
    bos: bool

    def metrics(self) -> dict[str, float]:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def perplexity(model, tokenizer, text: str, window: int = 512, stride: int = 512, batch_size: int = 4,
               limit: int | None = None, bos: bool | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``text`` over sliding windows (see :func:`windows`); ``limit``: the first that many windows.

    The text is tokenized once without special tokens. ``bos`` (default: :func:`adds_bos`, i.e. what the
    model's tokenizer does when it encodes) puts the BOS token before every window, so a window's input is
    ``window + 1`` tokens. Non-overlapping windows without BOS (``stride == window``, the SparseGPT / Wanda
    setting) leave each window's first token unscored, and the count of scored tokens says so.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    bos = adds_bos(tokenizer) if bos is None else bos
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("bos=True, but the tokenizer has no BOS token; pass bos=False")
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    spans = windows(len(ids), window, stride, bos)[:limit]
    if not spans:
        raise ValueError(f"the text has {len(ids)} tokens: too short to score any (it needs {1 if bos else 2})")
    prefix = (tokenizer.bos_token_id,) if bos else ()
    requests = [Request(prefix + tuple(ids[w.begin:w.end]), w.end - w.score_from) for w in spans]
    scored = loglikelihoods(model, requests, batch_size, progress,
                            lambda i: f"window {i} (tokens {spans[i].begin}-{spans[i].end})")
    count = sum(s.tokens for s in scored)
    nll = -sum(s.logprob for s in scored) / count
    return PerplexityResult(math.exp(nll), nll, count, len(ids), len(spans), window, stride, bos)


def text_windows(tokenizer, text: str, length: int, count: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Calibration tensors from ``text``: ``count`` (default: all) non-overlapping windows of ``length`` tokens,
    drawn with ``seed`` and kept in text order, tokenized without special tokens. ``labels`` are the ids: a causal
    LM's objective is the next-token loss on the text itself."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}; use more "
                         "text or a shorter --max-length")
    chunks = torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)
    if count is not None and count < n:
        chunks = chunks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values]
    return {"input_ids": chunks, "attention_mask": torch.ones_like(chunks), "labels": chunks.clone()}


# --------------------------------------------------------------------------------------------- zero-shot

def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False).input_ids


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's split of a (context, continuation) pair: the context's trailing spaces move to the
    continuation; ``context + continuation`` is encoded whole (with the tokenizer's special tokens) and the
    continuation is what follows the tokens of the context alone. An empty context becomes the BOS token (EOS
    when there is none)."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tuple(_encode(tokenizer, continuation, special=False))
        if cont[:1] == (prefix,):  # the continuation starts with that token: it is the context
            return Request(cont, len(cont) - 1)
        return Request((prefix, *cont), len(cont))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return Request(tuple(whole), len(whole) - len(ctx))


def _truncate(request: Request, limit: int | None) -> Request:
    """Left-truncated to ``limit + 1`` tokens (lm-eval's rule for prompts longer than the model)."""
    if limit is None or len(request.tokens) <= limit + 1:
        return request
    return Request(request.tokens[-(limit + 1):], request.targets)


def _stderr(hits: Sequence[bool]) -> float:
    """Standard error of the mean of 0/1 values, in percent (sample standard deviation, as lm-eval)."""
    n = len(hits)
    if n < 2:
        return float("nan")
    p = sum(hits) / n
    return 100 * math.sqrt(p * (1 - p) / (n - 1))


@dataclass(frozen=True)
class ChoiceResult:
    """acc: the choice of largest summed log-likelihood; acc_norm: largest log-likelihood per character of the
    choice (lm-eval's definitions; percent). ``scores`` are the log-likelihoods per item and choice."""

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    items: int
    scores: tuple[tuple[float, ...], ...]

    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "acc_stderr": self.acc_stderr,
                "acc_norm_stderr": self.acc_norm_stderr, "items": self.items}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of ties, as numpy's argmax


def multiple_choice(model, tokenizer, items: Sequence[MultipleChoice], batch_size: int = 16,
                    limit: int | None = None, progress: bool = True) -> ChoiceResult:
    """acc and acc_norm of ``model`` on the first ``limit`` items (all by default)."""
    items = list(items)[:limit]
    if not items:
        raise ValueError("no items to score")
    pairs = [(i, pair) for i, item in enumerate(items) for pair in item.requests()]
    max_len = _max_length(model)
    requests = [_truncate(encode_pair(tokenizer, *pair), max_len) for _, pair in pairs]
    scored = loglikelihoods(model, requests, batch_size, progress, lambda k: f"item {items[pairs[k][0]].source}")
    scores, start = [], 0
    for item in items:
        scores.append(tuple(s.logprob for s in scored[start:start + len(item.choices)]))
        start += len(item.choices)
    hits = [_argmax(s) == item.gold for s, item in zip(scores, items, strict=True)]
    norm_hits = [_argmax([v / len(c) for v, c in zip(s, item.choices, strict=True)]) == item.gold
                 for s, item in zip(scores, items, strict=True)]
    return ChoiceResult(100 * sum(hits) / len(items), 100 * sum(norm_hits) / len(items), _stderr(hits),
                        _stderr(norm_hits), len(items), tuple(scores))


@dataclass(frozen=True)
class LambadaResult:
    """acc: percent of items whose every target token is the greedy (argmax) token; perplexity:
    ``exp(-mean over items of the target's summed log-likelihood)``, lm-eval's per-item aggregate."""

    acc: float
    perplexity: float
    acc_stderr: float
    items: int

    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "perplexity": self.perplexity, "acc_stderr": self.acc_stderr, "items": self.items}


def lambada(model, tokenizer, items: Sequence[Completion], batch_size: int = 16, limit: int | None = None,
            progress: bool = True) -> LambadaResult:
    """Last-word accuracy and target perplexity on the first ``limit`` items (lm-eval's ``lambada_openai``)."""
    items = list(items)[:limit]
    if not items:
        raise ValueError("no items to score")
    max_len = _max_length(model)
    requests = [_truncate(encode_pair(tokenizer, item.context, item.continuation), max_len) for item in items]
    scored = loglikelihoods(model, requests, batch_size, progress, lambda k: f"item {items[k].source}")
    hits = [s.greedy for s in scored]
    ppl = math.exp(-sum(s.logprob for s in scored) / len(scored))
    return LambadaResult(100 * sum(hits) / len(items), ppl, _stderr(hits), len(items))


def evaluate_lm(model, tokenizer, task: str, *, split: str | None = None, limit: int | None = None,
                batch_size: int | None = None, window: int = 512, stride: int = 512,
                data_dir: str | os.PathLike[str] | None = None,
                progress: bool = True) -> PerplexityResult | ChoiceResult | LambadaResult:
    """Run the language-model task named ``task`` (see :func:`structprune.data.lm.list_lm_tasks`).

    ``limit`` caps windows (perplexity) or items (the others); ``batch_size`` defaults to 4 windows or 16
    requests.
    """
    kind = get_lm_task(task).kind
    if kind == MULTIPLE_CHOICE:
        return multiple_choice(model, tokenizer, load_items(task, split, data_dir=data_dir), batch_size or 16,
                               limit, progress)
    if kind == LAST_WORD:
        return lambada(model, tokenizer, load_items(task, split, data_dir=data_dir), batch_size or 16, limit, progress)
    return perplexity(model, tokenizer, load_text(task, split, data_dir=data_dir), window, stride, batch_size or 4,
                      limit, progress=progress)
