"""Streaming: a model left in its safetensors files (Hugging Face or structprune folder, one file or shards) is
scored layer by layer into exactly the masks, shifts and influences of the model held in memory, and holds no
weight afterwards; bad folders are refused with what to do."""

from __future__ import annotations

import pytest
import torch

from structprune import compaction
from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact, compact_to_folder, from_pretrained, save
from structprune.methods import METHODS, get_method
from structprune.streaming import WeightSource, streamed_model
from tests.conftest import CAUSAL_ARCHS, make_causal


def _data(vocab: int, n: int = 6, seq: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _same(a, b) -> None:
    assert a.masks.keys() == b.masks.keys() and a.shifts.keys() == b.shifts.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for name in a.shifts:
        torch.testing.assert_close(a.shifts[name], b.shifts[name], rtol=1e-5, atol=1e-6)


def _resident(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.device.type != "meta"]


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("shards", [False, True])
def test_a_streamed_hugging_face_checkpoint_scores_like_the_model_in_memory(arch, shards, tmp_path):
    hf = make_causal(arch)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shards else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shards
    data, budget = _data(hf.config.vocab_size), Budget(0.3)
    streamed = streamed_model(tmp_path)
    assert _resident(streamed) == [] and streamed.spec == from_hf(hf).spec
    for method in ("flap", "expert"):
        _same(get_method(method)(streamed, data, budget).masks, get_method(method)(hf, data, budget).masks)
    assert _resident(streamed) == []
    held = get_method("block_influence")(hf, data, budget, granularity="sublayer")
    stream = get_method("block_influence")(streamed, data, budget, granularity="sublayer")
    _same(stream.masks, held.masks)
    for name, scores in held.log["influence"].items():
        torch.testing.assert_close(torch.tensor(stream.log["influence"][name]), torch.tensor(scores))


@pytest.mark.parametrize("shards", [False, True])
def test_a_streamed_structprune_folder_scores_like_the_model_in_memory(shards, tmp_path, monkeypatch):
    full = from_hf(make_causal("llama3")).eval()
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save(full, tmp_path / "model", max_shard_mb=0.02 if shards else 2048)
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file() == shards
    data = _data(full.spec["vocab_size"])

    def larger_than_memory(what, params, bytes_per_param=4):
        raise ValueError(f"{what} is larger than memory")

    monkeypatch.setattr(compaction, "check_memory", larger_than_memory)
    with pytest.raises(compaction.ModelFileError, match="larger than memory"):
        from_pretrained(tmp_path / "model")
    streamed = streamed_model(tmp_path / "model")  # what does not fit in memory still streams
    _same(get_method("flap")(streamed, data, Budget(0.4)).masks, get_method("flap")(full, data, Budget(0.4)).masks)
    assert _resident(streamed) == []


def test_only_the_running_layer_and_the_used_embedding_rows_are_read(tmp_path, monkeypatch):
    hf = make_causal("llama")
    hf.save_pretrained(tmp_path)
    streamed = streamed_model(tmp_path)
    data, seen = _data(hf.config.vocab_size), []
    tensors, rows = WeightSource.tensors, WeightSource.rows
    monkeypatch.setattr(WeightSource, "tensors", lambda self, names: seen.append(
        sorted({".".join(n.split(".")[:2]) for n in names})) or tensors(self, names))
    monkeypatch.setattr(WeightSource, "rows", lambda self, name, ids: seen.append((name, ids.tolist())) or rows(
        self, name, ids))
    get_method("block_influence")(streamed, data, Budget(0.2))
    used = data["input_ids"].unique().tolist()
    assert len(used) < hf.config.vocab_size
    assert seen == [("embeddings.word.weight", used)] + [[f"layers.{i}"] for i in range(hf.config.num_hidden_layers)]
    assert streamed.embeddings.word.weight.shape == (hf.config.vocab_size, hf.config.hidden_size)
    assert _resident(streamed) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_read_from_the_file_without_mapping_it(dtype, tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(50, 6).to(dtype)
    save_file({"other": torch.ones(3), "embeddings.word.weight": table}, tmp_path / "model.safetensors")
    source, ids = WeightSource(tmp_path), torch.tensor([0, 1, 2, 7, 20, 21, 49])
    rows = source.rows("embeddings.word.weight", ids)
    assert rows.dtype == dtype and torch.equal(rows, table[ids])
    assert source.rows("embeddings.word.weight", ids[:0]).shape == (0, 6)
    with pytest.raises(OSError, match="not a float matrix"):
        source.rows("other", torch.tensor([0]))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-6 * dtype.itemsize])  # the last row cut off
    with pytest.raises(OSError, match="corrupt or truncated"):
        source.rows("embeddings.word.weight", ids)


def test_streaming_methods_are_declared_and_bad_folders_are_refused(tmp_path):
    assert sorted(n for n, m in METHODS.items() if m.streams) == ["block_influence", "expert", "flap"]
    with pytest.raises(ValueError, match="config.json"):
        streamed_model(tmp_path)
    hf = make_causal("llama")
    hf.config.save_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="safetensors"):
        streamed_model(tmp_path / "nothing")
    from safetensors.torch import load_file, save_file

    hf.save_pretrained(tmp_path / "cut")
    state = load_file(tmp_path / "cut" / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, tmp_path / "cut" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 weights"):
        streamed_model(tmp_path / "cut")


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_a_streamed_model_compacts_into_the_folder_of_the_model_in_memory(arch, tmp_path, monkeypatch):
    hf = make_causal(arch)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    masks = get_method("flap")(hf, _data(hf.config.vocab_size), Budget(0.4)).masks
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save(compact(hf, masks), tmp_path / "held")
    events, tensors = [], WeightSource.tensors
    monkeypatch.setattr(WeightSource, "tensors", lambda self, names: events.extend(("read", n) for n in names) or
                        tensors(self, names))
    save_file = compaction.save_file
    monkeypatch.setattr(compaction, "save_file", lambda state, path, **kw: events.append(("write", path)) or save_file(
        state, path, **kw))
    with pytest.warns(UserWarning, match="without a tokenizer"):
        compact_to_folder(streamed_model(tmp_path / "hf"), masks, tmp_path / "streamed", max_shard_mb=0.02)
    held, streamed = (from_pretrained(tmp_path / name).state_dict() for name in ("held", "streamed"))
    assert held.keys() == streamed.keys() and all(torch.equal(held[k], streamed[k]) for k in held)
    kinds = [kind for kind, _ in events]
    assert kinds.count("write") > 2 and kinds.index("write") < len(kinds) - kinds[::-1].index("read") - 1
    assert [name for kind, name in events if kind == "read"][-1].startswith(("lm_head", "final_norm"))
