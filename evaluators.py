"""The evaluator of Algorithm 2 (§3.5): score(arch) of a sub-model of a SuperPLM, higher is better.

    Evaluations     any score(arch) behind a cache: each architecture scored once, a resumed search replayed
    MLMScore        -(masked-LM loss) of the sub-model run inside the SuperPLM: seconds per candidate
    FinetuneScore   the paper's: extract it, fine-tune it on MNLI and SQuAD v1.1 (finetune.py), average the scores
    Shared          either one shared out over torchrun's workers, each scoring its share of every generation

search.py's methods take any score(arch); MLMScore and FinetuneScore are what its command line builds from a
SuperPLM checkpoint (make_score).
"""

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import finetune
from common import UserError, resolve_compute, to_device
from data import build_dataset, mask_tokens, masked_positions, split
from hf import save_pretrained
from model import Arch, extract
from superplm import MLM
from tokenizer import load_tokenizer, tokenizer_files

# ----------------------------------------------------------------------------- scored architectures


@dataclass
class Candidate:
    """One scored architecture: its score (higher is better), predicted latency and the generation it entered."""
    arch: Arch
    score: float
    latency: float
    generation: int = 1

    def to_dict(self):
        return dict(arch=str(self.arch), score=self.score, latency=self.latency, generation=self.generation)


def ranked(candidates):
    """Best first; ties keep the order in which they were scored (so results are deterministic)."""
    return sorted(candidates, key=lambda c: -c.score)


class Evaluations:
    """The evaluator of Algorithm 2 behind a cache: no architecture is scored twice. `cache` (arch -> score) holds
    the scores of an interrupted run: re-running the same seeded search over it replays the same decisions and
    scores only what is missing, so a resumed search equals an uninterrupted one."""

    def __init__(self, score, budget, cache=None):
        self.score, self.budget, self.cache = score, budget, dict(cache or {})
        self.done, self.seen = [], set()  # Candidates in the order they were scored, and their archs

    def __contains__(self, arch):
        return arch in self.seen

    def __call__(self, archs, generation):
        new = [a for a in archs if a not in self.cache]
        # A generation's new architectures: shared out over workers when `score` can (Shared), else one by one.
        values = self.score.many(new) if hasattr(self.score, "many") else [self.score(a) for a in new]
        self.cache.update(zip(new, map(float, values)))
        out = [Candidate(arch, self.cache[arch], self.budget(arch), generation) for arch in archs]
        self.seen.update(archs)
        self.done += out
        return out



# ----------------------------------------------------------------------------- score(arch) from a SuperPLM

SCORE_NAMES = {"mlm": "score = -(masked-LM loss)", "finetune": "score = (MNLI acc + SQuAD F1) / 2"}


class MLMScore:
    """score(arch) = -(masked-LM loss) of the sub-model, run inside the SuperPLM (equal to extracting it, §3.4), on
    the corpus's held-out sequences (data.split: one-shot training never sees them) with fixed masks. Loss rather
    than accuracy: it moves with every masked token instead of in steps of 1/n, so close candidates are told apart.
    The roulette wheel of Algorithm 2 shifts these negative scores (see search.roulette)."""

    def __init__(self, model, tokenizer_path, corpus, seq_len, cache_dir, rows=256, batch_size=32, seed=0,
                 compute=None):
        compute = compute or resolve_compute("cpu")
        data, heldout = split(build_dataset(corpus, load_tokenizer(tokenizer_path), seq_len, cache_dir))
        rows = min(rows, len(heldout))  # a small corpus holds out fewer: score what there is
        ids = heldout[list(range(rows))]  # (rows, T)
        inputs, labels = mask_tokens(ids, heldout.specials, torch.Generator().manual_seed(seed))
        if not (labels != -100).any():
            raise UserError(f"corpus {corpus} gives {len(data) + len(heldout)} packed sequences, which leaves "
                            f"{rows} held-out ones{' with no masked token' if rows else ''} to score sub-models on "
                            "(data.split): use a larger corpus, or another one with --eval-corpus")
        mask = (ids != heldout.specials.pad).long()
        self.batches = [to_device(dict(input_ids=inputs[i:i + batch_size], labels=labels[i:i + batch_size],
                                       attention_mask=mask[i:i + batch_size],
                                       masked=masked_positions(labels[i:i + batch_size])), compute.device)
                        for i in range(0, rows, batch_size)]
        self.model, self.objective, self.metrics = model.to(compute.device).eval(), MLM(), {}
        self.autocast = compute.autocast

    @torch.no_grad()
    def __call__(self, arch):
        loss = acc = n = 0.0
        for batch in self.batches:
            k = batch["masked"].numel()  # masked tokens: MLM averages over them
            with self.autocast():
                batch_loss, stats = self.objective(self.model, batch, arch)
            loss, acc, n = loss + float(batch_loss) * k, acc + float(stats["acc"]) * k, n + k
        self.metrics[arch] = dict(mlm_loss=loss / n, mlm_acc=100 * acc / n)
        return -loss / n


