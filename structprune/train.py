"""The training loop shared by every learned method and by dense fine-tuning.

:func:`train` runs an :class:`Objective` (a module whose forward returns the loss of one batch) for a
fixed number of optimizer steps:

* AdamW over the objective's parameter groups, each with its own learning rate and schedule
  (``"linear"``: linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0;
  ``"constant"``), optionally maximising (Lagrange multipliers are trained by gradient ascent);
* gradient accumulation, gradient clipping of the groups marked ``clip``, bf16 autocast on CUDA;
* data: epoch ``e`` visits the rows in the order of ``batches(data, batch_size, shuffle=True,
  seed=seed + e)``; step ``s`` takes the next batch, cut into ``grad_accum`` micro-batches, each cut
  into one shard per process;
* a tqdm progress bar with the objective's values (loss, sparsity, lambda...), a JSONL log, an
  evaluation every ``eval_every`` steps with the best state kept (``best.pt``);
* atomic checkpoints every ``checkpoint_every`` steps and at the end, and exact resume: the
  checkpoint holds the objective, optimizer, scheduler, every process's torch RNG state and the
  step, and the data order is a function of the step, so a run killed at any point and started
  again with the same arguments finishes exactly as an uninterrupted one. A checkpoint records a fingerprint of its
  run and the structprune version; resuming another run's checkpoint is refused;
* DDP under ``torchrun`` (gloo on CPU, NCCL on CUDA): every process takes one shard of each batch,
  gradients are averaged, and the loss is weighted by shard size so the update equals one process's
  on the whole batch. Only rank 0 writes files.

With one process, no accumulation and no checkpoints it performs exactly the operations of a plain
loop (seed, shuffle, forward, backward, clip, step), so :func:`structprune.finetune.finetune` is
this loop with the task loss.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import structprune
from structprune.data.encoding import batches
from structprune.io import atomic_file, atomic_write_text
from structprune.precision import bf16_autocast

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_VERSION = 1
SCHEDULES = ("linear", "constant")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: another run's, another version's, or not writable."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    ``batch_size`` rows make one optimizer step (over all processes and micro-batches together).
    ``checkpoint_every`` and ``eval_every`` count optimizer steps (``None``: only at the end).
    ``keep_best``: with an evaluation, finish with the state that scored best on ``best_metric``.
    """

    steps: int
    batch_size: int = 32
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    log_every: int = 1
    mixed_precision: bool = True
    keep_best: bool = False
    best_metric: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError(f"steps, batch_size, grad_accum and log_every must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accum} and {self.log_every}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 when given, got {self.max_grad_norm}")


class Objective(nn.Module, abc.ABC):
    """What a learned method trains: its modules, parameter groups and the loss of one batch.

    ``forward(batch, step, micro)`` returns ``(loss, values)``: the loss (mean over the batch's rows)
    and floats to show and log (``values["loss"]`` is set by the loop). ``micro`` is the index of
    the micro-batch within the step, so per-step randomness (e.g. gate noise) can be drawn from
    ``(seed, step, micro)`` and stays the same across processes and resumes.
    """

    @abc.abstractmethod
    def param_groups(self) -> list[dict]:
        """AdamW groups: ``params``, ``lr``, ``weight_decay``, ``schedule`` (one of
        :data:`SCHEDULES`), and optionally ``maximize`` and ``clip`` (default: clipped)."""

    @abc.abstractmethod
    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """The loss of ``batch`` (a mean over its rows) and the values to show and log."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step, ``step`` the number of steps taken (e.g. to project parameters)."""


@dataclass
class TrainResult:
    """Per-step losses and logged values (of this process's run, resumed steps included), wall time, best
    evaluation."""

    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    start_step: int = 0
    best: dict | None = None
    evaluations: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [values["loss"] for values in self.history]

    @property
    def steps(self) -> int:
        return len(self.history)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by ``torchrun`` with several processes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, or raise CheckpointError."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test."):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints to {directory} ({err.strerror or err}); choose a folder "
                              "you can write to, or fix its permissions") from None
    return directory


def _schedule(group: dict, warmup: int, total: int) -> Callable[[int], float]:
    if group["schedule"] == "constant":
        return lambda step: 1.0

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return linear


def _optimizer(objective: Objective, config: TrainConfig):
    groups = objective.param_groups()
    for group in groups:
        if group.get("schedule") not in SCHEDULES:
            raise ValueError(f"parameter group schedule must be one of {SCHEDULES}, got {group.get('schedule')!r}")
    clip_ids = {id(p) for g in groups if g.get("clip", True) for p in g["params"]}
    clipped = [p for p in objective.parameters() if id(p) in clip_ids]  # module order: the norm is reproducible
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("schedule", "clip")} for g in groups])
    warmup = math.ceil(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [_schedule(g, warmup, config.steps) for g in groups])
    return optimizer, scheduler, clipped


