"""The folders users bring (issue 21): the authors' released models (AutoTinyBERT-S1..S4, KD-S1..S4) in their own
layout, sharded checkpoints, stock transformers heads and ONNX folders for deployment loaders, a SuperPLM started
from a pretrained BERT (the authors' pre_training.py without --scratch), and GLUE's AX.tsv."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file
from transformers.models.bert import modeling_bert

import distill
import export
import finetune as ft
import superplm
from common import UserError, run_main
from data import train_tokenizer
from model import Arch, extract, from_pretrained
from tasks import glue
from test_distill import sentences
from test_finetune import make_mnli, write_tsv
from test_model import batch
from test_squad import tok, vocab  # noqa: F401 (fixtures)

VOCAB = 120


# ----------------------------------------------------------------------------- the authors' released models

def self_attention(self, config, is_causal=False, layer_idx=None):
    """transformers' BertSelfAttention patched as the authors' README says: the attention's width is qkv_size."""
    nn.Module.__init__(self)
    qkv = getattr(config, "qkv_size", config.hidden_size)
    self.config, self.num_attention_heads = config, config.num_attention_heads
    self.attention_head_size = qkv // config.num_attention_heads
    self.all_head_size, self.scaling = qkv, self.attention_head_size ** -0.5
    self.query, self.key, self.value = (nn.Linear(config.hidden_size, qkv) for _ in range(3))
    self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
    self.is_decoder, self.is_causal, self.layer_idx = config.is_decoder, is_causal, layer_idx


def self_output(self, config):
    """BertSelfOutput patched as the README says: its dense maps qkv_size -> hidden_size."""
    nn.Module.__init__(self)
    self.dense = nn.Linear(getattr(config, "qkv_size", config.hidden_size), config.hidden_size)
    self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)


def released_folder(folder, monkeypatch, arch, kd=False, prefix=""):
    """A folder in the released layout (config.json without model_type, pytorch_model.bin, vocab.txt) holding a
    random patched transformers BertModel of `arch`, which is returned as the reference."""
    monkeypatch.setattr(modeling_bert.BertSelfAttention, "__init__", self_attention)
    monkeypatch.setattr(modeling_bert.BertSelfOutput, "__init__", self_output)
    config = dict(hidden_size=arch.hidden, intermediate_size=arch.ffn, num_attention_heads=arch.heads,
                  num_hidden_layers=arch.layers, qkv_size=arch.qkv, emb_size=arch.hidden, vocab_size=VOCAB,
                  hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                  max_position_embeddings=64, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
                  cell={}, structure=[], pre_trained="", training="")
    torch.manual_seed(0)
    hf = modeling_bert.BertModel(transformers.BertConfig(**config, attn_implementation="eager"),
                                 add_pooling_layer=False).eval()
    monkeypatch.undo()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    state = {prefix + k: v for k, v in hf.state_dict().items()}
    if kd:  # the KD models' config is longer and their weights hold the projection to the teacher's width
        config.update(fit_size=48, teacher_hidden_size=48)
        state.update({f"{prefix}dense_fit.weight": torch.randn(48, arch.hidden), f"{prefix}dense_fit.bias":
                      torch.zeros(48)})
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    write_vocab(folder)
    return hf


def write_vocab(folder):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + [f"w{i}" for i in range(VOCAB - 5)]) + "\n")


def hidden_of(model, hf_model):
    ids, mask, types = batch(vocab=VOCAB)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        return (model(ids, mask, types) - ref).abs().max().item()


@pytest.mark.parametrize("kind, arch, prefix", [("S4", Arch(3, 40, 76, 4, 32), ""),          # S4: 3-320-608-4-256
                                                ("S4", Arch(3, 40, 76, 4, 32), "bert."),
                                                ("KD", Arch(4, 30, 60, 12, 24), "bert.")])  # KD-S4: 4-256-480-12-192
