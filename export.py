"""The last stage: a model folder to ONNX, checked on ONNX Runtime, optionally int8-quantized.

Any BERT folder (this project's of any qkv, transformers', the authors' released models) exports with torch's dynamo
exporter (latency.to_onnx), dynamic in batch and sequence, with its classifier or span head if any. ONNX Runtime must
match PyTorch within 1e-4 on padded batches of other shapes, or nothing is written; --int8 adds dynamic int8
quantization and its cost. An --out without .onnx is a folder: model.onnx (model.int8.onnx) beside the Hugging Face
folder and tokenizer files; --format hf writes only the latter (e.g. to load the authors' models in transformers).

    python export.py --model runs/further --out runs/export/model.onnx
    python export.py --model runs/finetune/mnli/best --out runs/export/mnli --int8   # a folder, + model.int8.onnx

Inputs: input_ids, attention_mask, token_type_ids, each (batch, sequence) int64. Outputs: last_hidden_state
(batch, sequence, hidden), or logits (batch, labels), or start_logits and end_logits (batch, sequence)."""

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common import UserError, atomic_write, flag, parse_flags, run_main
from data import tokenizer_files
from finetune import Finetuner
from latency import OrtModel, onnx_modules, quantize_int8, to_onnx
from model import from_pretrained, read_pretrained, save_pretrained


TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| accepted for the fp32 graph
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load(folder):
    """(module, output names, what it is, config, head tensors): the encoder, with the folder's BERT head if any."""
    if not (Path(folder) / "config.json").exists() and (Path(folder) / "checkpoint.pt").exists():
        raise UserError(f"{folder} is a SuperPLM run folder: export one of its sub-models, written by "
                        "`search.py --extract` or by further training (superplm.py --init ... --arch ...)")
    bert = from_pretrained(folder).eval()
    config, state = read_pretrained(folder)
    state = {k.split(".", 1)[1] if k.startswith(("bert.", "electra.")) else k: v for k, v in state.items()}
    span = "qa_outputs.weight" in state
    classifier = {"pooler.dense.weight", "classifier.weight"} <= state.keys()
    heads = ("qa_outputs.",) if span else ("pooler.", "classifier.") if classifier else ()  # transformers' BERT heads
    model, outputs, what = bert, ["last_hidden_state"], "bare encoder"
    if heads:
        model = Finetuner(bert, 2 if span else len(state["classifier.weight"]), span=span)
        model.load_state_dict({k.replace("qa_outputs", "qa").replace("pooler.dense", "pooler"): v
                               for k, v in state.items() if k.startswith(heads)}, strict=False)
        outputs, what = (["start_logits", "end_logits"], "span head") if span else (["logits"], "classifier")
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
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, T // 2:] = 0  # the last sequence is padded
        out.append(dict(input_ids=torch.randint(1, vocab, (B, T), generator=g), attention_mask=mask,
                        token_type_ids=(torch.arange(T) >= T // 3).long().expand(B, T)))
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


@dataclass
class Config:
    model: str = flag("", "model folder: this project's, transformers' BERT/ELECTRA, or the authors' released models")
    out: str = flag("runs/export", "a folder: model.onnx beside the Hugging Face folder; or an .onnx file (a bare "
                                   "name goes into runs/export/)")
    int8: bool = flag(False, "also write a dynamic int8-quantized copy (<name>.int8.onnx) and report its accuracy cost")
    format: str = flag("onnx", "hf: only the Hugging Face folder in --out, which stock transformers loads with its "
                               "Auto classes", choices=["onnx", "hf"])


def run(cfg):
    if not cfg.model:
        raise UserError("no model: pass --model FOLDER (written by save_pretrained, search.py --extract, further "
                        "training or finetune.py, or a Hugging Face BERT folder)")
    if cfg.format == "onnx":
        onnx_modules()  # fail early, before loading, if the extra is not installed
    model, outputs, what, config, head = load(cfg.model)
    bert, result = getattr(model, "bert", model), {}
    folder = cfg.format == "hf" or not cfg.out.endswith(".onnx")
    out = Path(cfg.out) / "model.onnx" if folder else Path(cfg.out)
    out = Path("runs/export") / out if not folder and out.parent == Path(".") else out  # not the repository root
    if cfg.format == "onnx":
        batches = check_inputs(bert.cfg["vocab_size"], bert.cfg["max_position"])
        proto = to_onnx(model, {k: v[:2, :16] for k, v in batches[2].items()}, outputs)
        worst, _, _ = compare(model, OrtModel(proto), batches)
        shapes = ", ".join("x".join(map(str, b["input_ids"].shape)) for b in batches)
        print(f"ONNX Runtime against PyTorch on batches {shapes} (padded): max abs difference {worst:.2e} "
              f"(limit {TOLERANCE:.0e})")
        if not worst <= TOLERANCE:
            raise UserError(f"the ONNX graph of {cfg.model} differs from the model by {worst:.2e} > "
                            f"{TOLERANCE:.0e}; nothing written (please report it with the folder's config.json)")
        print(f"exported {cfg.model} ({what}) -> {out} ({write(proto, out):.1f} MB); inputs {', '.join(INPUTS)} "
              f"(batch, sequence); outputs {', '.join(outputs)}")
        result = dict(max_abs_diff=worst)
    if cfg.int8 and cfg.format == "onnx":
        int8, path = quantize_int8(proto), out.with_suffix(".int8.onnx")
        worst, mean, same = compare(model, OrtModel(int8), batches)
        labels = f"; same argmax on {same:.1%} of predictions" if same is not None else ""
        print(f"int8 (dynamic quantization) -> {path} ({write(int8, path):.1f} MB): against PyTorch fp32, max abs "
              f"difference {worst:.3g}, mean {mean:.3g}{labels}")
        result.update(int8_max_abs_diff=worst, int8_mean_abs_diff=mean, int8_same_argmax=same)
    if folder:  # a folder: save_pretrained's (stock transformers loads it), the tokenizer's files
        labels = {k: config[k] for k in ("architectures", "id2label", "label2id", "problem_type") if k in config}
        save_pretrained(bert, out.parent, head, **(labels if head else {}))
        for f in tokenizer_files(cfg.model):
            shutil.copyfile(f, out.parent / f.name)
        print(f"wrote {cfg.model} ({what}) to {out.parent} as a Hugging Face folder with its tokenizer files")
    return result


def main(argv=None):
    return run(parse_flags(Config, argv, __doc__.splitlines()[0]))


if __name__ == "__main__":
    run_main(main)
