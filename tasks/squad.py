"""SQuAD v1.1 for finetune.py: the paper scores it by F1 on dev (§4.1; Table D.1's settings live in finetune.py).

BERT's run_squad recipe, on a fast tokenizer's character offsets: the official JSON or the `datasets` copy
(read_squad), 384-token windows of [CLS] question [SEP] context [SEP] with a document stride of 128, labelled with
the first gold answer's tokens where a window holds it (squad_windows), n-best decoding of the start/end logits into
answers of at most 30 tokens (decode), the official v1.1 exact match and F1 (squad_scores), and SQuAD as fine-tuning
needs it (squad_task).
"""

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError, load_hub_dataset, subset_indices


# ----------------------------------------------------------------------------- the official evaluation, in percent

def normalize_answer(text):
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction, gold):
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))  # harmonic mean of same/|p| and same/|g|


def squad_scores(predictions, answers):
    """The official v1.1 exact match and F1 in percent, each the max over a question's gold answers.
    predictions {id: text}, answers {id: [texts]}; a question without a prediction scores 0."""
    em = f1 = 0.0
    for qid, golds in answers.items():
        pred = predictions.get(qid, "")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(token_f1(pred, g) for g in golds)
    n = max(len(answers), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}


# ----------------------------------------------------------------------------- SQuAD v1.1 data

def read_squad(which, data_dir=None):
    """SQuAD v1.1 examples (which: train | dev) as dicts: id, question, context, answers (texts), starts (chars)."""
    if not data_dir:
        ds = load_hub_dataset("SQuAD v1.1 (rajpurkar/squad)", "pass --data with the folder of train-v1.1.json and "
                              "dev-v1.1.json", "rajpurkar/squad", split="train" if which == "train" else "validation")
        return [dict(id=r["id"], question=r["question"], context=r["context"], answers=r["answers"]["text"],
                     starts=r["answers"]["answer_start"]) for r in ds]
    path = Path(data_dir) / f"{which}-v1.1.json"
    if not path.exists():
        raise UserError(f"{data_dir} has no {path.name}: expected SQuAD v1.1's train-v1.1.json and "
                        "dev-v1.1.json; pass the right --data, or none to load it with datasets")
    try:
        squad = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path} is not SQuAD's JSON ({str(e).splitlines()[0]}): download it again") from None
    try:
        return [dict(id=qa["id"], question=qa["question"], context=p["context"],
                     answers=[a["text"] for a in qa["answers"]], starts=[a["answer_start"] for a in qa["answers"]])
                for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not in SQuAD's JSON layout (data > paragraphs > qas > answers): no {e}") from None


@dataclass
class Window:
    """One feature: [CLS] question [SEP] a window of the context [SEP]."""
    example: int   # index of its example
    ids: list
    types: list
    ctx: int       # position of the first context token in `ids`
    offsets: list  # (first char, end char) in the context of each context token of the window
    start: int = 0  # the answer's first and last token in `ids`; (0, 0) = [CLS]: no answer in this window
    end: int = 0


def answer_span(offsets, char_start, char_end):
    """(first, last) index into `offsets` of the tokens covering characters [char_start, char_end); None unless
    the window holds the whole answer."""
    if not offsets or offsets[0][0] > char_start or offsets[-1][1] < char_end:
        return None
    first = next(k for k, (_, e) in enumerate(offsets) if e > char_start)
    last = next(k for k in reversed(range(len(offsets))) if offsets[k][0] < char_end)
    return first, last


def squad_windows(tokenizer, examples, max_len=384, doc_stride=128, max_query_len=64, labelled=False):
    """Features of BERT's run_squad: the context cut into windows of max_len tokens in all, each starting
    doc_stride tokens after the previous one; char offsets from the fast tokenizer map tokens back to text."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    questions = tokenizer.encode_batch([ex["question"] for ex in examples], add_special_tokens=False)
    contexts = tokenizer.encode_batch([ex["context"] for ex in examples], add_special_tokens=False)
    windows = []
    for i, (ex, question, c) in enumerate(zip(examples, questions, contexts)):
        q = question.ids[:max_query_len]
        room, begin = max_len - len(q) - 3, 0
        while True:
            stop = min(begin + room, len(c.ids))
            w = Window(i, [cls] + q + [sep] + c.ids[begin:stop] + [sep], [0] * (len(q) + 2) + [1] * (stop - begin + 1),
                       len(q) + 2, c.offsets[begin:stop])
            if labelled:  # train on the first gold answer
                span = answer_span(w.offsets, ex["starts"][0], ex["starts"][0] + len(ex["answers"][0]))
                if span:
                    w.start, w.end = w.ctx + span[0], w.ctx + span[1]
            windows.append(w)
            if stop == len(c.ids):
                break
            begin += min(doc_stride, room)
    return windows


def decode(examples, windows, logits, n_best=20, max_answer_len=30):
    """{id: text}: per example, the span of context tokens with the highest start + end logit among the n_best
    starts and n_best ends of each window, end >= start, at most max_answer_len tokens (BERT's n-best decoding).
    logits: per window, (start logits, end logits) over its tokens."""
    best = {}
    for w, (start, end) in zip(windows, logits):
        s, e = start[w.ctx:w.ctx + len(w.offsets)], end[w.ctx:w.ctx + len(w.offsets)]
        for i in np.argsort(-s)[:n_best]:
            for j in np.argsort(-e)[:n_best]:
                if i <= j < i + max_answer_len and s[i] + e[j] > best.get(w.example, (-np.inf,))[0]:
                    best[w.example] = (s[i] + e[j], w.offsets[i][0], w.offsets[j][1])
    return {ex["id"]: ex["context"][best[k][1]:best[k][2]] if k in best else "" for k, ex in enumerate(examples)}


# ----------------------------------------------------------------------------- SQuAD as fine-tuning needs it

def squad_task(tokenizer, data_dir=None, max_len=384, doc_stride=128, max_train=None, max_eval=None, seed=0):
    """(train features, train targets [start, end], evaluate). evaluate(predict) -> (dev metrics with "score" =
    F1, the official {id: text} predictions), where predict(features) -> the (start, end) logits of each window.
    max_train / max_eval: a seeded random choice of that many questions."""
    train = read_squad("train", data_dir)
    train = [train[i] for i in subset_indices(len(train), max_train, seed)]
    dev = read_squad("dev", data_dir)
    dev = [dev[i] for i in subset_indices(len(dev), max_eval, seed)]
    window = dict(max_len=max_len, doc_stride=doc_stride)
    train_w, dev_w = squad_windows(tokenizer, train, labelled=True, **window), squad_windows(tokenizer, dev, **window)
    dev_feats, golds = [(w.ids, w.types) for w in dev_w], {ex["id"]: ex["answers"] for ex in dev}

    def evaluate(predict):
        predictions = decode(dev, dev_w, predict(dev_feats))
        m = squad_scores(predictions, golds)
        return dict(m, score=m["f1"]), predictions

    return [(w.ids, w.types) for w in train_w], [[w.start, w.end] for w in train_w], evaluate