def test_released_models_load_as_the_patched_transformers_bert(tmp_path, monkeypatch, capsys, kind, arch, prefix):
    folder = tmp_path / "AutoTinyBERT"
    hf = released_folder(folder, monkeypatch, arch, kd=kind == "KD", prefix=prefix)
    ours = from_pretrained(folder).eval()
    assert ours.arch == arch and hidden_of(ours, hf) <= 1e-5
    notes = capsys.readouterr().err.splitlines()
    if kind == "KD":  # the unknown keys and the projection are named, one line each; the authors' keys are not
        assert len(notes) == 2 and "ignored fit_size, teacher_hidden_size" in notes[0] and "cell" not in notes[0]
        assert "skipped bert.dense_fit (30, 48), the projection to the teacher's width" in notes[1]
    else:
        assert notes == []
    teacher, _ = distill.load_teacher(folder)  # as --teacher
    assert hidden_of(teacher, hf) <= 1e-5
    model, _ = ft.load_model(folder, "rte")  # as finetune.py's --model
    assert hidden_of(model.bert.eval(), hf) <= 1e-5
    # one command makes it a folder that stock transformers loads with its Auto classes
    export.main(["--model", str(folder), "--out", str(tmp_path / "hf"), "--format", "hf"])
    auto = transformers.AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert hidden_of(ours, auto) <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").vocab_size == VOCAB


# ----------------------------------------------------------------------------- sharded checkpoints