class _Stream:
    """The batch of every step: epochs of ``batches(..., seed=seed + epoch)``, each cut into shards."""

    def __init__(self, data: Mapping[str, torch.Tensor], config: TrainConfig, rank: int, world: int):
        self.data, self.config, self.rank, self.world = data, config, rank, world
        rows = len(data["input_ids"])
        parts = config.grad_accum * world
        if config.batch_size < parts:
            raise ValueError(f"batch_size {config.batch_size} is smaller than grad_accum x processes = {parts}; "
                             "every process needs at least one row per micro-batch")
        full, rest = divmod(rows, config.batch_size)
        # A last batch too small to give every shard a row is dropped (never the case with one process).
        self.per_epoch = full + (rest >= parts)
        if self.per_epoch == 0:
            raise ValueError(f"the training data has {rows} rows, fewer than one batch of {config.batch_size}")
        self._epoch, self._batches = -1, []

    def shards(self, step: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This process's ``(rows, weight)`` per micro-batch of ``step``; weights sum to 1 over all processes."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = list(batches(self.data, self.config.batch_size, shuffle=True,
                                         seed=self.config.seed + epoch))
        batch = self._batches[index]
        total = len(batch["input_ids"])
        out = []
        for micro in _split(batch, self.config.grad_accum):
            shard = _split(micro, self.world)[self.rank]
            out.append((shard, len(shard["input_ids"]) / total))
        return out


def _split(batch: Mapping[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    pieces = {name: torch.tensor_split(t, parts) for name, t in batch.items()}
    return [{name: pieces[name][i] for name in batch} for i in range(parts)]


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of named tensors (weights, data) for run fingerprints."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_mismatch(saved: Mapping, current: Mapping) -> list[str]:
    """Keys whose values differ between two run fingerprints."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


class _Checkpoints:
    """The checkpoint folder of one run: ``checkpoint.pt``, ``best.pt``, ``log.jsonl``, ``run.json``."""

    def __init__(self, directory: str | os.PathLike | None, fingerprint: Mapping, writer: bool):
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.writer = writer
        if self.directory is not None and writer:
            check_writable(self.directory)

    def load(self) -> dict | None:
        if self.directory is None or not (self.directory / CHECKPOINT_FILE).is_file():
            return None
        path = self.directory / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (torch.load raises many types for a damaged file)
            raise CheckpointError(f"{path} cannot be read ({err}); delete it to start the run afresh") from None
        version = state.get("structprune_version")
        if state.get("checkpoint_version") != CHECKPOINT_VERSION or version != structprune.__version__:
            raise CheckpointError(f"{path} was written by structprune {version} (checkpoint format "
                                  f"{state.get('checkpoint_version')}); this is structprune {structprune.__version__}: "
                                  "resume with that version, or use a new checkpoint folder to start afresh")
        saved = json.loads(state["fingerprint"])
        differ = fingerprint_mismatch(saved, self.fingerprint)
        if differ:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in differ[:6])
            raise CheckpointError(f"{path} belongs to a different run ({details}); use a new checkpoint folder, or "
                                  "repeat the original settings to resume it")
        return state

    def save(self, state: dict) -> None:
        if self.directory is None or not self.writer:
            return
        state = state | {"checkpoint_version": CHECKPOINT_VERSION, "structprune_version": structprune.__version__,
                         "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        with atomic_file(self.directory / CHECKPOINT_FILE) as tmp:
            torch.save(state, tmp)
        if not (self.directory / RUN_FILE).is_file():
            atomic_write_text(self.directory / RUN_FILE, json.dumps(self.fingerprint, indent=2, sort_keys=True))

    def save_best(self, objective_state: dict) -> None:
        if self.directory is not None and self.writer:
            with atomic_file(self.directory / BEST_FILE) as tmp:
                torch.save(objective_state, tmp)

    def load_best(self) -> dict:
        return torch.load(self.directory / BEST_FILE, map_location="cpu", weights_only=True)

    def truncate_log(self, step: int) -> None:
        """Keep only complete log lines up to ``step`` (a killed run may have logged past its checkpoint)."""
        path = None if self.directory is None else self.directory / LOG_FILE
        if path is None or not self.writer or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def log(self, record: Mapping) -> None:
        if self.directory is not None and self.writer:
            with open(self.directory / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")


def _rng_states(world: int) -> list[dict]:
    """The RNG state of every process (dropout streams differ per rank), gathered for rank 0 to save."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _resume(checkpoints: _Checkpoints, objective: Objective, optimizer, scheduler, result: TrainResult, rank: int,
            world: int) -> None:
    """Load the run's checkpoint, if there is one, into the objective, optimiser, scheduler, RNG and ``result``."""
    state = checkpoints.load()
    if state is None:
        return
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) != world:
        raise CheckpointError(f"{checkpoints.directory} was written by a run of {len(state['rng'])} process(es); "
                              f"resume it with that many, not {world}")
    _set_rng_state(state["rng"][rank])
    result.history, result.best = list(state["history"]), state["best"]
    result.evaluations = list(state["evaluations"])
    result.start_step = int(state["step"])
    checkpoints.truncate_log(result.start_step)


