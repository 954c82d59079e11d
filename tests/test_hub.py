"""lens.models.hub: loading local folders, GGUF files and hub ids; the offline SmolLM2 conversion.

The slow tests use the machine-wide cache (`$LENS_CACHE`, else ~/.cache/consistency-lens), so the SmolLM2
conversion runs once per machine, not once per test session.
"""

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lens.errors import InputError
from lens.models.hub import SMOLLM2_GGUF, SMOLLM2_ID, _extract_gguf, _smollm2_wheel, default_cache_dir, load_model, smollm2_dir

TEXT = ["the quick brown fox jumps over the lazy dog", "a lens reads the residual stream", "hello world"] * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, model, tok


def test_local_dir_round_trip(tiny_dir):
    path, ref, ref_tok = tiny_dir
    model, tok = load_model(str(path))
    ids = tok(TEXT[0], return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(TEXT[0], return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_local_dir_dtype(tiny_dir):
    model, _ = load_model(str(tiny_dir[0]), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no/such/dir", "/nonexistent/model.gguf"])
def test_missing_path(name):
    with pytest.raises(InputError, match="model.name") as e:
        load_model(name)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match="model.name.*config.json"):
        load_model(str(tmp_path))


def test_hub_id_missing_offline(monkeypatch):
    # transformers and huggingface_hub both read this flag (set from HF_HUB_OFFLINE at import time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="model.name='no-such-org/no-such-model'.*hub id available offline"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_smollm2_offline_completes_paris(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tok = load_model(SMOLLM2_ID)
    assert model.name_or_path == str(smollm2_dir())  # the cached conversion, not some hub copy
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])
    assert load_model("smollm2-135m")[0].name_or_path == model.name_or_path


@pytest.mark.slow
def test_gguf_file_matches_converted_folder(tmp_path):
    # Loads the GGUF straight from the cached wheel: covers the .gguf path and checks the conversion is exact.
    folder = smollm2_dir()
    gguf = _extract_gguf(_smollm2_wheel(default_cache_dir() / "wheels"), tmp_path)
    assert gguf.name == SMOLLM2_GGUF.split("/")[-1]
    from_gguf, tok_gguf = load_model(str(gguf))
    converted, tok = load_model(str(folder))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok_gguf("The capital of France is", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, converted(ids).logits, rtol=0, atol=0)
