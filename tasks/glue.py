"""GLUE for finetune.py (tasks/squad.py is SQuAD's sibling): where each task's fields live (GLUE), one split from
glue_data/ with its quirks or from `datasets` (read_glue), [CLS] a [SEP] (b [SEP]) features (encode_glue), the §4.1
dev metrics (compute_metrics), the task as fine-tuning needs it (glue_task), and GLUE's submission files."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from common import UserError, atomic_write, load_hub_dataset, subset_indices


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
                     ("entailment", "neutral", "contradiction"), dev=(("dev_matched", ""), ("dev_mismatched", "_mm")),
                     test=(("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm"), ("diagnostic", "AX"))),
    "qnli": GlueTask("QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", NLI),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", BINARY),
}
TASKS = tuple(GLUE) + ("squad",)  # the names finetune.py takes: GLUE's, and SQuAD v1.1 (tasks/squad.py)


def task_name(task):
    """'SST-2', 'sts-b', 'MNLI' -> the names of TASKS."""
    name = str(task).lower().replace("-", "").replace("_", "")
    if name not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return name


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


def compute_metrics(task, predictions, labels):
    """GLUE dev metrics in percent; "score" is the paper's number for the task (§4.1) and selects the model."""
    name, p, y = task_name(task), np.asarray(predictions), np.asarray(labels)
    if name == "stsb":
        pearson, spearman = 100 * _pearson(p, y), 100 * _pearson(_rank(p), _rank(y))
        return {"pearson": pearson, "spearman": spearman, "score": (pearson + spearman) / 2}
    m = {"accuracy": 100 * float((p == y).mean())}
    if name in ("mrpc", "qqp"):  # the paper reports accuracy on dev, F1 on test
        tp, fp, fn = ((p == 1) & (y == 1)).sum(), ((p == 1) & (y == 0)).sum(), ((p == 0) & (y == 1)).sum()
        m["f1"] = 100 * float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    if name == "cola":  # Matthews' correlation of two binary labelings is their Pearson correlation
        m["matthews"] = 100 * _pearson(p.astype(float), y.astype(float))
    m["score"] = m.get("matthews", m["accuracy"])
    return m


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
    """(column names, [(line number, cells)], skipped line numbers) of a GLUE TSV: `header` for a headerless file
    (CoLA), no BOM (MRPC), no quoting, split on \\n only (a \\r is text); other column counts fail (QQP: skipped)."""
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
    if stem == "diagnostic":  # GLUE's diagnostic set (AX, predicted by the MNLI model) lies beside the tasks
        folder = folder.parent / "diagnostic"
    return folder / f"{stem}.tsv"


def read_glue(task, stem, data_dir=None):
    """One split (stem: train, dev, dev_matched, test, ...) from its TSV file in data_dir, else from `datasets`."""
    name = task_name(task)
    t, labelled = GLUE[name], not stem.startswith(("test", "diagnostic"))
    if not data_dir:
        hub, split = ("ax", "test") if stem == "diagnostic" else (name, stem.replace("dev", "validation"))
        ds = load_hub_dataset(f"GLUE {t.folder} (nyu-mll/glue)", f"pass --data with GLUE's {t.folder} folder "
                              "(its TSV files)", "nyu-mll/glue", hub, split=split)
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
    id_col = col.get("index", col.get("id"))  # numbers a submission's rows; files without one count their rows
    ids = [cells[id_col] if id_col is not None else k for k, (_, cells) in enumerate(rows)]
    return Split(a, b, labels, ids)


def encode_glue(tokenizer, split, max_len=128):
    """(ids, token types) per example: [CLS] a [SEP] (b [SEP]), pairs truncated longest-first to max_len."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    batch = list(zip(split.a, split.b)) if split.b is not None else split.a
    return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(batch)]


def labels_of(logits):
    """A classifier's logits (N, classes) -> classes; STS-B's regression output (N, 1) -> scores."""
    return logits[:, 0] if logits.shape[1] == 1 else logits.argmax(1)


def glue_task(task, data_dir, tokenizer, max_len=128, max_train=None, max_eval=None, seed=0):
    """(train features, train labels, evaluate): evaluate(predict) -> (dev metrics, None) with predict(features) ->
    logits (MNLI: mismatched as "_mm"). max_train / max_eval: a seeded random choice of that many examples."""
    train = read_glue(task, "train", data_dir)
    train = train.subset(subset_indices(len(train.a), max_train, seed))
    devs = []
    for stem, suffix in GLUE[task].dev:
        split = read_glue(task, stem, data_dir)
        split = split.subset(subset_indices(len(split.a), max_eval, seed))
        devs.append((suffix, split, encode_glue(tokenizer, split, max_len)))

    def evaluate(predict):
        metrics = {}
        for suffix, split, feats in devs:
            m = compute_metrics(task, labels_of(predict(feats)), split.labels)
            metrics.update({k + suffix: v for k, v in m.items() if not (suffix and k == "score")})
        return metrics, None
    return encode_glue(tokenizer, train, max_len), train.labels, evaluate


def hf_labels(task):
    """The config.json fields that name a GLUE task's labels for transformers (STS-B: one regression output)."""
    labels = GLUE[task].labels or ("score",)
    fields = dict(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    return fields if GLUE[task].labels else dict(fields, problem_type="regression")


def write_test_predictions(task, data_dir, tokenizer, max_len, out, predict):
    """GLUE's submission files (`index<TAB>label name`, STS-B a score in [0, 5]) for the test splits data_dir has."""
    t = GLUE[task]
    for stem, submission in t.test or (("test", t.folder),):
        if data_dir and not glue_file(t, stem, data_dir).exists():
            print(f"{task}: no {glue_file(t, stem, data_dir)}, so no {submission}.tsv")
            continue
        split = read_glue(task, stem, data_dir)
        predictions = labels_of(predict(encode_glue(tokenizer, split, max_len))).tolist()
        text = "".join(f"{i}\t{t.labels[p]}\n" if t.labels else f"{i}\t{min(max(p, 0.0), 5.0):.3f}\n"
                       for i, p in zip(split.ids, predictions))
        atomic_write(out / f"{submission}.tsv", lambda tmp: Path(tmp).write_text("index\tprediction\n" + text))
