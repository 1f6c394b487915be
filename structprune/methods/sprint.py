"""``sprint``: remove whole attention and FFN sublayers one at a time by latency and tunability (after SPRINT, Park
et al., "Accurate Sublayer Pruning for Large Language Models by Exploiting Latency and Tunability Information",
IJCAI 2025).

Each round, with the sublayers removed so far gone and the weights tuned so far:

1. **Latency.** What removing each remaining sublayer saves, from the budget's cost model: a measured latency table
   (``structprune latency-table --phase decode``: the target runtime's own numbers) under a latency budget, else
   parameters or FLOPs.
2. **Sensitivity.** The calibration loss (next-token cross-entropy on the calibration windows) with the sublayer
   removed; candidates rank by loss increase per unit of latency saved. With ``shortlist`` set, only that many
   sublayers are evaluated: those of lowest block influence (ShortGPT's ``1 - cos``, one forward pass over the
   model as it stands) per latency saved; a loss evaluation is a forward pass per sublayer, so the shortlist
   divides a round's sensitivity cost by ``2L / shortlist``.
3. **Tunability.** The ``candidates`` best-ranked are each removed in turn and the model is tuned for
   ``probe_steps`` steps (distillation from the dense model, :mod:`structprune.recovery`); the weights are restored
   afterwards. The one whose *tuned* loss increase per latency saved is lowest goes: a sublayer whose loss the rest
   of the model can win back is cheaper to remove than its raw sensitivity says.
4. **Tuning.** After the removal the model is tuned ``tune_steps`` steps and keeps those weights.

Rounds continue until the budget is met (whole sublayers are coarse: the last one may overshoot). The result
carries the tuned weights (``PruneResult.weights``); the tuning steps are part of the method's cost and its log
counts them. The defaults fit a CPU (a few windows, steps in the tens); the paper tunes far longer on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.block_influence import BLOCKS, influences, resolved_without, sublayer_masks
from structprune.methods.calibration import calibration_batches
from structprune.methods.result import PruneResult, result_from_masks
from structprune.methods.setup import prepare_pruning
from structprune.recovery import recover

Unit = tuple[str, int]


@torch.no_grad()
def calibration_loss(model: MaskedModel, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the real tokens of ``batches`` (the model's current masks)."""
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        real = mask[:, 1:].bool()
        total += float(F.cross_entropy(logits[real], ids[:, 1:][real], reduction="sum"))
        count += int(real.sum())
    return total / max(count, 1)


