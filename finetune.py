"""Task fine-tuning on GLUE and SQuAD v1.1 (paper §4.1, Appendix D, Table D.1).

Every score of the paper's Tables 1, 2 and F.1 is a dev score after fine-tuning as BERT and TinyBERT do: BERT's
pooler + a classifier (SQuAD: a span head), AdamW with 10% linear warm-up then linear decay, dev after every epoch,
for every (lr, epochs) of the §4.1 grid; the best counts. Table D.1 (the default) is each task's cell of it.

    python finetune.py --task rte --model runs/further --data glue_data/RTE --preset tiny   # minutes on 2 CPU cores
    python finetune.py --task mnli --model runs/further --data glue_data/MNLI --lr 1e-5 2e-5 3e-5 --epochs 4 5 10

--out holds config.json, metrics.jsonl (every epoch), log.txt, best/ (the best model: a Hugging Face folder with its
head), results.json, and GLUE's test predictions (MNLI-m.tsv, ...) or SQuAD's dev predictions.json."""

import copy
import dataclasses
import json
import shutil
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (COUNT, DEVICE_HELP, DTYPES, DTYPE_HELP, Interrupted, NONNEGATIVE, POSITIVE, RunFolder, SHARE,
                    THREADS_HELP, UserError, append_jsonl, check_config, config_parser, flag, parse_flags,
                    resolve_compute, run_main, save_json, seed_everything, stop_after_step, to_device, torch_load,
                    torch_save)
from data import load_tokenizer, tokenizer_files
from model import Arch, Bert, extract, from_pretrained, learning_rate, make_optimizer, read_pretrained, save_pretrained
from superplm import load_superplm
from tasks.glue import GLUE, TASKS, glue_task, hf_labels, task_name, write_test_predictions
from tasks.squad import squad_task


# Table D.1: (batch size, learning rate, epochs), each task's cell of the §4.1 grid (GLUE: batch 32, lr from
# {1e-5, 2e-5, 3e-5}, epochs from {4, 5, 10}; SQuAD: 16, 3e-5, 4). WNLI is not in the paper: the grid's middle.
TABLE_D1 = {"squad": (16, 3e-5, 4), "sst2": (32, 2e-5, 4), "mnli": (32, 3e-5, 4), "mrpc": (32, 2e-5, 10),
            "cola": (32, 1e-5, 10), "qnli": (32, 2e-5, 10), "qqp": (32, 2e-5, 5), "stsb": (32, 3e-5, 10),
            "rte": (32, 2e-5, 10), "wnli": (32, 2e-5, 5)}
D1_LR, D1_EPOCHS = (", ".join(f"{t} {cell[i]:g}" for t, cell in TABLE_D1.items()) for i in (1, 2))  # for --help


def paper_settings(task):
    """The settings that depend on the task: Table D.1's, and 128 tokens per input (SQuAD: windows of 384)."""
    batch_size, lr, epochs = TABLE_D1[task]
    return dict(batch_size=batch_size, lr=[lr], epochs=[epochs], max_len=384 if task == "squad" else 128)


