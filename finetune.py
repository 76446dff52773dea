"""Fine-tuning on GLUE and SQuAD v1.1 (paper §4.1, Appendix D, Table D.1).

Every score in the paper's Tables 1, 2 and F.1 is a dev score after fine-tuning a model on each task. This file
  - reads GLUE (the original TSV layout, or `datasets`) and SQuAD v1.1 (squad.py: the official JSON, or `datasets`),
  - encodes sentence pairs (128 tokens) and SQuAD windows (384 tokens, document stride 128, see squad.py),
  - puts BERT's pooler + a classifier (or a start/end span head) on a model folder and trains it with AdamW,
    10% linear warm-up then linear decay, evaluating on dev after every epoch, over the lr x epochs grid of §4.1,
  - keeps the best dev score and its checkpoint, and writes GLUE test predictions / SQuAD dev predictions.

    python finetune.py --task mnli --model runs/further --data glue_data/MNLI --lr 1e-5 2e-5 3e-5 --epochs 4 5 10

search.py's evaluator calls `finetune(model_folder, "mnli", ...)` with a small budget and reads result["score"].
"""

import copy
import json
import shutil
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (COUNT, DEVICE_HELP, DTYPE_HELP, DTYPES, NONNEGATIVE, POSITIVE, SHARE, Interrupted, UserError, append_jsonl, atomic_write, check_config, load_hub_dataset, parse_config,
                    resolve_compute, run_main, save_json, seed_everything, stop_after_step, to_device, torch_load,
                    torch_save)
from hf import from_pretrained, read_pretrained, save_pretrained
from model import Arch, Bert, extract, learning_rate, make_optimizer
from runs import RunFolder, load_superplm
from squad import decode, read_squad, squad_scores, squad_windows
from tokenizer import load_tokenizer, tokenizer_files

# ----------------------------------------------------------------------------- tasks and Table D.1


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's fields live: header names in the original TSV files, column names in `datasets`."""
    folder: str          # the task's folder in glue_data/, also its submission file's name
    text: tuple          # text columns of the TSV files: one sentence or a pair
    hub_text: tuple      # the same columns in the `datasets` copy
    label: str           # label column of the TSV files
    labels: tuple        # label names in `datasets`' order (the index is the class); () for a regression
    dev: tuple = (("dev", ""),)  # (TSV stem, suffix of its metric names); the first one selects the model
    test: tuple = ()     # (TSV stem, submission name); () means (("test", folder),)
    no_header: tuple = ()  # column names of the train/dev files that have no header line (CoLA)
    skip_malformed: bool = False  # skip (and count) lines with missing fields instead of refusing the file (QQP)


BINARY, NLI = ("0", "1"), ("entailment", "not_entailment")
GLUE = {
    "cola": GlueTask("CoLA", ("sentence",), ("sentence",), "label", BINARY,
                     no_header=("source", "label", "author_label", "sentence")),
    "sst2": GlueTask("SST-2", ("sentence",), ("sentence",), "label", BINARY),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", BINARY),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", ()),
    "qqp": GlueTask("QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", BINARY,
                    skip_malformed=True),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
                     ("entailment", "neutral", "contradiction"),
                     dev=(("dev_matched", ""), ("dev_mismatched", "_mm")),
                     test=(("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm"))),
    "qnli": GlueTask("QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", NLI),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", BINARY),
}
TASKS = tuple(GLUE) + ("squad",)

# Table D.1: (batch size, learning rate, epochs). WNLI is not in the paper's tables: the middle of the §4.1 grid.
TABLE_D1 = {"squad": (16, 3e-5, 4), "sst2": (32, 2e-5, 4), "mnli": (32, 3e-5, 4), "mrpc": (32, 2e-5, 10),
            "cola": (32, 1e-5, 10), "qnli": (32, 2e-5, 10), "qqp": (32, 2e-5, 5), "stsb": (32, 3e-5, 10),
            "rte": (32, 2e-5, 10), "wnli": (32, 2e-5, 5)}


