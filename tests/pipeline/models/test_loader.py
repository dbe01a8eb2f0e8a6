"""The model loader on a tiny random-init model of a real transformers class, saved and loaded by path."""

import pickle

import pytest
import torch
from transformers import BertConfig, BertModel

from pipeline.core.config import ModelSpec
from pipeline.models.loader import ModelUnavailable, load_pretrained, load_state_dict, resolve_model_dir


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(path)  # writes model.safetensors
    return path, model


def test_loads_by_path_with_dtype_in_eval_mode(tiny_bert):
    path, original = tiny_bert
    model = load_pretrained(BertModel, ModelSpec(path=str(path), dtype="bfloat16"), role="test")
    assert isinstance(model, BertModel) and not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    same = load_pretrained(BertModel, ModelSpec(path=str(path)), role="test")
    torch.testing.assert_close(same(ids).last_hidden_state, original.eval()(ids).last_hidden_state)


def test_missing_model_says_where_it_looked_and_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as exc:
        resolve_model_dir(ModelSpec(path="IDEA-Research/grounding-dino-base"), role="grounding")
    message = str(exc.value)
    assert "grounding model 'IDEA-Research/grounding-dino-base'" in message
    assert "Hugging Face cache" in message and "hf download IDEA-Research/grounding-dino-base" in message
    with pytest.raises(ModelUnavailable, match="no such directory"):
        resolve_model_dir(ModelSpec(path=str(tmp_path / "nothing")), role="caption")


def test_spec_rejects_unknown_keys_and_devices():
    with pytest.raises(ValueError):
        ModelSpec(path="x", device="tpu")
    with pytest.raises(ValueError):
        ModelSpec(path="x", trust_remote=True)
    assert ModelSpec(path="x").trust_remote_code is False


def test_raw_checkpoints_never_unpickle_code(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict(tmp_path / "ok.pt")["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(tmp_path / "evil.pt")


def test_a_model_directory_in_object_storage_is_copied_once_per_machine(tiny_bert, tmp_path, monkeypatch):
    from pipeline.models import loader

    tiny_bert, _ = tiny_bert
    from pipeline.testing.s3server import S3Server

    monkeypatch.setattr(loader, "MODEL_CACHE", tmp_path / "cache")
    with S3Server() as server:
        server.create_bucket("models")
        server.upload_tree(tiny_bert, "s3://models/tiny-bert")
        spec = ModelSpec(path="s3://models/tiny-bert", dtype="float32")
        model = load_pretrained(BertModel, spec, "test")
        assert isinstance(model, BertModel)
        local = resolve_model_dir(spec, "test")
        assert local.parent == tmp_path / "cache" and sorted(p.name for p in local.iterdir()) == sorted(
            p.name for p in tiny_bert.iterdir())
        with pytest.raises(ModelUnavailable, match="nothing is stored under that prefix"):
            resolve_model_dir(ModelSpec(path="s3://models/missing"), "test")
    # The server is gone: the cached copy still serves, with no request.
    assert resolve_model_dir(spec, "test") == local
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [local.name]  # no temporary folder left behind
