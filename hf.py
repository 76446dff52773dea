"""Hugging Face BERT folders (config.json + model.safetensors), read and written in transformers' layout.

`save_pretrained(model, folder)` writes what transformers' BertForMaskedLM would, plus modeling_autotinybert.py so
that stock transformers loads any Q/K/V width (paper Appendix A: `qkv_size`) with trust_remote_code=True; a model
whose qkv equals its hidden size is a plain BERT and loads without it. `from_pretrained(folder)` reads such a
folder, or one transformers wrote for BERT or ELECTRA (the paper's teacher), into a Bert.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import UserError, atomic_write, save_json
from model import Arch, Bert

# transformers' classes for any qkv: modeling_autotinybert.py, written into every saved folder
HF_MODELING = Path(__file__).with_name("modeling_autotinybert.py")
HF_AUTO_MAP = {f"AutoModel{task}": f"modeling_autotinybert.AutoTinyBert{task or 'Model'}"
               for task in ("", "ForMaskedLM", "ForSequenceClassification", "ForQuestionAnswering")}


def read_pretrained(folder):
    """(config dict, state dict) of a Hugging Face BERT/ELECTRA folder; never unpickles code."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist: expected a folder with config.json and "
                        "model.safetensors or pytorch_model.bin")
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: expected a Hugging Face BERT/ELECTRA folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{folder}/config.json is not JSON ({e}): save or download the model again") from None
    if config.get("model_type") not in ("bert", "electra"):
        raise UserError(f"{folder} holds a {config.get('model_type')!r} model: expected model_type 'bert' "
                        "or 'electra'")
    if (folder / "model.safetensors").exists():
        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return config, state


def _hf_names(layers, emb_proj):
    """(our parameter name, Hugging Face name without the 'bert.'/'electra.' prefix)."""
    pairs = [("word.weight", "embeddings.word_embeddings.weight"),
             ("position.weight", "embeddings.position_embeddings.weight"),
             ("token_type.weight", "embeddings.token_type_embeddings.weight"),
             ("emb_ln.weight", "embeddings.LayerNorm.weight"), ("emb_ln.bias", "embeddings.LayerNorm.bias")]
    if emb_proj:
        pairs += [(f"emb_proj.{p}", f"embeddings_project.{p}") for p in ("weight", "bias")]
    parts = [("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
             ("o", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
             ("fc1", "intermediate.dense"), ("fc2", "output.dense"), ("ln2", "output.LayerNorm")]
    for i in range(layers):
        pairs += [(f"layers.{i}.{a}.{p}", f"encoder.layer.{i}.{b}.{p}") for a, b in parts for p in ("weight", "bias")]
    pairs += [("mlm_dense.weight", "cls.predictions.transform.dense.weight"),
              ("mlm_dense.bias", "cls.predictions.transform.dense.bias"),
              ("mlm_ln.weight", "cls.predictions.transform.LayerNorm.weight"),
              ("mlm_ln.bias", "cls.predictions.transform.LayerNorm.bias"), ("mlm_bias", "cls.predictions.bias")]
    return pairs


def hf_state_dict(model, prefix="bert."):
    """Our state dict under transformers' BertForMaskedLM names."""
    ours = model.state_dict()
    out = {(hf if hf.startswith("cls.") else prefix + hf): ours[name]
           for name, hf in _hf_names(model.arch.layers, model.emb_proj is not None)}
    out["cls.predictions.decoder.weight"] = ours["word.weight"]
    out["cls.predictions.decoder.bias"] = ours["mlm_bias"]
    return out


def save_pretrained(model, folder, head=None, **config_fields):
    """Write config.json + model.safetensors as transformers' BertForMaskedLM does, plus the modeling file
    that lets stock transformers load any qkv (trust_remote_code=True; a plain BERT loads without it).
    `head`: more tensors under transformers' names (a fine-tuned head); `config_fields` go into config.json."""
    a, c = model.arch, model.cfg
    config = dict(architectures=["BertForMaskedLM"], auto_map=HF_AUTO_MAP, model_type="bert",
                  vocab_size=c["vocab_size"],
                  hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  intermediate_size=a.ffn, hidden_act=c["act"], hidden_dropout_prob=c["dropout"],
                  attention_probs_dropout_prob=c["dropout"], max_position_embeddings=c["max_position"],
                  type_vocab_size=c["type_vocab"], layer_norm_eps=c["eps"], initializer_range=0.02,
                  pad_token_id=0)
    if a.qkv != a.hidden:
        config["qkv_size"] = a.qkv
    if c["embedding_size"]:
        config["embedding_size"] = c["embedding_size"]
    config.update(config_fields)
    tensors = {k: v.detach().contiguous().clone() for k, v in dict(hf_state_dict(model), **(head or {})).items()
               if k != "cls.predictions.decoder.weight"}  # tied: safetensors stores no shared tensors
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(folder) / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    modeling = HF_MODELING.read_text()  # copied as text: the product never imports it
    atomic_write(Path(folder) / HF_MODELING.name, lambda tmp: Path(tmp).write_text(modeling))
    save_json(config, Path(folder) / "config.json")


def from_pretrained(folder, mha="heads", dropout=None):
    """Load a BERT or ELECTRA(-discriminator) folder written by transformers, or by save_pretrained."""
    config, state = read_pretrained(folder)
    qkv = config.get("qkv_size") or config["hidden_size"]
    arch = Arch(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                config["num_attention_heads"], qkv)
    emb = config.get("embedding_size")
    model = Bert(arch, vocab_size=config["vocab_size"], mha=mha,
                max_position=config.get("max_position_embeddings", 512),
                type_vocab=config.get("type_vocab_size", 2), eps=config.get("layer_norm_eps", 1e-12),
                act=config.get("hidden_act", "gelu"),
                dropout=config.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
                embedding_size=emb if emb and emb != arch.hidden else None)
    ours = {}
    for name, hf in _hf_names(arch.layers, model.emb_proj is not None):
        for key in (hf, "bert." + hf, "electra." + hf, hf.replace("weight", "gamma").replace("bias", "beta")):
            if key in state:
                ours[name] = state[key]
                break
    missing = [n for n in model.state_dict() if n not in ours and not n.startswith("mlm")]
    if missing:
        raise UserError(f"{folder} is not a complete BERT/ELECTRA checkpoint: missing weights for {missing[:3]}")
    model.load_state_dict(ours, strict=False)  # a discriminator has no MLM head: it keeps its fresh init
    model.has_mlm_head = "mlm_dense.weight" in ours
    return model