@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoints_load_everywhere_a_folder_is_taken(tmp_path, safe):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    hf = transformers.BertForMaskedLM(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    index = "model.safetensors.index.json"
    if not safe:  # the .bin layout transformers 4 writes (5 writes safetensors only): same shards, pickled
        index = "pytorch_model.bin.index.json"
        bin_name = lambda name: name.replace("model", "pytorch_model").replace(".safetensors", ".bin")  # noqa: E731
        saved = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        for shard in set(saved["weight_map"].values()):
            torch.save(load_file(tmp_path / shard), tmp_path / bin_name(shard))
            (tmp_path / shard).unlink()
        saved["weight_map"] = {k: bin_name(v) for k, v in saved["weight_map"].items()}
        (tmp_path / index).write_text(json.dumps(saved))
        (tmp_path / "model.safetensors.index.json").unlink()
    shards = set(json.loads((tmp_path / index).read_text())["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    write_vocab(tmp_path)
    assert hidden_of(from_pretrained(tmp_path).eval(), hf.bert) <= 1e-5
    assert hidden_of(distill.load_teacher(tmp_path)[0], hf.bert) <= 1e-5  # --teacher
    assert hidden_of(ft.load_model(tmp_path, "rte")[0].bert.eval(), hf.bert) <= 1e-5  # --model
    assert hidden_of(export.load(tmp_path)[0], hf.bert) <= 1e-5
    (tmp_path / sorted(shards)[1]).unlink()  # a shard not downloaded: one line
    with pytest.raises(UserError, match=f"lacks {sorted(shards)[1]}"):
        from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- export: heads and ONNX folders

@pytest.mark.slow
def test_a_stock_classifier_exports_to_a_folder_deployment_loaders_read(tmp_path, vocab):  # noqa: F811
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len((vocab / "vocab.txt").read_text().split()), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                     max_position_embeddings=160, num_labels=3)
    hf = transformers.BertForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "stock")
    (tmp_path / "stock" / "vocab.txt").write_text((vocab / "vocab.txt").read_text())
    export.main(["--model", str(tmp_path / "stock"), "--out", str(tmp_path / "onnx"), "--int8"])
    out = tmp_path / "onnx"
    assert {"model.onnx", "model.int8.onnx", "config.json", "vocab.txt"} <= {f.name for f in out.iterdir()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert transformers.AutoConfig.from_pretrained(out).num_labels == 3
    inputs = tokenizer(["the cat sat on the mat", "a dog"], ["a bird", "the goodness of it"], padding=True,
                       return_tensors="np")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {k: inputs[k].astype(np.int64) for k in export.INPUTS})[0]
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    assert logits.shape == (2, 3) and np.abs(logits - ref).max() <= 1e-5


def test_export_names_what_it_leaves_out(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=64, hidden_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
    transformers.ElectraForSequenceClassification(config).save_pretrained(tmp_path)
    capsys.readouterr()
    _, outputs, _, _, head = export.load(tmp_path)
    note = capsys.readouterr().err
    assert outputs == ["last_hidden_state"] and head == {} and note.count("\n") == 1
    assert "left out classifier.*" in note and "BERT's classifier or span head" in note


# ----------------------------------------------------------------------------- superplm.py --init BERT

def bert_folder(folder, hidden=64, heads=4, layers=3):
    tokenizer = train_tokenizer(sentences(), 400, folder)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(folder)
    return hf


def start(tmp_path, init, *flags):
    tmp_path.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(sentences(200, seed=1)))
    cfg = superplm.parse_config(["--preset", "tiny", "--init", str(init), "--corpus", str(corpus), "--seq-len", "32",
                                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *flags])
    return superplm.setup(cfg, 0, 1, torch.device("cpu"))[0].eval()


def test_a_superplm_starts_from_a_pretrained_bert(tmp_path):
    hf = bert_folder(tmp_path / "bert")
    whole = start(tmp_path / "a", tmp_path / "bert", "--superplm-arch", "3-64-128-4-64")
    ids, mask, types = batch(vocab=hf.config.vocab_size)
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert (whole(ids, mask, types) - ref).abs().max() <= 1e-6
    smaller = start(tmp_path / "b", tmp_path / "bert", "--superplm-arch", "2-48-80-3-48")
    expected = extract(from_pretrained(tmp_path / "bert"), Arch(2, 48, 80, 3, 48))
    assert smaller.arch == Arch(2, 48, 80, 3, 48)
    for (name, a), (_, b) in zip(smaller.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="--superplm-arch that fits in 3-64-128-4-64"):
        start(tmp_path / "c", tmp_path / "bert", "--superplm-arch", "4-64-128-4-64")


def test_init_with_what_it_does_not_take_is_one_line(tmp_path, capsys):
    bert_folder(tmp_path / "bert", layers=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(dict(model_type="gpt2")))
    capsys.readouterr()
    for given, says in ((tmp_path / "bert" / "model.safetensors", "--init takes"), (tmp_path / "empty", "--init takes"),
                        (tmp_path / "gpt", "expected model_type 'bert' or 'electra'")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: superplm.main(["--preset", "tiny", "--init", str(given), "--out", str(tmp_path / "o")]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
        assert "--out" not in err  # no advice to write into the folder given


# ----------------------------------------------------------------------------- GLUE: AX.tsv

@pytest.mark.parametrize("data", ["glue_data", "glue_data/MNLI"])
def test_the_mnli_run_predicts_the_diagnostic_set(tmp_path, tok, data, capsys):  # noqa: F811
    root = tmp_path / "glue_data"
    make_mnli(root)
    glue.write_test_predictions("mnli", tmp_path / data, tok, 128, tmp_path, lambda f: np.zeros((len(f), 3)))
    assert "no " in capsys.readouterr().out and not (tmp_path / "AX.tsv").exists()  # no diagnostic/: no AX.tsv
    write_tsv(root / "diagnostic" / "diagnostic.tsv", [["index", "sentence1", "sentence2"], [0, "a cat", "a dog"],
                                                       [1, "the man", "a tree"]])
    glue.write_test_predictions("mnli", tmp_path / data, tok, 128, tmp_path,
                                lambda f: np.tile([0.0, 0.0, 1.0], (len(f), 1)))
    assert (tmp_path / "AX.tsv").read_text() == "index\tprediction\n0\tcontradiction\n1\tcontradiction\n"
    assert (tmp_path / "MNLI-m.tsv").read_text().count("contradiction") == 3
