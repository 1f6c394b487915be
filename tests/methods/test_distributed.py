"""Gradient scores under torchrun-style process groups (gloo on CPU): two processes, each running its share of the
calibration batches, end with exactly the scores of one process running them all."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from structprune.masked_model import MaskedModel
from structprune.methods.calibration import calibration_batches
from structprune.methods.distributed import my_share
from structprune.methods.fisher import mask_gradients
from structprune.methods.taylor import taylor_scores
from tests.conftest import make_causal


def _scores() -> dict[str, torch.Tensor]:
    model = MaskedModel(make_causal("llama"))
    ids = torch.randint(3, model.spec["vocab_size"], (10, 8), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    taylor = taylor_scores(model, data, batch_size=2, calib_batches=None)
    fisher = mask_gradients(model, calibration_batches(data, 3))
    return {f"taylor.{k}": v for k, v in taylor.items()} | {f"fisher.{k}": v for k, v in fisher.items()}


def _worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        shares = {"share": torch.tensor([j for j, _ in my_share(list(range(5)))])}
        torch.save(_scores() | shares, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_scores_of_one(tmp_path):
    single = _scores()
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared.pop("share").tolist() == list(range(rank, 5, 2))  # each ran its own batches
        assert shared.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(shared[name], value, rtol=1e-6, atol=1e-9)
