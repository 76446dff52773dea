"""The last stage: a model folder to ONNX, checked on ONNX Runtime, optionally int8-quantized.

The searched model is a BERT of an unusual shape (qkv != hidden); its ONNX graph runs wherever ONNX Runtime does.
`export.py` takes any model folder (this project's, transformers', the authors' released models): the encoder, with
BERT's classifier (pooler + classifier) or span head (qa_outputs) where the folder holds one, as finetune.py's best/
does; what else it holds is named in one line as left out. It exports with torch's dynamo exporter (latency.to_onnx)
with dynamic batch and sequence axes, and runs the graph on ONNX Runtime against our PyTorch model on a few padded
batches of other shapes than the example it was traced with: the largest absolute difference is printed, and above
1e-4 nothing is written. With --int8 it also writes ONNX Runtime's dynamic int8 quantization of the graph and
reports what that costs on the same inputs. An --out that is not an .onnx file is a folder: model.onnx
(model.int8.onnx), config.json and the tokenizer files, the layout deployment loaders read. --format hf writes
instead a Hugging Face folder that stock transformers loads with its Auto classes (e.g. from the authors' models).

    python export.py --model runs/further --out runs/export/model.onnx
    python export.py --model runs/finetune/mnli/best --out runs/export/mnli --int8    # a folder, + model.int8.onnx
    python export.py --model AutoTinyBERT-S4 --out runs/s4 --format hf

Inputs: input_ids, attention_mask, token_type_ids, each (batch, sequence) int64. Outputs: last_hidden_state
(batch, sequence, hidden), or logits (batch, labels), or start_logits and end_logits (batch, sequence).
"""

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common import UserError, atomic_write, flag, parse_flags, run_main, save_json
from data import tokenizer_files
from finetune import Finetuner
from latency import OrtModel, onnx_modules, quantize_int8, to_onnx
from model import from_pretrained, read_pretrained, save_pretrained


TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| accepted for the fp32 graph

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load(folder):
    """(module, output names, what it is, config, head tensors under transformers' names) of a model folder."""
    path = Path(folder)
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoint.pt").exists():
        raise UserError(f"{folder} is a SuperPLM run folder: export one of its sub-models, written by "
                        "`search.py --extract` or by further training (superplm.py --init ... --arch ...)")
    bert = from_pretrained(folder).eval()
    config, state = read_pretrained(folder)
    state = {k.split(".", 1)[1] if k.startswith(("bert.", "electra.")) else k: v for k, v in state.items()}
    take = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    model, outputs, what, heads = bert, ["last_hidden_state"], "bare encoder", ()
    if "qa_outputs.weight" in state:  # BertForQuestionAnswering's span head
        model, outputs, what, heads = Finetuner(bert, 2, span=True), ["start_logits", "end_logits"], "span head", \
            ("qa_outputs.",)
        model.qa.load_state_dict(take("qa_outputs."))
    elif "pooler.dense.weight" in state and getattr(state.get("classifier.weight"), "ndim", 0) == 2:
        model = Finetuner(bert, len(state["classifier.weight"]))  # BertForSequenceClassification's head
        outputs, what, heads = ["logits"], "classifier", ("pooler.", "classifier.")
        model.pooler.load_state_dict(take("pooler.dense."))
        model.classifier.load_state_dict(take("classifier."))
    left = sorted({k.split(".")[0] for k in state if not k.startswith(("embeddings", "encoder.") + heads)})
    if left:
        print(f"note: {folder}: exporting the {what}; left out {', '.join(p + '.*' for p in left)}: export.py takes "
              "the encoder and BERT's classifier or span head, not pre-training or other heads", file=sys.stderr)
    head = {("bert." if k.startswith("pooler.") else "") + k: v for k, v in state.items() if k.startswith(heads)}
    return model.eval(), outputs, f"{bert.arch}, {what}", config, head


def check_inputs(vocab, max_len):
    """Three padded batches of shapes other than the export's example (2, 16): dynamic axes in use."""
    g = torch.Generator().manual_seed(0)
    out = []
    for B, T in ((1, 7), (3, 40), (4, min(128, max_len))):
        ids = torch.randint(1, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, T // 2:] = 0  # the last sequence is padded
        types = torch.zeros(B, T, dtype=torch.long)
        types[:, T // 3:] = 1
        out.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types))
    return out


def as_tuple(out):
    return (out,) if torch.is_tensor(out) else tuple(out)