def sweep(cfg, base, feats, targets, evaluate, pad, compute, log, stop=None):
    """The §4.1 grid, each (lr, epochs) on a copy of `base` seeded alike: yields (record, model, dev predictions)."""
    steps_per_epoch = -(-len(feats) // cfg.batch_size)
    for lr in cfg.lr:
        for epochs in cfg.epochs:
            seed_everything(cfg.seed)  # every run starts alike: head, dropout and the order of the examples
            model = copy.deepcopy(base).to(compute.device)
            opt, sched = optimizer_and_schedule(model, lr, epochs * steps_per_epoch, cfg.warmup)
            generator = torch.Generator().manual_seed(cfg.seed)
            for epoch in range(1, epochs + 1):
                t0 = time.time()
                loss = train_epoch(model, feats, targets, cfg.batch_size, opt, sched, generator, pad, compute.device,
                                   f"{cfg.task} lr {lr:g} epoch {epoch}/{epochs}", compute.autocast,
                                   lambda line: log(line, terminal=False), cfg.log_every, stop)
                metrics, predictions = evaluate(lambda f: predict(model, f, 2 * cfg.batch_size, pad, compute.device,
                                                                  compute.autocast))
                log(f"{cfg.task} lr {lr:g} epochs {epochs} | epoch {epoch} loss {loss:.4f} | "
                    + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" | {time.time() - t0:.0f}s")
                record = dict(task=cfg.task, lr=lr, epochs=epochs, epoch=epoch, train_loss=loss, **metrics)
                yield record, model, predictions


def optimizer_and_schedule(model, lr, steps, warmup, weight_decay=0.01):
    opt = make_optimizer(model.parameters(), lr, weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: learning_rate(step, steps, 1.0, warmup))


def train_epoch(model, feats, targets, batch_size, opt, sched, generator, pad, device, desc, autocast=nullcontext,
                log=None, log_every=50, stop=None):
    """One pass in a seeded random order; returns the mean loss, read from the device (a wait for the GPU) only every
    log_every steps, for the bar and log(line). A SIGINT/SIGTERM (stop.signal) ends it after the step in progress."""
    model.train()
    order, total = torch.randperm(len(feats), generator=generator), 0.0
    bar = tqdm(range(0, len(feats), batch_size), desc=desc, leave=False, disable=None)  # no bar off a terminal
    for step, i in enumerate(bar, 1):
        idx = order[i:i + batch_size]
        y = to_device(dict(y=targets[idx]), device)["y"]
        with autocast():
            loss = loss_fn(model, model(**collate([feats[j] for j in idx], pad, device)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        total += loss.detach() * len(idx)
        if step % log_every == 0 or step == len(bar):
            value = loss.item()
            bar.set_postfix(loss=f"{value:.4f}")
            if log:
                log(f"{desc} | step {step}/{len(bar)} | loss {value:.4f} | lr {sched.get_last_lr()[0]:.2e}")
        if stop is not None and stop.signal:
            bar.close()
            raise KeyboardInterrupt
    return float(total) / max(len(feats), 1)


def best_of_sweep(cfg, compute, folder, stop):
    """Run the grid on cfg.task and keep the best dev score (with a run folder: its model, metrics, predictions)."""
    out = folder.path if folder else None

    def log(line, terminal=True):  # OUT/log.txt: a line every N steps (the terminal has the bar) and each epoch
        if terminal:
            tqdm.write(line)
        if out:
            with open(out / "log.txt", "a") as f:
                f.write(line + "\n")
    seed_everything(cfg.seed)
    base, checkpoint_tokenizer = load_model(cfg.model, cfg.task, cfg.arch)  # every run starts from this model and head
    tokenizer_path = cfg.tokenizer or checkpoint_tokenizer or cfg.model
    tok = load_tokenizer(tokenizer_path)
    pad = tok.token_to_id("[PAD]")
    data, n_train, n_dev = cfg.data or None, cfg.max_train_examples, cfg.max_eval_examples
    if cfg.task == "squad":
        feats, targets, evaluate = squad_task(tok, data, cfg.max_len, cfg.doc_stride, n_train, n_dev, cfg.seed)
    else:
        feats, targets, evaluate = glue_task(cfg.task, data, tok, cfg.max_len, n_train, n_dev, cfg.seed)
    # (N,) classes, or STS-B's scores; SQuAD (N, 2): the answer's first and last token
    targets = torch.tensor(targets, dtype=torch.float if cfg.task == "stsb" else torch.long)
    if not feats:
        raise UserError(f"{cfg.task}: no training examples")
    best, runs = None, []  # the best epoch of the grid, of each run
    for record, model, predictions in sweep(cfg, base, feats, targets, evaluate, pad, compute, log, stop):
        if out:
            append_jsonl(out / "metrics.jsonl", dict(kind="epoch", **record))
        if record["epoch"] == 1:  # a new run of the grid
            runs.append(record)
        elif record["score"] > runs[-1]["score"]:
            runs[-1] = record
        if best is None or record["score"] > best["score"]:
            best = record
            if out:
                save_checkpoint(model, out / "best", cfg.task, tokenizer_path, record)
                if predictions is not None:  # SQuAD's official {id: text}
                    save_json(predictions, out / "predictions.json")
                folder.done_first()
        if out and record["epoch"] == record["epochs"]:
            append_jsonl(out / "metrics.jsonl", dict(kind="run", **runs[-1]))
    result = dict(best, runs=runs)
    if out:
        append_jsonl(out / "metrics.jsonl", dict(kind="best", **best))
        save_json(result, out / "results.json")
        if cfg.task != "squad":  # GLUE's test predictions, by the best model
            best_model = load_model(out / "best", cfg.task)[0].to(compute.device)
            write_test_predictions(cfg.task, data, tok, cfg.max_len, out, lambda f: predict(
                best_model, f, 2 * cfg.batch_size, pad, compute.device, compute.autocast))
    print(f"{best['task']} best: lr {best['lr']:g} epochs {best['epochs']} epoch {best['epoch']} score "
          f"{best['score']:.2f}" + (f" -> {out}/ (best/, results.json, metrics.jsonl, log.txt)" if out else ""))
    return result


class Finetuner(nn.Module):
    """A BERT with BERT's pooler (dense + tanh on [CLS]) and a classifier, or a start/end span head (SQuAD)."""

    def __init__(self, bert, outputs, span=False):
        super().__init__()
        C = bert.arch.hidden
        self.bert, self.span = bert, span
        if span:
            self.qa = nn.Linear(C, 2)
        else:
            self.pooler = nn.Linear(C, C)
            self.drop = nn.Dropout(bert.dropout)
            self.classifier = nn.Linear(C, outputs)
        for m in [self.qa] if span else [self.pooler, self.classifier]:
            Bert._init(m)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.span:
            return self.qa(h).unbind(-1)  # start, end: (B, T) each
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, C)
        return self.classifier(self.drop(pooled))  # (B, outputs)

    def hf_head(self, task):
        """The head under transformers' names, and config.json's fields for BertFor{SequenceClassification,...}."""
        if self.span:
            return {f"qa_outputs.{k}": v for k, v in self.qa.state_dict().items()}, dict(
                architectures=["BertForQuestionAnswering"])
        tensors = {f"bert.pooler.dense.{k}": v for k, v in self.pooler.state_dict().items()}
        tensors.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        return tensors, dict(architectures=["BertForSequenceClassification"], **hf_labels(task))


def load_model(folder, task, arch=""):
    """(model, tokenizer path or None): a Hugging Face folder's BERT, or the sub-model `arch` of a SuperPLM (§3.4),
    with the folder's head.pt for this task, else a fresh head (with the checkpoint's pooler, if any)."""
    path, outputs = Path(folder), 2 if task == "squad" else len(GLUE[task].labels) or 1
    try:  # a Hugging Face model folder (config.json with a model_type), not only a run folder with its config.json
        model_folder = "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        model_folder = False
    if (arch or not model_folder) and (path.suffix == ".pt" or (path / "checkpoint.pt").exists()):
        superplm, _, tokenizer = load_superplm(path)
        bert = extract(superplm, Arch.parse(arch) if arch else superplm.arch).train()
        return Finetuner(bert, outputs, span=task == "squad"), tokenizer
    if arch:
        raise UserError(f"--arch needs a SuperPLM run folder or checkpoint.pt to extract from; {folder} has none")
    model = Finetuner(from_pretrained(folder), outputs, span=task == "squad")
    head = torch_load(path / "head.pt") if (path / "head.pt").exists() else {}
    if head.get("task") == task:
        model.load_state_dict(head["head"], strict=False)
    elif not model.span:
        pooler = {k.rsplit(".", 1)[1]: v for k, v in read_pretrained(folder)[1].items() if "pooler.dense." in k}
        if len(pooler) == 2:
            model.pooler.load_state_dict(pooler)
    return model, None


def save_checkpoint(model, folder, task, tokenizer_path, record):
    """save_pretrained + head.pt + tokenizer + dev metrics, written beside `folder` and swapped in whole."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    head, config = model.hf_head(task)
    save_pretrained(model.bert, tmp, head, **config)
    torch_save({"task": task, "head": {k: v for k, v in model.state_dict().items() if not k.startswith("bert.")}},
               tmp / "head.pt")
    for f in tokenizer_files(tokenizer_path):
        shutil.copyfile(f, tmp / f.name)
    save_json(record, tmp / "dev_metrics.json")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def collate(feats, pad, device):
    """Pad (ids, types) pairs to the longest: input_ids, attention_mask, token_type_ids, each (B, T)."""
    T = max(len(ids) for ids, _ in feats)
    ids = torch.full((len(feats), T), pad, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for k, (i, t) in enumerate(feats):
        ids[k, :len(i)], types[k, :len(t)], mask[k, :len(i)] = torch.tensor(i), torch.tensor(t), 1
    return to_device(dict(input_ids=ids, attention_mask=mask, token_type_ids=types), device)


def loss_fn(model, out, y):
    if model.span:  # mean of the start and end cross-entropies
        return (F.cross_entropy(out[0], y[:, 0]) + F.cross_entropy(out[1], y[:, 1])) / 2
    return F.mse_loss(out.squeeze(-1), y) if out.shape[-1] == 1 else F.cross_entropy(out, y)  # STS-B: regression


@torch.no_grad()
def predict(model, feats, batch_size, pad, device, autocast=nullcontext):
    """GLUE: logits (N, outputs). SQuAD: per window, (start, end) logits over its tokens. One copy to the host."""
    model.eval()
    if not feats:
        return [] if model.span else np.zeros((0, 1))
    T = max(len(ids) for ids, _ in feats)  # SQuAD: every batch's logits padded to the longest window
    out = []
    for i in range(0, len(feats), batch_size):
        with autocast():
            logits = model(**collate(feats[i:i + batch_size], pad, device))
        out.append(torch.stack([F.pad(x.float(), (0, T - x.shape[1])) for x in logits], -1) if model.span
                   else logits.float())  # SQuAD: (B, T, 2), GLUE: (B, outputs)
    out = torch.cat(out).cpu().numpy()  # one per batch would make the host wait for every batch
    return [(out[k, :len(ids), 0], out[k, :len(ids), 1]) for k, (ids, _) in enumerate(feats)] if model.span else out


@dataclass
class Config:
    """lr, epochs, batch_size and max_len: None means the task's value (paper_settings); --help shows MNLI's."""
    task: str = flag("mnli", "GLUE task or squad (SQuAD v1.1); any case, RTE = rte", choices=TASKS, type=task_name)
    preset: str = flag("paper", "paper: Table D.1's settings, all the data; tiny: one epoch on 2000 training and 1000 "
                                "dev examples (search.py's evaluator budget), minutes on 2 CPU cores. Flags given win "
                                "over a preset's defaults", choices=["paper", "tiny"])
    model: str = flag("", "model folder: save_pretrained's (any qkv), a BERT/ELECTRA one, or a SuperPLM run folder")
    arch: str = flag("", "with a SuperPLM run folder as --model: the sub-model to fine-tune, e.g. 5-564-1054-8-512")
    tokenizer: str = flag("", "vocab.txt / tokenizer.json or a folder with one; empty: the model's")
    data: str = flag("", "GLUE: the task's folder in the original layout (or glue_data/ holding it); SQuAD: the folder "
                         "of train-v1.1.json and dev-v1.1.json; empty: load with datasets (online)")
    lr: Optional[list[float]] = flag(None, "peak learning rates; several, with several --epochs, run the §4.1 grid "
                                           f"(1e-5 2e-5 3e-5 x 4 5 10). Default: Table D.1's for the task ({D1_LR}); "
                                           "shown: MNLI's", **POSITIVE)
    epochs: Optional[list[int]] = flag(None, f"epoch counts: Table D.1's ({D1_EPOCHS}); shown: MNLI's", **COUNT)
    batch_size: Optional[int] = flag(None, "Table D.1's: 32, SQuAD 16", **COUNT)
    max_len: Optional[int] = flag(None, "tokens per input: 128, SQuAD 384", min=3, max=512)
    doc_stride: int = flag(128, "SQuAD: tokens between the starts of two windows", **COUNT)
    warmup: float = flag(0.1, "share of the steps with a linear warm-up", **SHARE)
    max_train_examples: Optional[int] = flag(None, "train on a seeded random subset of this many examples; default: "
                                                   "all of them", **COUNT)
    max_eval_examples: Optional[int] = flag(None, "evaluate on a seeded random dev subset of this many examples; "
                                                  "default: all of them", **COUNT)
    seed: int = flag(0, "seed of the head, dropout, order and subsets", **NONNEGATIVE)
    log_every: int = flag(50, "one line in OUT/log.txt every N steps", **COUNT)
    out: str = flag("", "run folder; empty: runs/finetune/<task>, --preset tiny: runs/finetune-tiny/<task>")
    overwrite: bool = flag(False, "replace an existing run folder")
    device: str = flag("auto", DEVICE_HELP)
    dtype: str = flag("auto", DTYPE_HELP, choices=["auto", *DTYPES])
    threads: Optional[int] = flag(None, THREADS_HELP, **COUNT)


PRESETS = {"paper": {}, "tiny": dict(epochs=[1], max_train_examples=2000, max_eval_examples=1000)}


def run(cfg, argv=None):
    """Fine-tune over the grid; returns the best dev metrics (+ lr, epochs, epoch, runs). Files only with cfg.out."""
    check_config(cfg)
    name = task_name(cfg.task)
    if not cfg.model:
        raise UserError("no model: pass --model FOLDER (save_pretrained output, a BERT/ELECTRA folder or a SuperPLM "
                        "run folder with --arch)")
    cfg = dataclasses.replace(cfg, task=name, **{k: v for k, v in paper_settings(name).items()
                                                 if getattr(cfg, k) is None})
    compute = resolve_compute(cfg.device, cfg.dtype, cfg.threads)
    folder = RunFolder(cfg.out, cfg, overwrite=cfg.overwrite, argv=argv) if cfg.out else None
    # with a folder, stop after the step in progress; without (search.py's evaluator), signals are the caller's
    stopper = stop_after_step() if folder else nullcontext(types.SimpleNamespace(signal=None))
    with folder or nullcontext(), stopper as stop:
        try:
            return best_of_sweep(cfg, compute, folder, stop)
        except KeyboardInterrupt:
            if folder is None:
                raise
            signal, out = stop.signal or "stopped", cfg.out
            if not folder.first:
                raise Interrupted(f"{signal} before the first epoch ended: nothing kept, {out} is as it was") from None
            best = json.loads((folder.path / "best" / "dev_metrics.json").read_text())  # every finished epoch is kept
            raise Interrupted(f"{signal}: kept {out}/metrics.jsonl (every finished epoch) and {out}/best/ (lr "
                              f"{best['lr']:g} epochs {best['epochs']} epoch {best['epoch']}, score "
                              f"{best['score']:.2f}); a grid does not resume: run it again with --overwrite (or only "
                              "the missing --lr/--epochs with another --out)") from None


def main(argv=None):
    parser = config_parser(Config, __doc__.split("\n\n")[0])
    parser.set_defaults(**paper_settings("mnli"))  # what --help shows: the default task's
    cfg = parse_flags(Config, argv, parser=parser,
                      defaults=lambda first: dict(paper_settings(first.task), **PRESETS[first.preset]))
    out = cfg.out or f"runs/finetune{'-tiny' if cfg.preset == 'tiny' else ''}/{cfg.task}"
    return run(dataclasses.replace(cfg, out=out), argv)


if __name__ == "__main__":
    run_main(main)