def task_name(task):
    """'SST-2', 'sts-b', 'MNLI' -> the names of TASKS."""
    name = str(task).lower().replace("-", "").replace("_", "")
    if name not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return name


# ----------------------------------------------------------------------------- metrics (§4.1), in percent


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0  # 0 for a constant input (undefined)


def _rank(x):
    """Ranks with ties given their average rank (as Spearman's correlation needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / count)[tie]


def _matthews(p, y):
    """Matthews correlation from the confusion matrix (the multi-class form; CoLA is binary)."""
    classes = np.union1d(p, y)
    cm = np.zeros((len(classes), len(classes)))
    np.add.at(cm, (np.searchsorted(classes, y), np.searchsorted(classes, p)), 1)
    t, q, n = cm.sum(1), cm.sum(0), cm.sum()
    cov_yp, cov_yy, cov_pp = np.trace(cm) * n - t @ q, n * n - t @ t, n * n - q @ q
    return float(cov_yp / np.sqrt(cov_yy * cov_pp)) if cov_yy * cov_pp > 0 else 0.0


def _binary_f1(p, y):
    tp, fp, fn = ((p == 1) & (y == 1)).sum(), ((p == 1) & (y == 0)).sum(), ((p == 0) & (y == 1)).sum()
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def compute_metrics(task, predictions, labels):
    """GLUE dev metrics in percent; "score" is the paper's number for the task (§4.1) and selects the model."""
    name, p, y = task_name(task), np.asarray(predictions), np.asarray(labels)
    if name == "stsb":
        pearson, spearman = 100 * _pearson(p, y), 100 * _pearson(_rank(p), _rank(y))
        return {"pearson": pearson, "spearman": spearman, "score": (pearson + spearman) / 2}
    m = {"accuracy": 100 * float((p == y).mean())}
    if name in ("mrpc", "qqp"):  # the paper reports accuracy on dev, F1 on test
        m["f1"] = 100 * _binary_f1(p, y)
    if name == "cola":
        m["matthews"] = 100 * _matthews(p, y)
    m["score"] = m.get("matthews", m["accuracy"])
    return m


# ----------------------------------------------------------------------------- GLUE data


@dataclass
class Split:
    """One GLUE file: first texts, second texts (None for single-sentence tasks), labels (None on test), ids."""
    a: list
    b: Optional[list]
    labels: list
    ids: list

    def subset(self, idx):
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Split(pick(self.a), pick(self.b), pick(self.labels), pick(self.ids))


def read_tsv(path, header=None, skip_malformed=False):
    """(column names, [(line number, cells)], numbers of the lines skipped) of a GLUE TSV, as GLUE's files are:
    `header` names the columns of a file without one (CoLA), a UTF-8 byte-order mark is dropped (MRPC), the last
    line may lack its newline. No quoting (quotes are text in GLUE) and lines split on \\n only (some sentences hold
    a stray \\r). A line with another column count than the header is an error, or with skip_malformed skipped (QQP's
    train.tsv has a few, which the reference processors skip too)."""
    rows, skipped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n").removeprefix("\ufeff" if n == 1 else "")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n} is not UTF-8 (byte {raw[e.start]:#x}): GLUE's files are UTF-8; "
                                "download the file again or convert it") from None
            if not line:
                continue
            cells = line.split("\t")
            if header is None:
                header = cells
            elif len(cells) == len(header):
                rows.append((n, cells))
            elif skip_malformed:
                skipped.append(n)
            else:
                raise UserError(f"{path} line {n}: {len(cells)} tab-separated columns where its header has "
                                f"{len(header)} ({', '.join(header)}); fix or delete that line")
    return header or [], rows, skipped


def glue_file(t, stem, data_dir):
    """The TSV file of split `stem` in data_dir: the task's folder, or glue_data/ holding it."""
    folder = Path(data_dir) / t.folder if (Path(data_dir) / t.folder).is_dir() else Path(data_dir)
    return folder / f"{stem}.tsv"