@torch.no_grad()
def compare(model, ort_model, batches):
    """(largest |difference|, mean |difference|, share of equal argmax predictions or None) of the outputs."""
    diffs, same = [], []
    for inputs in batches:
        for a, b in zip(as_tuple(model(**inputs)), as_tuple(ort_model(**inputs))):
            diffs.append((a - b).abs().flatten())
            if a.dim() == 2 and a.shape[-1] > 1:  # logits: the predicted label, or the span's start / end
                same.append(a.argmax(-1) == b.argmax(-1))
    d = torch.cat(diffs)
    return d.max().item(), d.mean().item(), torch.cat(same).float().mean().item() if same else None


def write(proto, path):
    onnx, _, _ = onnx_modules()
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return Path(path).stat().st_size / 1e6


def write_folder(cfg, bert, config, head):
    """--format hf: the folder as save_pretrained writes it (stock transformers' Auto classes load it), or beside
    model.onnx: config.json; both with the model's tokenizer files."""
    out = Path(cfg.out)
    if cfg.format == "hf":
        labels = ("architectures", "id2label", "label2id", "problem_type")
        save_pretrained(bert, out, head, **{k: config[k] for k in labels if k in config and head})
    else:  # the model's config, less the auto_map of a modeling file that is not there
        save_json({k: v for k, v in config.items() if k != "auto_map"}, out / "config.json")
    files = tokenizer_files(cfg.model)
    for f in files:
        shutil.copyfile(f, out / f.name)
    if not files:
        print(f"note: {cfg.model} has no tokenizer files (vocab.txt, tokenizer.json): {out} has none either")


@dataclass
class Config:
    model: str = flag("", "model folder: this project's (save_pretrained, search.py --extract, further training, "
                          "finetune.py's best/), transformers' BERT/ELECTRA, or the authors' released models")
    out: str = flag("model.onnx", "an .onnx file, or a folder: model.onnx, config.json and the tokenizer files")
    int8: bool = flag(False, "also write a dynamically int8-quantized copy beside --out (<name>.int8.onnx) and report "
                             "its accuracy cost")
    format: str = flag("onnx", "onnx: the ONNX graph; hf: --out becomes a Hugging Face folder that stock "
                               "transformers loads with its Auto classes", choices=["onnx", "hf"])


def run(cfg):
    if not cfg.model:
        raise UserError("no model: pass --model FOLDER (a folder written by save_pretrained, search.py --extract, "
                        "further training or finetune.py, or a Hugging Face BERT folder)")
    if cfg.format == "onnx":
        onnx_modules()  # fail early, before loading, if the extra is not installed
    model, outputs, what, config, head = load(cfg.model)
    bert = model.bert if hasattr(model, "bert") else model
    if cfg.format == "hf":
        write_folder(cfg, bert, config, head)
        return print(f"wrote {cfg.model} ({what}) to {cfg.out} as a Hugging Face folder: AutoModel.from_pretrained("
                     f"{cfg.out!r}, trust_remote_code=True)")
    onnx_file = Path(cfg.out) if cfg.out.endswith(".onnx") else Path(cfg.out) / "model.onnx"
    batches = check_inputs(bert.cfg["vocab_size"], bert.cfg["max_position"])
    proto = to_onnx(model, {k: v[:2, :16] for k, v in batches[2].items()}, outputs)
    worst, _, _ = compare(model, OrtModel(proto), batches)
    result = dict(max_abs_diff=worst)
    shapes = ", ".join("x".join(map(str, b["input_ids"].shape)) for b in batches)
    print(f"ONNX Runtime against PyTorch on batches {shapes} (padded): max abs difference {worst:.2e} "
          f"(limit {TOLERANCE:.0e})")
    if not worst <= TOLERANCE:
        raise UserError(f"the ONNX graph of {cfg.model} differs from the model by {worst:.2e} > {TOLERANCE:.0e}; "
                        "nothing written (please report it with the folder's config.json)")
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"exported {cfg.model} ({what}) -> {onnx_file} ({write(proto, onnx_file):.1f} MB); inputs "
          f"{', '.join(INPUTS)} (batch, sequence); outputs {', '.join(outputs)}")
    if onnx_file.name == "model.onnx":
        write_folder(cfg, bert, config, head)
    if cfg.int8:
        int8, path = quantize_int8(proto), onnx_file.with_suffix(".int8.onnx")
        worst, mean, same = compare(model, OrtModel(int8), batches)
        labels = f"; same argmax on {same:.1%} of predictions" if same is not None else ""
        print(f"int8 (dynamic quantization) -> {path} ({write(int8, path):.1f} MB): against PyTorch fp32, max abs "
              f"difference {worst:.3g}, mean {mean:.3g}{labels}")
        result.update(int8_max_abs_diff=worst, int8_mean_abs_diff=mean, int8_same_argmax=same)
    return result


def main(argv=None):
    return run(parse_flags(Config, argv, __doc__.splitlines()[0]))


if __name__ == "__main__":
    run_main(main)
