"""Every folder we write loads in stock transformers (trust_remote_code=True: modeling_autotinybert.py) and
computes what our model computes: hidden states, MLM logits, classification and span logits; and transformers'
BERT and ELECTRA checkpoints load into ours (Appendix A's layout)."""

import json

import pytest
import torch
import transformers
from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification)

import finetune as ft
from model import Arch, Bert, extract, from_pretrained, read_pretrained, save_pretrained
from tasks import glue
from test_finetune import finetune, keyword_task, write_tsv
from test_model import VOCAB, batch
from test_squad import tok, vocab  # noqa: F401 (fixtures)


def random_bert(arch, seed=0, **kwargs):
    """Weights far from BERT's init (std 0.02 makes every layer nearly the identity), so that a wrong layout shows."""
    torch.manual_seed(seed)
    model = Bert(arch, vocab_size=VOCAB, max_position=64, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def check_encoder_and_mlm(folder, ours):
    ids, mask, types = batch()  # one padded sequence in the batch
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    body = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(mlm).__name__ == "AutoTinyBertForMaskedLM"
    with torch.no_grad():
        h = ours(ids, mask, types)
        assert max_diff(body(**inputs).last_hidden_state, h) <= 1e-5
        assert max_diff(mlm(**inputs).logits, ours.mlm_logits(h)) <= 1e-5


@pytest.mark.parametrize("arch", ["2-80-96-4-48",    # qkv < hidden, head width 12
                                  "2-48-96-4-96",    # qkv > hidden, head width 24
                                  "2-60-96-8-64",    # 8 heads do not divide hidden 60 (Table 4: 8 heads, 564)
                                  "1-64-96-4-64"])   # a plain BERT
def test_saved_folders_load_through_auto_classes(tmp_path, arch):
    ours = random_bert(Arch.parse(arch))
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and (tmp_path / "modeling_autotinybert.py").exists()
    assert config.get("qkv_size", config["hidden_size"]) == ours.arch.qkv
    check_encoder_and_mlm(tmp_path, ours)


def test_plain_bert_needs_no_remote_code(tmp_path):
    ours = random_bert(Arch(1, 64, 96, 4, 64))
    save_pretrained(ours, tmp_path)
    stock = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()  # no trust_remote_code: transformers' own class
    assert type(stock) is transformers.BertForMaskedLM
    ids, mask, types = batch()
    with torch.no_grad():
        h = ours(ids, mask, types)
        out = stock(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert max_diff(out.hidden_states[-1], h) <= 1e-5 and max_diff(out.logits, ours.mlm_logits(h)) <= 1e-5


@pytest.mark.parametrize("mha, arch", [("heads", Arch(2, 48, 80, 3, 96)),     # head width kept: 32
                                       ("dims", Arch(2, 48, 80, 4, 20))])     # all 4 heads, 5 dims each
def test_extracted_sub_models_load(tmp_path, mha, arch):
    superplm = random_bert(Arch(3, 64, 128, 4, 128), mha=mha)
    ours = extract(superplm, arch).eval()
    save_pretrained(ours, tmp_path)
    check_encoder_and_mlm(tmp_path, ours)
    ids, mask, types = batch()
    with torch.no_grad():  # and the folder is still the SuperPLM's sub-model
        assert max_diff(ours(ids, mask, types), superplm(ids, mask, types, arch=arch)) <= 1e-5


@pytest.mark.parametrize("task", ["mnli", "stsb", "squad"])
def test_fine_tuned_folders_load_with_their_heads(tmp_path, task):
    ours = ft.Finetuner(random_bert(Arch(2, 60, 96, 4, 40)), 2 if task == "squad" else len(glue.GLUE[task].labels)
                        or 1, span=task == "squad").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ft.save_checkpoint(ours, tmp_path / "best", task, tmp_path, dict(score=0.0))
    ids, mask, types = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        mine = ours(**inputs)
        if task == "squad":
            hf = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "best", trust_remote_code=True).eval()
            out = hf(**inputs)
            assert max_diff(out.start_logits, mine[0]) <= 1e-5 and max_diff(out.end_logits, mine[1]) <= 1e-5
        else:
            hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "best", trust_remote_code=True)
            assert max_diff(hf.eval()(**inputs).logits, mine) <= 1e-5
            assert list(hf.config.id2label.values()) == list(glue.GLUE[task].labels or ("score",))
    body = AutoModel.from_pretrained(tmp_path / "best", trust_remote_code=True).eval()
    with torch.no_grad():
        assert max_diff(body(**inputs).last_hidden_state, ours.bert(ids, mask, types)) <= 1e-5
    assert not [k for k in read_pretrained(tmp_path / "best")[1] if k.startswith("cls.")]  # only its head's weights
    again, _ = ft.load_model(tmp_path / "best", task)  # and our own loader reads it back as before
    with torch.no_grad():
        assert torch.equal(again.eval()(**inputs)[0], mine[0])