def _accumulate(model: nn.Module, shards: list, step: int, device: torch.device, world: int, autocast,
                description: str) -> tuple[torch.Tensor, dict]:
    """Forward and backward of every micro-batch of one step (gradients summed, DDP synchronised on the last);
    the step's weighted loss and the objective's logged values."""
    loss_sum, values = torch.zeros((), dtype=torch.float64), {}
    for micro, (shard, weight) in enumerate(shards):
        shard = {name: t.to(device) for name, t in shard.items()}
        sync = model.no_sync() if world > 1 and micro < len(shards) - 1 else nullcontext()
        with sync:
            with autocast:
                loss, values = model(shard, step, micro)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{description}: the loss became {loss.item()} at step {step}; "
                                         "lower the learning rate")
            (loss * (weight * world) if weight * world != 1 else loss).backward()
        loss_sum += loss.detach().double().cpu() * weight
    return loss_sum, values


def train(objective: Objective, data: Mapping[str, torch.Tensor], config: TrainConfig,
          checkpoint_dir: str | os.PathLike | None = None, fingerprint: Mapping | None = None,
          evaluate: Callable[[], dict[str, float]] | None = None, progress: bool = True,
          description: str = "train") -> TrainResult:
    """Train ``objective`` on ``data`` (encoded rows with labels) for ``config.steps`` steps.

    With ``checkpoint_dir`` the run resumes from the checkpoint there (after checking it belongs to
    this run: same ``fingerprint``, same structprune version) and writes new ones. A finished run
    resumed again returns at once with its final state. ``evaluate`` (no arguments, returns metrics;
    it must not use the global RNG) runs every ``eval_every`` steps and at the end. The objective is
    left in eval mode.
    """
    if "input_ids" not in data or len(data["input_ids"]) == 0:
        raise ValueError(f"{description}: the training data is empty (no input_ids rows)")
    if "labels" not in data:
        raise ValueError(f"{description}: the training data has no labels")
    rank, world = init_distributed()
    checkpoints = _Checkpoints(checkpoint_dir, fingerprint or {}, writer=rank == 0)
    device = next(objective.parameters()).device
    stream = _Stream(data, config, rank, world)
    optimizer, scheduler, clipped = _optimizer(objective, config)
    model = objective
    if world > 1:
        # A gate sampled at exactly 0 removes its sublayer from the graph for that step: its weights get no
        # gradient, so DDP must look for unused parameters.
        model = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                    else None, find_unused_parameters=True)
    autocast = bf16_autocast(device, config.mixed_precision and device.type == "cuda")
    result = TrainResult()
    torch.manual_seed(config.seed + rank)
    _resume(checkpoints, objective, optimizer, scheduler, result, rank, world)
    step = result.start_step
    start = time.perf_counter()
    objective.train()
    with tqdm(total=config.steps, initial=step, desc=description, unit="step",
              disable=not progress or rank != 0) as bar:
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            loss_sum, values = _accumulate(model, stream.shards(step), step, device, world, autocast, description)
            if world > 1:
                dist.all_reduce(loss_sum)
            if config.max_grad_norm is not None and clipped:
                torch.nn.utils.clip_grad_norm_(clipped, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            objective.after_step(step)
            values = {"loss": loss_sum.item()} | {k: v for k, v in values.items() if k != "loss"}
            result.history.append(values)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            if step % config.log_every == 0 or step == config.steps:
                checkpoints.log({"step": step, "lr": scheduler.get_last_lr()[0]} | values)
            due = step == config.steps or (config.eval_every and step % config.eval_every == 0)
            if evaluate is not None and due:
                _evaluate(objective, evaluate, step, config, result, checkpoints)
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoints.save({"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "rng": _rng_states(world), "step": step,
                                  "history": result.history, "best": result.best, "evaluations": result.evaluations})
    result.seconds = time.perf_counter() - start
    if config.keep_best and result.best is not None and result.best["step"] != step:
        objective.load_state_dict(checkpoints.load_best() if checkpoints.directory is not None
                                  else result.best.pop("state"))
    if result.best is not None:
        result.best.pop("state", None)
    objective.eval()
    return result


def _evaluate(objective: Objective, evaluate: Callable[[], dict[str, float]], step: int, config: TrainConfig,
              result: TrainResult, checkpoints: _Checkpoints) -> None:
    objective.eval()
    metrics = evaluate()
    objective.train()
    result.evaluations.append({"step": step, **metrics})
    checkpoints.log({"step": step, "eval": metrics})
    name = config.best_metric or next(iter(metrics))
    if name not in metrics:
        raise ValueError(f"best_metric {name!r} is not among the evaluation's metrics {sorted(metrics)}")
    if result.best is None or metrics[name] > result.best["metrics"][name]:
        result.best = {"step": step, "metrics": metrics}
        if config.keep_best:
            state = {k: v.detach().clone() for k, v in objective.state_dict().items()}
            if checkpoints.directory is not None:
                checkpoints.save_best(state)
            else:
                result.best["state"] = state