def read_glue(task, stem, data_dir=None):
    """One split of a GLUE task: `stem` names the TSV file (train, dev, dev_matched, test, ...) in data_dir (the
    task's folder or glue_data/ holding it); without data_dir, the same split of `datasets`' copy (online)."""
    name = task_name(task)
    t, labelled = GLUE[name], not stem.startswith("test")
    if not data_dir:
        ds = load_hub_dataset(f"GLUE {t.folder} (nyu-mll/glue)", f"pass --data with GLUE's {t.folder} folder "
                              "(its TSV files)", "nyu-mll/glue", name, split=stem.replace("dev", "validation"))
        labels = [None if y < 0 else (float(y) if not t.labels else int(y)) for y in ds["label"]]
        return Split(ds[t.hub_text[0]], ds[t.hub_text[1]] if len(t.hub_text) > 1 else None, labels, ds["idx"])
    path = glue_file(t, stem, data_dir)
    if not path.exists():
        files = ", ".join(f"{s}.tsv" for s, _ in (("train", ""),) + t.dev)
        raise UserError(f"{path.parent} has no {path.name}: expected GLUE's {t.folder} folder ({files}); "
                        "pass the right --data, or none to load it with datasets")
    header, rows, skipped = read_tsv(path, t.no_header if stem in ("train", "dev") and t.no_header else None,
                                     t.skip_malformed)
    if skipped:
        print(f"{path}: skipped {len(skipped)} malformed line(s) without {len(header)} tab-separated columns "
              f"(line {', '.join(map(str, skipped[:3]))}{', ...' if len(skipped) > 3 else ''})", file=sys.stderr)
    missing = [c for c in t.text + ((t.label,) if labelled else ()) if c not in header]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} in its header ({', '.join(header)}); is it "
                        f"{t.folder}'s file?")
    col = {c: i for i, c in enumerate(header)}
    a = [cells[col[t.text[0]]] for _, cells in rows]
    b = [cells[col[t.text[1]]] for _, cells in rows] if len(t.text) > 1 else None
    labels = [None] * len(rows)
    for k, (n, cells) in enumerate(rows if labelled else ()):
        value = cells[col[t.label]]
        try:
            labels[k] = float(value) if not t.labels else t.labels.index(value)
        except ValueError:
            raise UserError(f"{path} line {n}: label {value!r} is not one of {t.labels or 'numbers'}") from None
    # the `index`/`id` column numbers the rows of a submission; files without one count their rows
    id_col = col.get("index", col.get("id"))
    ids = [cells[id_col] if id_col is not None else k for k, (_, cells) in enumerate(rows)]
    return Split(a, b, labels, ids)


