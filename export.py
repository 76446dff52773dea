"""The last stage: a model folder to ONNX, checked on ONNX Runtime, optionally int8-quantized.

The searched model is a BERT of an unusual shape (qkv != hidden); its ONNX graph runs wherever ONNX Runtime does.
`export.py` takes any folder this project writes (save_pretrained, search.py --extract, further training: the
bare encoder; finetune.py's best/: the encoder with its GLUE classifier or SQuAD span head), exports it with
torch's dynamo exporter (latency.to_onnx) with dynamic batch and sequence axes, and runs the graph on ONNX
Runtime against our PyTorch model on a few padded batches of other shapes than the example it was traced with:
the largest absolute difference is printed, and above 1e-4 nothing is written. With --int8 it also writes
ONNX Runtime's dynamic int8 quantization of the graph and reports what that costs on the same inputs.

    python export.py --model runs/further --out runs/export/model.onnx
    python export.py --model runs/finetune/mnli/best --out runs/export/mnli.onnx --int8     # + mnli.int8.onnx

Inputs: input_ids, attention_mask, token_type_ids, each (batch, sequence) int64. Outputs: last_hidden_state
(batch, sequence, hidden), or logits (batch, labels), or start_logits and end_logits (batch, sequence).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from common import UserError, atomic_write, flag, parse_flags, run_main, torch_load
from finetune import load_model
from latency import OrtModel, onnx_modules, quantize_int8, to_onnx
from model import from_pretrained


TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| accepted for the fp32 graph

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load(folder):
    """(module, output names, what it is) of a model folder: the bare encoder, or with its fine-tuned head."""
    path = Path(folder)
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoint.pt").exists():
        raise UserError(f"{folder} is a SuperPLM run folder: export one of its sub-models, written by "
                        "`search.py --extract` or by further training (superplm.py --init ... --arch ...)")
    if (path / "head.pt").exists():  # finetune.py's checkpoint
        task = torch_load(path / "head.pt").get("task")
        model = load_model(folder, task)[0]
        outputs = ["start_logits", "end_logits"] if model.span else ["logits"]
        return model.eval(), outputs, f"{model.bert.arch} with its {task} head"
    model = from_pretrained(folder)
    return model.eval(), ["last_hidden_state"], f"{model.arch}, bare encoder"


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


@dataclass
class Config:
    model: str = flag("", "model folder written by this project (save_pretrained, search.py --extract, further "
                          "training, finetune.py's best/)")
    out: str = flag("model.onnx", "the ONNX file to write (a bare name goes into runs/export/)")
    int8: bool = flag(False, "also write a dynamically int8-quantized copy beside --out (<name>.int8.onnx) and report "
                             "its accuracy cost")


def run(cfg):
    if not cfg.model:
        raise UserError("no model: pass --model FOLDER (a folder written by save_pretrained, search.py --extract, "
                        "further training or finetune.py)")
    onnx_modules()  # fail early, before loading, if the extra is not installed
    model, outputs, what = load(cfg.model)
    bert = model.bert if hasattr(model, "bert") else model
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
    out = Path(cfg.out) if Path(cfg.out).parent != Path(".") else Path("runs/export") / cfg.out  # not the repository
    size = write(proto, out)
    print(f"exported {cfg.model} ({what}) -> {out} ({size:.1f} MB); inputs {', '.join(INPUTS)} "
          f"(batch, sequence); outputs {', '.join(outputs)}")
    if cfg.int8:
        int8 = quantize_int8(proto)
        path = out.with_suffix(".int8.onnx")
        worst, mean, same = compare(model, OrtModel(int8), batches)
        size = write(int8, path)
        labels = f"; same argmax on {same:.1%} of predictions" if same is not None else ""
        print(f"int8 (dynamic quantization) -> {path} ({size:.1f} MB): against PyTorch fp32, max abs difference "
              f"{worst:.3g}, mean {mean:.3g}{labels}")
        result.update(int8_max_abs_diff=worst, int8_mean_abs_diff=mean, int8_same_argmax=same)
    return result


def main(argv=None):
    return run(parse_flags(Config, argv, __doc__.splitlines()[0]))


if __name__ == "__main__":
    run_main(main)