def test_a_fine_tuned_folder_predicts_the_same_labels(tmp_path, vocab):  # noqa: F811
    torch.manual_seed(0)
    save_pretrained(Bert(Arch(2, 64, 128, 2, 48), vocab_size=len((vocab / "vocab.txt").read_text().split()),
                         max_position=512), tmp_path / "model")
    (tmp_path / "model" / "vocab.txt").write_text((vocab / "vocab.txt").read_text())
    glue_dir = tmp_path / "glue"
    write_tsv(glue_dir / "RTE" / "train.tsv", keyword_task(160, 0))
    write_tsv(glue_dir / "RTE" / "dev.tsv", keyword_task(60, 1))
    result = finetune(tmp_path / "model", "rte", data_dir=glue_dir, lr=1e-3, epochs=3, batch_size=16,
                      out=tmp_path / "run")
    best = tmp_path / "run" / "best"
    dev = glue.read_glue("rte", "dev", glue_dir)
    feats = glue.encode_glue(ft.load_tokenizer(best), dev)
    ours = glue.labels_of(ft.predict(ft.load_model(best, "rte")[0], feats, 64, 0, "cpu"))
    hf = AutoModelForSequenceClassification.from_pretrained(best, trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = [hf(**ft.collate([f], 0, "cpu")).logits.argmax(-1).item() for f in feats]  # one at a time
    assert theirs == ours.tolist()
    assert 100 * sum(t == y for t, y in zip(theirs, dev.labels)) / len(dev.labels) == result["accuracy"]
    assert [hf.config.id2label[t] for t in theirs[:3]] == [glue.GLUE["rte"].labels[t] for t in ours[:3]]


# ----------------------------------------------------------------------------- Hugging Face layout (Appendix A)

TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64)


def _hf_equal(hf_model, ours, T=12):
    ids, mask, types = batch(T=T)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        return (ours(ids, mask, types) - ref).abs().max().item()


def _mlm_equal(hf_mlm, ours):
    ids, mask, types = batch()
    with torch.no_grad():
        ref = hf_mlm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        return (ours.mlm_logits(ours(ids, mask, types)) - ref).abs().max().item()


@pytest.mark.parametrize("kind", ["bert", "electra", "electra-projected", "bert-bin"])
def test_loads_transformers_checkpoints(tmp_path, kind):
    torch.manual_seed(0)
    if kind.startswith("electra"):
        cfg = transformers.ElectraConfig(**TINY, embedding_size=32 if kind == "electra-projected" else 64)
        hf = transformers.ElectraForPreTraining(cfg).eval()
        body = hf.electra
    else:
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
        body = hf.bert
    hf.save_pretrained(tmp_path, safe_serialization=kind != "bert-bin")
    ours = from_pretrained(tmp_path).eval()
    assert _hf_equal(body, ours) <= 1e-5
    if kind.startswith("bert"):  # the MLM head came along too
        assert _mlm_equal(hf, ours) <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = Bert(Arch(2, 64, 96, 4, 64), vocab_size=VOCAB, max_position=64).eval()
    save_pretrained(ours, tmp_path)
    assert "qkv_size" not in json.loads((tmp_path / "config.json").read_text())
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert _hf_equal(hf.bert, ours) <= 1e-5
    assert _mlm_equal(hf, ours) <= 1e-4


def test_qkv_different_from_hidden_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    ours = Bert(Arch(2, 80, 96, 4, 48), vocab_size=VOCAB, max_position=64).eval()
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["qkv_size"] == 48
    back = from_pretrained(tmp_path).eval()
    assert back.arch == ours.arch
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ids, mask, types = batch()
    with torch.no_grad():
        assert torch.equal(back(ids, mask, types), ours(ids, mask, types))