def encode_glue(tokenizer, split, max_len=128):
    """(ids, token types) per example: [CLS] a [SEP] (b [SEP]), pairs truncated longest-first to max_len."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    batch = list(zip(split.a, split.b)) if split.b is not None else split.a
    return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(batch)]


# ----------------------------------------------------------------------------- model: BERT + task head


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
        for name, m in self.named_children():
            if name != "bert":
                m.apply(Bert._init)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.span:
            start, end = self.qa(h).unbind(-1)  # (B, T) each
            return start, end
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, C)
        return self.classifier(self.drop(pooled))  # (B, outputs)

    def head_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("bert.")}

    def hf_head(self, task):
        """The head under transformers' names and the config.json fields that make the folder load as
        BertForSequenceClassification / BertForQuestionAnswering (through Auto* classes) with this head."""
        if self.span:
            return {f"qa_outputs.{k}": v for k, v in self.qa.state_dict().items()}, dict(
                architectures=["BertForQuestionAnswering"])
        labels = GLUE[task].labels or ("score",)  # STS-B: one regression output
        tensors = {f"bert.pooler.dense.{k}": v for k, v in self.pooler.state_dict().items()}
        tensors.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        config = dict(architectures=["BertForSequenceClassification"], id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
        if not GLUE[task].labels:
            config["problem_type"] = "regression"
        return tensors, config


def load_model(folder, task, arch=""):
    """(model, tokenizer path or None). The BERT of a save_pretrained / Hugging Face folder, or the sub-model
    `arch` extracted (§3.4) from a SuperPLM run folder or checkpoint.pt, as the evaluator of §3.5 fine-tunes them.
    The head: the folder's own head.pt for this task (a checkpoint of this script), else fresh, with the pooler
    taken from 'bert.pooler.dense.*' where the checkpoint has one."""
    path, outputs = Path(folder), 2 if task == "squad" else len(GLUE[task].labels) or 1
    if (arch or not is_model_folder(path)) and (path.suffix == ".pt" or (path / "checkpoint.pt").exists()):
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
        _, state = read_pretrained(folder)
        pooler = {k.rsplit(".", 1)[1]: v for k, v in state.items() if "pooler.dense." in k}
        if len(pooler) == 2:
            model.pooler.load_state_dict(pooler)
    return model, None


def is_model_folder(path):
    """A Hugging Face model folder (config.json with a model_type), not only a run folder with its config.json."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def save_checkpoint(model, folder, task, tokenizer_path, record):
    """save_pretrained + head.pt + tokenizer + dev metrics, written beside `folder` and swapped in whole."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    head, config = model.hf_head(task)
    save_pretrained(model.bert, tmp, head, **config)
    torch_save({"task": task, "head": model.head_state()}, tmp / "head.pt")
    for f in tokenizer_files(tokenizer_path):
        shutil.copyfile(f, tmp / f.name)
    save_json(record, tmp / "dev_metrics.json")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- training and evaluation


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
    """GLUE: logits (N, outputs). SQuAD: per window, (start, end) logits over its own tokens."""
    model.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        chunk = feats[i:i + batch_size]
        with autocast():
            logits = model(**collate(chunk, pad, device))
        if model.span:
            s, e = (x.float().cpu().numpy() for x in logits)
            out += [(s[k, :len(ids)], e[k, :len(ids)]) for k, (ids, _) in enumerate(chunk)]
        else:
            out.append(logits.float().cpu().numpy())
    return out if model.span else np.concatenate(out) if out else np.zeros((0, 1))


def labels_of(logits):
    return logits[:, 0] if logits.shape[1] == 1 else logits.argmax(1)


def optimizer_and_schedule(model, lr, steps, warmup, weight_decay):
    """AdamW (BERT's: no decay on biases and LayerNorm) with linear warm-up over `warmup` of the steps, then
    linear decay to 0 (§4.1)."""
    opt = make_optimizer(model.parameters(), lr, weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: learning_rate(step, steps, 1.0, warmup))


def train_epoch(model, feats, targets, batch_size, opt, sched, generator, pad, device, desc, autocast=nullcontext,
                log=None, log_every=50, stop=None):
    """One pass in a seeded random order; returns the mean training loss. The loss stays on the device (reading it
    every step would make the host wait for the GPU): it is read every log_every steps, for the bar and log(line).
    A SIGINT/SIGTERM (stop.signal) ends the pass after the step in progress."""
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


def subset(n_total, n, seed):
    """A seeded random choice of n indices (all when n is None), kept in file order."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, n, replace=False).tolist())


def prepare(name, cfg, tok, pad, compute):
    """(train features, train targets, evaluate(model) -> (dev metrics, dev predictions or None))."""
    device, autocast = compute.device, compute.autocast
    max_len, data, eval_bs = cfg.max_len or (384 if name == "squad" else 128), cfg.data or None, 2 * cfg.batch_size
    if name == "squad":
        train = read_squad("train", data)
        train = [train[i] for i in subset(len(train), cfg.max_train_examples, cfg.seed)]
        dev = read_squad("dev", data)
        dev = [dev[i] for i in subset(len(dev), cfg.max_eval_examples, cfg.seed)]
        window = dict(max_len=max_len, doc_stride=cfg.doc_stride, max_query_len=cfg.max_query_len)
        train_w, dev_w = squad_windows(tok, train, labelled=True, **window), squad_windows(tok, dev, **window)
        dev_feats, golds = [(w.ids, w.types) for w in dev_w], {ex["id"]: ex["answers"] for ex in dev}

        def evaluate(model):
            logits = predict(model, dev_feats, eval_bs, pad, device, autocast)
            predictions = decode(dev, dev_w, logits, cfg.n_best, cfg.max_answer_len)
            m = squad_scores(predictions, golds)
            return dict(m, score=m["f1"]), predictions

        return [(w.ids, w.types) for w in train_w], torch.tensor([[w.start, w.end] for w in train_w]), evaluate
    t = GLUE[name]
    train = read_glue(name, "train", data)
    train = train.subset(subset(len(train.a), cfg.max_train_examples, cfg.seed))
    devs = []
    for stem, suffix in t.dev:
        split = read_glue(name, stem, data)
        split = split.subset(subset(len(split.a), cfg.max_eval_examples, cfg.seed))
        devs.append((suffix, split, encode_glue(tok, split, max_len)))

    def evaluate(model):
        metrics = {}
        for suffix, split, feats in devs:
            m = compute_metrics(name, labels_of(predict(model, feats, eval_bs, pad, device, autocast)), split.labels)
            metrics.update({k + suffix: v for k, v in m.items() if not (suffix and k == "score")})
        return metrics, None

    targets = torch.tensor(train.labels, dtype=torch.long if t.labels else torch.float)
    return encode_glue(tok, train, max_len), targets, evaluate


def write_glue_test(model, name, cfg, tok, pad, compute, out):
    """GLUE's submission files: `index<TAB>prediction`, label names (STS-B: a score in [0, 5])."""
    t = GLUE[name]
    for stem, submission in t.test or (("test", t.folder),):
        if cfg.data and not glue_file(t, stem, cfg.data).exists():
            print(f"{name}: no {stem}.tsv, no test predictions")
            continue
        split = read_glue(name, stem, cfg.data or None)
        preds = labels_of(predict(model, encode_glue(tok, split, cfg.max_len or 128), 2 * cfg.batch_size, pad,
                                  compute.device, compute.autocast))
        rows = [f"{i}\t{min(max(p, 0.0), 5.0):.3f}" if not t.labels else f"{i}\t{t.labels[p]}"
                for i, p in zip(split.ids, preds.tolist())]
        atomic_write(out / f"{submission}.tsv", lambda tmp: Path(tmp).write_text("\n".join(["index\tprediction"]
                                                                                          + rows) + "\n"))


# ----------------------------------------------------------------------------- the grid of §4.1


@dataclass
class FinetuneConfig:
    task: str = field(default="mnli", metadata={"help": "GLUE task or squad (SQuAD v1.1); any case, RTE = rte",
                                                "choices": TASKS, "type": task_name})
    model: str = field(default="", metadata={"help": "model folder: written by save_pretrained (any qkv), a "
                                                     "Hugging Face BERT/ELECTRA folder, or a SuperPLM run folder"})
    arch: str = field(default="", metadata={"help": "with a SuperPLM run folder (checkpoint.pt) as --model: the "
                                                    "sub-model to extract and fine-tune, e.g. 5-564-1054-8-512"})
    tokenizer: str = field(default="", metadata={"help": "vocab.txt / tokenizer.json or a folder with one; "
                                                         "empty: the model's"})
    data: str = field(default="", metadata={"help": "GLUE: the task's folder in the original layout (or glue_data/ "
                                                    "holding it); SQuAD: the folder of train-v1.1.json and "
                                                    "dev-v1.1.json; empty: load with datasets (online)"})
    lr: Optional[list[float]] = field(default=None, metadata={"help": "peak learning rates; with --epochs, several "
                                                                      "values run the §4.1 grid (1e-5 2e-5 3e-5); "
                                                                      "default: Table D.1's for the task", **POSITIVE})
    epochs: Optional[list[int]] = field(default=None, metadata={"help": "epoch counts (§4.1 grid: 4 5 10); "
                                                                        "default: Table D.1's", **COUNT})
    batch_size: Optional[int] = field(default=None, metadata={"help": "default: Table D.1's (32; SQuAD 16)",
                                                              **COUNT})
    max_len: Optional[int] = field(default=None, metadata={"help": "tokens per input; default 128, SQuAD 384",
                                                           "min": 3, "max": 512})
    doc_stride: int = field(default=128, metadata={"help": "SQuAD: tokens between the starts of two windows",
                                                   **COUNT})
    max_query_len: int = field(default=64, metadata={"help": "SQuAD: question tokens kept", **COUNT})
    max_answer_len: int = field(default=30, metadata={"help": "SQuAD: longest answer decoded, in tokens", **COUNT})
    n_best: int = field(default=20, metadata={"help": "SQuAD: start and end candidates per window", **COUNT})
    warmup: float = field(default=0.1, metadata={"help": "share of the steps with a linear warm-up", **SHARE})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases, LayerNorm)",
                                                        **NONNEGATIVE})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "train on a seeded random subset",
                                                                      **COUNT})
    max_eval_examples: Optional[int] = field(default=None, metadata={"help": "evaluate on a seeded dev subset",
                                                                     **COUNT})
    seed: int = field(default=0, metadata={"help": "seed of the head, dropout, order and subsets", **NONNEGATIVE})
    log_every: int = field(default=50, metadata={"help": "one line in OUT/log.txt every N steps", **COUNT})
    out: str = field(default="", metadata={"help": "run folder (config.json, metrics.jsonl, log.txt, best/, "
                                                   "predictions); empty: runs/finetune/<task>"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": ["auto", *DTYPES]})


def run(cfg, argv=None):
    """Fine-tune cfg.model on cfg.task for every (lr, epochs) of the grid; returns the best run's dev metrics
    (with "score") plus lr, epochs, epoch, and "runs": the best epoch of each run. Writes files only with cfg.out
    (and its config.json records argv, the command line)."""
    check_config(cfg)
    name = task_name(cfg.task)
    if not cfg.model:
        raise UserError("no model: pass --model FOLDER (save_pretrained output, a BERT/ELECTRA folder or a SuperPLM "
                        "run folder with --arch)")
    bs, lr, epochs = TABLE_D1[name]
    cfg.task, cfg.batch_size = name, cfg.batch_size or bs
    cfg.lr, cfg.epochs = list(cfg.lr or [lr]), list(cfg.epochs or [epochs])
    compute = resolve_compute(cfg.device, cfg.dtype)
    folder = RunFolder(cfg.out, cfg, overwrite=cfg.overwrite, argv=argv) if cfg.out else None
    # a run with a folder stops after the step in progress; one without (search.py's evaluator) leaves the
    # signals to its caller
    stopper = stop_after_step() if folder else nullcontext(types.SimpleNamespace(signal=None))
    with folder or nullcontext(), stopper as stop:
        try:
            return grid(cfg, name, compute, folder, stop)
        except KeyboardInterrupt:
            if folder is None:
                raise
            if not folder.first:
                raise Interrupted(f"{stop.signal or 'stopped'} before the first epoch ended: nothing kept, "
                                  f"{cfg.out} is as it was") from None
            best = json.loads((folder.path / "best" / "dev_metrics.json").read_text())
            raise Interrupted(f"{stop.signal or 'stopped'}: kept {cfg.out}/metrics.jsonl (every finished epoch) and "
                              f"{cfg.out}/best/ (lr {best['lr']:g} epochs {best['epochs']} epoch {best['epoch']}, "
                              f"score {best['score']:.2f}); a grid does not resume: run it again with --overwrite "
                              "(or only the missing --lr/--epochs with another --out)") from None


def grid(cfg, name, compute, folder, stop):
    """The lr x epochs grid of §4.1 (see run)."""
    out = folder.path if folder else None

    def to_file(line):  # OUT/log.txt: a line every N steps (the terminal has the progress bar) and each epoch
        if out:
            with open(out / "log.txt", "a") as f:
                f.write(line + "\n")

    def log(line):
        tqdm.write(line)
        to_file(line)
    seed_everything(cfg.seed)
    base, checkpoint_tokenizer = load_model(cfg.model, name, cfg.arch)  # every run starts from this model and head
    tokenizer_path = cfg.tokenizer or checkpoint_tokenizer or cfg.model
    tok = load_tokenizer(tokenizer_path)
    pad = tok.token_to_id("[PAD]")
    feats, targets, evaluate = prepare(name, cfg, tok, pad, compute)
    if not feats:
        raise UserError(f"{name}: no training examples")
    steps_per_epoch = -(-len(feats) // cfg.batch_size)
    best, runs = None, []
    for lr in cfg.lr:
        for epochs in cfg.epochs:
            seed_everything(cfg.seed)
            model = copy.deepcopy(base).to(compute.device)
            opt, sched = optimizer_and_schedule(model, lr, epochs * steps_per_epoch, cfg.warmup, cfg.weight_decay)
            generator, run_best = torch.Generator().manual_seed(cfg.seed), None
            for epoch in range(1, epochs + 1):
                t0 = time.time()
                loss = train_epoch(model, feats, targets, cfg.batch_size, opt, sched, generator, pad, compute.device,
                                   f"{name} lr {lr:g} epoch {epoch}/{epochs}", compute.autocast, to_file,
                                   cfg.log_every, stop)
                metrics, predictions = evaluate(model)
                record = dict(task=name, lr=lr, epochs=epochs, epoch=epoch, train_loss=loss, **metrics)
                log(f"{name} lr {lr:g} epochs {epochs} | epoch {epoch} loss {loss:.4f} | "
                    + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" | {time.time() - t0:.0f}s")
                if out:
                    append_jsonl(out / "metrics.jsonl", dict(kind="epoch", **record))
                if run_best is None or record["score"] > run_best["score"]:
                    run_best = record
                if best is None or record["score"] > best["score"]:  # the best dev score of the whole grid
                    best = record
                    if out:
                        save_checkpoint(model, out / "best", name, tokenizer_path, record)
                        if predictions is not None:  # SQuAD's official {id: text}
                            save_json(predictions, out / "predictions.json")
                        folder.done_first()
            runs.append(run_best)
            if out:
                append_jsonl(out / "metrics.jsonl", dict(kind="run", **run_best))
    result = dict(best, runs=runs)
    print(f"{name} best: lr {best['lr']:g} epochs {best['epochs']} epoch {best['epoch']} score {best['score']:.2f}")
    if out:
        append_jsonl(out / "metrics.jsonl", dict(kind="best", **best))
        save_json(result, out / "results.json")
        if name != "squad":
            write_glue_test(load_model(out / "best", name)[0].to(compute.device), name, cfg, tok, pad, compute, out)
    return result


def finetune(model_folder, task, data_dir=None, lr=None, epochs=None, batch_size=None, max_train_examples=None,
             seed=0, out=None, **settings):
    """Fine-tune and return the best dev metrics (see run); lr and epochs take a number or a list (the grid);
    `settings` are other FinetuneConfig fields (arch, max_eval_examples, tokenizer, device, ...)."""
    as_list = lambda x: None if x is None else list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
    return run(FinetuneConfig(task=task, model=str(model_folder), data=str(data_dir or ""), lr=as_list(lr),
                              epochs=as_list(epochs), batch_size=batch_size, max_train_examples=max_train_examples,
                              seed=seed, out=str(out or ""), **settings))


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv, __doc__.split("\n\n")[0])
    cfg.out = cfg.out or f"runs/finetune/{cfg.task}"
    return run(cfg, argv)


if __name__ == "__main__":
    run_main(main)