class _Search:
    """The student (a masked copy of the dense model), its calibration data and the cost of each removal."""

    def __init__(self, full, structure, budget: Budget, windows: Mapping[str, torch.Tensor], batch_size: int,
                 seed: int, lr: float):
        self.teacher, self.structure, self.L = full.eval(), structure, structure.num_layers
        self.student = MaskedModel(full).eval()
        self.costs = budget.cost_model(structure, full.spec)
        self.windows, self.batches = windows, calibration_batches(windows, batch_size, None, seed)
        self.batch_size, self.seed, self.lr = batch_size, seed, lr
        self.steps = 0

    def reduction(self, removed: set[Unit]) -> float:
        return self.costs.reduction(resolved_without(removed, self.structure))

    def loss(self, removed: set[Unit]) -> float:
        self.student.set_masks(MaskSet(sublayer_masks(removed, self.L)))
        return calibration_loss(self.student, self.batches)

    def tune(self, removed: set[Unit], steps: int) -> None:
        if steps == 0:
            return
        self.student.set_masks(MaskSet(sublayer_masks(removed, self.L)))
        recover(self.student, self.teacher, self.windows, steps, self.lr, self.batch_size, self.seed, progress=False)
        self.steps += steps

    def shortlisted(self, removed: set[Unit], saved: dict[Unit, float], shortlist: int | None) -> list[Unit]:
        """The ``shortlist`` sublayers of lowest block influence per latency saved (all of them when ``None``)."""
        if shortlist is None or shortlist >= len(saved):
            return list(saved)
        scores = influences(self.student.model, self.batches, sublayer_masks(removed, self.L))
        return sorted(saved, key=lambda u: (float(scores[u[0]][u[1]]) / saved[u], u[1], u[0]))[:shortlist]

    def round(self, removed: set[Unit], base: float, candidates: int, probe_steps: int,
              shortlist: int | None) -> dict:
        """Choose and remove one sublayer (see the module doc); what was weighed, for the log."""
        before = self.reduction(removed)
        saved = {unit: self.reduction(removed | {unit}) - before
                 for unit in ((name, i) for i in range(self.L) for name in BLOCKS if (name, i) not in removed)}
        saved = {unit: s for unit, s in saved.items() if s > 0}
        if len(saved) <= 1:
            raise ValueError("sprint: the budget would remove every sublayer of the model; choose a smaller target")
        ranked = []
        for unit in self.shortlisted(removed, saved, shortlist):
            loss = self.loss(removed | {unit})
            ranked.append(((loss - base) / saved[unit], unit, loss, saved[unit]))
        ranked.sort(key=lambda r: (r[0], r[1][1], r[1][0]))
        snapshot = {name: t.clone() for name, t in self.student.model.state_dict().items()}
        probes = []
        for _, unit, loss, saved in ranked[:candidates]:
            self.tune(removed | {unit}, probe_steps)
            tuned = self.loss(removed | {unit}) if probe_steps else loss
            probes.append(((tuned - base) / saved, unit, loss, tuned, saved))
            self.student.model.load_state_dict(snapshot)
        _, unit, loss, tuned, saved = min(probes, key=lambda p: (p[0], p[1][1], p[1][0]))
        removed.add(unit)
        return {"removed": f"{unit[0]}[{unit[1]}]", "saved": saved, "loss": loss, "probe_loss": tuned,
                "probed": [f"{p[1][0]}[{p[1][1]}]" for p in probes]}


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          candidates: int = 3, probe_steps: int = 8, tune_steps: int = 16, shortlist: int | None = 12,
          lr: float = 5e-5, batch_size: int = 4, max_examples: int | None = 8, seed: int = 0,
          progress: bool = False) -> PruneResult:
    """Masks removing whole sublayers by latency and tunability, and the weights tuned along the way.

    Args:
        model: a causal LM of a supported architecture, a full-size structprune model or a MaskedModel.
        task_data: encoded calibration windows (``input_ids``, ``attention_mask``).
        budget: what to remove; a latency budget with a decode-phase table ranks by measured decode latency.
        candidates: sublayers probed by tuning each round; probe_steps: tuning steps of each probe (0: rank by
            sensitivity alone); tune_steps: tuning steps kept after each removal; lr: their peak learning rate.
        shortlist: sublayers whose loss is measured each round, by block influence per latency saved (``None``
            or 0: every remaining sublayer).
        batch_size, max_examples, seed: the calibration windows (drawn with ``seed``) and the tuning batches.
        progress: print one line per round.
    """
    for value, what in ((candidates, "candidates"), (probe_steps + 1, "probe_steps + 1"), (tune_steps + 1,
                                                                                           "tune_steps + 1")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sprint: {what} must be a positive integer, got {value!r}")
    if shortlist is not None and (isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 0):
        raise ValueError(f"sprint: shortlist must be a non-negative integer (0: every sublayer), got {shortlist!r}")
    shortlist = shortlist or None
    if task_data is None or len(task_data.get("input_ids", ())) == 0:
        raise ValueError("sprint needs calibration data: encoded windows with at least one example")
    inputs = prepare_pruning(model, budget, min_heads=0, min_neurons=0)
    if inputs.full.spec.get("task") != "causal_lm":
        raise ValueError("sprint prunes causal LMs (it tunes by distillation of next-token distributions); prune a "
                         "classifier with block_influence or a unit method")
    n = len(task_data["input_ids"])
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples or n].sort().values
    windows = {k: v[pick] for k, v in task_data.items() if k in ("input_ids", "attention_mask")}
    windows.setdefault("attention_mask", torch.ones_like(windows["input_ids"]))
    windows["labels"] = windows["input_ids"].masked_fill(windows["attention_mask"] == 0, -100)
    start = time.perf_counter()
    search = _Search(inputs.full, inputs.structure, inputs.budget, windows, batch_size, seed, lr)
    removed: set[Unit] = set()
    history, base = [], search.loss(removed)
    while search.reduction(removed) < inputs.budget.target:
        step = search.round(removed, base, candidates, probe_steps, shortlist)
        search.tune(removed, tune_steps)
        base = search.loss(removed)
        history.append(step | {"tuned_loss": base, "reduction": search.reduction(removed)})
        if progress:
            print(f"[sprint] removed {step['removed']}: loss {step['loss']:.3f}, probed {step['probe_loss']:.3f}, "
                  f"after tuning {base:.3f}; {inputs.budget.kind} reduction {history[-1]['reduction']:.3f}",
                  flush=True)
    options = {"candidates": candidates, "probe_steps": probe_steps, "tune_steps": tune_steps,
               "shortlist": shortlist, "lr": lr,
               "batch_size": batch_size, "max_examples": max_examples, "seed": seed}
    log = {"removed": history, "tuning_steps": search.steps, "seconds": time.perf_counter() - start,
           "calibration_windows": len(windows["input_ids"])}
    result = result_from_masks("sprint", inputs.full, MaskSet(sublayer_masks(removed, search.L)), inputs.budget,
                               options, log)
    result.weights = {name: t.detach().clone() for name, t in search.student.model.state_dict().items()}
    return result