class FinetuneScore:
    """The paper's evaluator (§3.5): extract the candidate, fine-tune it briefly on MNLI and on SQuAD v1.1 with
    finetune.py, and score it by the average of MNLI accuracy and SQuAD F1 (both in %)."""

    def __init__(self, model, tokenizer_path, work, cfg):
        self.model, self.tokenizer, self.work, self.cfg, self.metrics = model.eval(), tokenizer_path, work, cfg, {}

    def __call__(self, arch):
        folder = Path(self.work) / f"candidate-{arch}"
        save_model(self.model, arch, self.tokenizer, folder)
        c, scores = self.cfg, {}
        for task, data in (("mnli", c.mnli_data), ("squad", c.squad_data)):
            result = finetune.finetune(folder, task, data_dir=data or None, epochs=c.ft_epochs,
                                       max_train_examples=c.ft_train_examples or None,
                                       max_eval_examples=c.ft_eval_examples or None, seed=c.seed, device=c.device,
                                       dtype=c.dtype)
            scores[task] = result["score"]
        shutil.rmtree(folder)
        self.metrics[arch] = dict(mnli_acc=scores["mnli"], squad_f1=scores["squad"])
        return (scores["mnli"] + scores["squad"]) / 2


def save_model(superplm, arch, tokenizer_path, folder):
    """The sub-model as a stand-alone Hugging Face BERT folder with its vocabulary, ready for superplm.py --init
    or finetune.py (§3.6)."""
    save_pretrained(extract(superplm, arch), folder)
    for f in tokenizer_files(Path(tokenizer_path).parent):
        shutil.copyfile(f, Path(folder) / f.name)
    return folder


def make_score(cfg, model, tokenizer, ckpt, compute):
    """search.py's --evaluator for the SuperPLM `model` (its checkpoint's contents `ckpt`): the finetune one works
    in cfg.out, the mlm one scores the SuperPLM's own corpus unless --eval-corpus says otherwise."""
    if cfg.evaluator == "finetune":
        return FinetuneScore(model, tokenizer, cfg.out, dataclasses.replace(cfg, device=str(compute.device)))
    if ckpt.get("objective") != "mlm":
        raise UserError(f"{cfg.superplm} was trained by {ckpt.get('objective')}, so its masked-LM head is untrained: "
                        "use --evaluator finetune")
    c = ckpt["config"]
    return MLMScore(model, tokenizer, cfg.eval_corpus or c["corpus"], c["seq_len"], c["cache_dir"], cfg.eval_rows,
                    cfg.batch_size, cfg.seed, compute)


class Shared:
    """An evaluator shared out over torch.distributed workers (torchrun). Worker 0 runs the search; each time it
    needs scores (a generation's new candidates) it sends the list to every worker, each scores its share on its
    own device, one candidate per worker per round, and worker 0 gathers the round's scores and metrics and
    records them (record(arch, score), in generation order) before the next round. The other workers only serve().
    With one worker this is a plain loop, so the search and its files are the same whatever the number of workers;
    an interrupted search loses at most the round in progress."""

    def __init__(self, score, rank, world, record):
        self.score, self.rank, self.world, self.record = score, rank, world, record

    def many(self, archs):  # worker 0, inside the search
        if self.world > 1:
            dist.broadcast_object_list([archs])
        values = []
        for arch, (value, metrics) in zip(archs, self._rounds(archs)):
            self.score.metrics[arch] = metrics
            self.record(arch, value)
            values.append(value)
        return values

    def serve(self):  # workers 1..N-1: score shares until worker 0 says the search is over
        while True:
            archs = [None]
            dist.broadcast_object_list(archs)
            if archs[0] is None:
                return
            for _ in self._rounds(archs[0]):
                pass

    def stop(self):  # worker 0, after the search
        if self.world > 1:
            dist.broadcast_object_list([None])

    def _rounds(self, archs):
        """Yield (score, metrics) of every arch, computed round by round, worker k taking the k-th of each round."""
        for i in range(0, len(archs), self.world):
            this_round = archs[i:i + self.world]
            mine = None
            if self.rank < len(this_round):
                arch = this_round[self.rank]
                mine = (float(self.score(arch)), self.score.metrics.get(arch, {}))
            got = [mine]
            if self.world > 1:
                got = [None] * self.world
                dist.all_gather_object(got, mine)
            yield from got[:len(this_round)]
