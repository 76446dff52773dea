"""Data for the SuperPLM (§3.4, §4.1): a corpus packed into sequences, masked LM, each rank's share of a batch.

The corpus is tokenised with a BERT WordPiece vocabulary (trained on it unless given), packed into rows of seq_len
tokens cached on disk, its tail held out for one-shot scores. The paper pre-trains on BooksCorpus + Wikipedia; the
default corpus, stdlib, needs no download: the standard library's docstrings (~1.8 MB of English). Other corpus specs:
    path/to/file.txt | .json | .jsonl | .parquet, or a folder of such files (read with `datasets`)
    wikimedia/wikipedia:20231101.en,bookcorpus/bookcorpus   hub datasets name[:config], comma-separated (online)

    python data.py --corpus stdlib --vocab-size 30522     # tokenise and cache once, print what came out
    python data.py --preset tiny                          # the corpus of superplm.py --preset tiny
"""

import ast
import codecs
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import queue
import re
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

from common import UserError, atomic_write, flag, load_hub_dataset, parse_flags, run_main, save_json


def pack(chunks, tok, seq_len, sp):
    """Yield rows `[CLS] tokens [SEP]` of exactly seq_len ids from chunks of documents, split where a row ends, a
    [SEP] between documents (one segment per row, no next-sentence task, as the authors'); the last row padded."""
    body, buf = seq_len - 2, []
    for texts in chunks:
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            if not enc.ids:
                continue
            if buf:
                buf.append(sp.sep)
            buf.extend(enc.ids)
            n = len(buf) // body
            for i in range(n):
                yield [sp.cls] + buf[i * body:(i + 1) * body] + [sp.sep]
            buf = buf[n * body:]
    if buf:
        yield [sp.cls] + buf + [sp.sep] + [sp.pad] * (body - len(buf))


def split(dataset):
    """(training rows, held-out rows): the last min(256, N // 10) sequences, never trained on, score sub-models."""
    n = min(256, len(dataset) // 10)
    return dataset.rows(0, len(dataset) - n), dataset.rows(len(dataset) - n, len(dataset))


def mask_tokens(ids, specials, generator, prob=0.15):
    """BERT's masked LM: choose `prob` of the tokens (never specials or padding); 80% become [MASK], 10% a random
    token, 10% stay. Returns (input_ids, labels), labels -100 elsewhere. `generator`: one for all of ids (B, T), or
    a list of B, one per row (each row then draws exactly what it would alone)."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    blocks = ids.split(len(ids) // len(gens))  # the rows each generator draws for
    draw = lambda: torch.cat([torch.rand(b.shape, generator=g) for b, g in zip(blocks, gens)])  # noqa: E731
    chosen = (draw() < prob) & ~torch.isin(ids, specials.ids())  # (B, T)
    labels = torch.where(chosen, ids, -100)
    r = draw()
    inputs = ids.masked_fill(chosen & (r < 0.8), specials.mask)
    rand = chosen & (r >= 0.8) & (r < 0.9)
    counts = rand.view(len(gens), -1).sum(1).tolist()  # random tokens each generator draws
    inputs[rand] = torch.cat([torch.randint(specials.vocab_size, (n,), generator=g) for n, g in zip(counts, gens)])
    return inputs, labels


def masked_positions(labels):
    """Flat indices (n,) of the masked tokens of labels (B, T) (-100 elsewhere), in row-major order."""
    return (labels.flatten() != -100).nonzero().squeeze(1)


def steps_per_epoch(dataset, batch_size):
    """Whole batches per epoch (the incomplete last one is dropped, so every rank takes as many steps)."""
    if len(dataset) < batch_size:
        raise UserError(f"the corpus gives {len(dataset)} sequences, fewer than one batch of {batch_size}: "
                        "lower --batch-size or use a larger corpus")
    return len(dataset) // batch_size


def batches(dataset, batch_size, epoch, seed, rank=0, world=1, start=0):
    """This rank's sub-batches of one epoch, from batch `start` on (Algorithm 1, lines 2-4): every rank draws the
    same shuffle (seed, epoch) and keeps sub-batch `rank` of each batch. A row's mask depends only on (seed, epoch,
    row): redrawn every epoch, the same for any number of ranks."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} does not split into {world} equal sub-batches: "
                        f"use a multiple of {world}")
    b = batch_size // world
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    for i in range(start, steps_per_epoch(dataset, batch_size)):
        rows = order[i * batch_size + rank * b: i * batch_size + (rank + 1) * b].sort().values.numpy()
        ids = dataset[rows]  # (b, T)
        inputs, labels = mask_tokens(ids, dataset.specials,
                                     [torch.Generator().manual_seed(derive_seed(seed, epoch, r)) for r in rows])
        yield dict(input_ids=inputs, labels=labels, attention_mask=(ids != dataset.specials.pad).long(),
                   masked=masked_positions(labels))


def derive_seed(*parts):
    """One 63-bit seed from several integers (seed, epoch, row, ...): independent streams, reproducible."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def prefetch(batches, device, depth=2):
    """The same batches, masked (and pinned) `depth` ahead by a thread while the step computes (bench/gpu_step.py)."""
    ready, stop, end = queue.Queue(depth), threading.Event(), object()

    def work():
        try:
            for batch in batches:
                if device.type == "cuda":  # page-locked: the copy below is then asynchronous
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        ready.put(batch, timeout=0.1)
                        break
                if stop.is_set():  # the consumer left early (the run reached its last step)
                    return
            ready.put(end)
        except BaseException as e:  # reaches the consumer, traceback and all
            ready.put(e)
    worker = threading.Thread(target=work, daemon=True, name="prefetch")
    worker.start()
    try:
        while (batch := ready.get()) is not end:
            if isinstance(batch, BaseException):
                raise batch
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    finally:
        stop.set()
        worker.join()  # it ends after the batch in hand: never a thread still in torch when the process exits


FORMAT = 1  # bump when the packed layout changes: old caches are then rebuilt


class PackedDataset:
    """N sequences of seq_len token ids, memory-mapped: `ids` is a read-only (N, seq_len) array on disk."""

    def __init__(self, path, meta):
        self.path, self.meta, self.seq_len = Path(path), meta, meta["seq_len"]
        self.specials = Specials(**meta["specials"])
        self.ids = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["rows"], self.seq_len))

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, rows):
        return torch.from_numpy(self.ids[rows].astype(np.int64))  # (len(rows), seq_len)

    def rows(self, start, stop):
        """The same data restricted to rows start..stop-1 (still memory-mapped)."""
        view = copy.copy(self)
        view.ids = self.ids[start:stop]
        return view


def _chunks(docs, bar, size=1000):
    for s in range(0, len(docs), size):
        texts = docs[s:s + size] if isinstance(docs, list) else docs[s:s + size]["text"]
        bar.update(len(texts))
        yield texts


def build_dataset(corpus_spec, tokenizer, seq_len, cache_dir):
    """Tokenise and pack the corpus once into cache_dir (keyed by corpus, tokenizer, seq_len); later calls map it."""
    if seq_len < 3:
        raise UserError(f"--seq-len {seq_len} is too short: a packed row needs [CLS], a token and [SEP]")
    sp = Specials.of(tokenizer)
    key = hashlib.sha1(f"{FORMAT}|{corpus_key(corpus_spec)}|{seq_len}|{tokenizer.to_str()}".encode()).hexdigest()
    cache = Path(cache_dir)
    path, meta_path = cache / f"packed-{key[:16]}.bin", cache / f"packed-{key[:16]}.json"
    if meta_path.exists() and path.exists():
        return PackedDataset(path, json.loads(meta_path.read_text()))
    docs = load_corpus(corpus_spec, str(cache / "hf"))
    dtype = np.uint16 if sp.vocab_size <= 2**16 else np.int32
    rows = 0
    bar = tqdm(total=len(docs), desc=f"tokenising {corpus_spec}", unit="doc", file=sys.stderr)

    def write(tmp):
        nonlocal rows
        packed = pack(_chunks(docs, bar), tokenizer, seq_len, sp)
        with open(tmp, "wb") as f:
            while chunk := list(itertools.islice(packed, 8192)):
                np.asarray(chunk, dtype=dtype).tofile(f)
                rows += len(chunk)
    atomic_write(path, write)
    bar.close()
    if rows == 0:
        path.unlink()
        raise UserError(f"corpus {corpus_spec} holds no text: give a corpus with documents in it")
    meta = dict(format=FORMAT, corpus=corpus_spec, seq_len=seq_len, rows=rows, dtype=np.dtype(dtype).name,
                specials=vars(sp), tokenizer_sha1=hashlib.sha1(tokenizer.to_str().encode()).hexdigest())
    save_json(meta, meta_path)
    return PackedDataset(path, meta)


def _docstrings(node):
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    if isinstance(node, kinds) and (doc := ast.get_docstring(node)):
        yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def stdlib_corpus():
    """The default corpus: every docstring of the standard library (tests excluded), files in sorted order."""
    return list(_stdlib_docs())


@functools.lru_cache(maxsize=1)
def _stdlib_docs():  # parsing ~700 files takes seconds: once per process
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "dist-packages") or {"test", "tests", "idle_test"} & set(parts):
            continue
        with contextlib.suppress(SyntaxError, UnicodeDecodeError, ValueError):  # a few files are deliberately broken
            docs.extend(_docstrings(ast.parse(path.read_text(encoding="utf-8"))))
    return tuple(docs)


BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _files(path):
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS) if path.is_dir() else [path]
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise UserError(f"corpus {path}: expected .txt, .json, .jsonl or .parquet files of one kind, "
                        f"found {sorted(p.suffix for p in files)[:5] or 'none'}")
    return files, kinds.pop()


def corpus_key(spec):
    """What identifies a corpus's contents for the cache: local files by path, size and modification time."""
    parts = [f"stdlib-{sys.version_info[:2]}" if spec == "stdlib" else spec]
    for one in spec.split(","):
        if Path(one).exists():
            parts += [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in _files(one)[0]]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def not_utf8(path, chunk=1 << 20):
    """How many bytes of a file are not UTF-8 (0 for a clean file; older Project Gutenberg texts hold Latin-1)."""
    decoder, bad = codecs.getincrementaldecoder("utf-8")("surrogateescape"), 0  # a bad byte -> one U+DC80..DCFF
    with open(path, "rb") as f:
        while block := f.read(chunk):
            bad += len(re.findall("[\udc80-\udcff]", decoder.decode(block)))
    return bad + len(re.findall("[\udc80-\udcff]", decoder.decode(b"", final=True)))


@functools.lru_cache(maxsize=None)
def _say_once(line):  # the corpus is read twice on a first run (vocabulary, packing): one note, not two
    print(line, file=sys.stderr)


def _local(one, cache_dir):
    """A local corpus through `datasets`; text not UTF-8 is read with U+FFFD (said once), such JSON refused."""
    import datasets
    files, builder = _files(one)
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder != "parquet":
        bad = {f: n for f in files if (n := not_utf8(f))}
        if bad and builder == "json":
            f, n = next(iter(bad.items()))
            raise UserError(f"corpus {f} is not UTF-8 ({n} bytes): convert it, e.g. iconv -f latin1 -t utf-8")
        if bad:
            extra["encoding_errors"] = "replace"
            _say_once(f"corpus {one}: {len(bad)} of {len(files)} files not UTF-8, {sum(bad.values())} bytes read as "
                      f"U+FFFD ({', '.join(str(f) for f in list(bad)[:3])}{', ...' if len(bad) > 3 else ''})")
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir,
                                 **extra)


def load_corpus(spec, cache_dir=None):
    """The documents of a corpus spec (see the module docstring): a list, or a `datasets` Dataset of 'text'."""
    if spec == "stdlib":
        return stdlib_corpus()
    parts = []
    for one in spec.split(","):
        if Path(one).exists():
            ds = _local(one, cache_dir)
        elif Path(one).suffix in BUILDERS or one.startswith((".", "/", "~")):  # meant as a file: not on the hub
            raise UserError(f"corpus {one}: no such file or folder; give a .txt/.json/.jsonl/.parquet file or a "
                            "folder of them, 'stdlib', or a hub dataset name")
        else:  # a hub name such as wikimedia/wikipedia:20231101.en (the network once, then the datasets cache)
            name, _, config = one.partition(":")
            ds = load_hub_dataset(f"corpus {one!r}", "give local files (a .txt/.jsonl/.parquet file or folder) or "
                                  "'stdlib'", name, config or None, split="train", cache_dir=cache_dir)
        if "text" not in ds.column_names:  # then its one string column is the text
            strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
            if len(strings) != 1:
                raise UserError(f"corpus {one} has columns {ds.column_names}: give it a 'text' column")
            ds = ds.rename_column(strings[0], "text")
        parts.append(ds.select_columns(["text"]))
    if len(parts) == 1:
        return parts[0]
    import datasets
    return datasets.concatenate_datasets(parts)


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, in the ids a trained vocabulary gets


def _bert_text(tok, lowercase=True):
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _with_templates(tok):
    """BERT's `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (B with token type 1); no truncation or padding."""
    tok.no_truncation()
    tok.no_padding()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise UserError("the vocabulary has no [CLS] or [SEP] token: use a BERT WordPiece vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def load_tokenizer(path):
    """A BERT tokenizer from a vocab.txt, a tokenizer.json, or a folder holding either (tokenizer.json first)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).exists()]
        if not found:
            raise UserError(f"{path} has no tokenizer.json or vocab.txt: point to a BERT vocabulary")
        path = found[0]
    if not path.exists():
        raise UserError(f"tokenizer {path} does not exist: give a vocab.txt, a tokenizer.json or a folder")
    if path.suffix == ".json":
        return _with_templates(Tokenizer.from_file(str(path)))
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            vocab.setdefault(line.rstrip("\n"), len(vocab))  # one token per line, id = line number
    config = path.parent / "tokenizer_config.json"  # a Hugging Face folder records the casing there
    lowercase = json.loads(config.read_text()).get("do_lower_case", True) if config.exists() else True
    return _with_templates(_bert_text(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), lowercase))


def train_tokenizer(texts, vocab_size, out_folder):
    """Train an uncased WordPiece vocabulary on `texts`; save tokenizer.json and vocab.txt in out_folder."""
    tok = _bert_text(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    save_tokenizer(_with_templates(tok), out_folder)
    return tok


def save_tokenizer(tok, out_folder):
    """tokenizer.json (exact) and vocab.txt (for BERT tools), written atomically."""
    out = Path(out_folder)
    atomic_write(out / "tokenizer.json", lambda tmp: tok.save(tmp))
    vocab = "".join(t + "\n" for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    atomic_write(out / "vocab.txt", lambda tmp: Path(tmp).write_text(vocab, encoding="utf-8"))
    return out / "tokenizer.json"


def tokenizer_files(path):
    """The files load_tokenizer reads: tokenizer.json / vocab.txt and the casing in tokenizer_config.json."""
    path = Path(path)
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    folder, names = (path.parent, (path.name, names[2])) if path.is_file() else (path, names)
    return [folder / n for n in names if (folder / n).exists()]


@dataclass(frozen=True)
class Specials:
    """The ids masked LM needs: special tokens are never masked; [PAD] marks padding."""
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int

    @classmethod
    def of(cls, tok):
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"the vocabulary lacks {missing}: use a BERT WordPiece vocabulary")
        return cls(*ids.values(), tok.get_vocab_size())

    def ids(self):
        return torch.tensor([self.pad, self.unk, self.cls, self.sep, self.mask])


@dataclass
class DataConfig:
    corpus: str = flag("stdlib", "stdlib, .txt/.json/.jsonl/.parquet file or folder, or hub datasets name[:config],...")
    tokenizer: str = flag("", "vocab.txt / tokenizer.json / folder; empty: train one")
    vocab_size: int = flag(30522, "size of a vocabulary trained on the corpus", min=len(SPECIAL_TOKENS) + 1)
    seq_len: int = flag(128, "tokens per packed sequence (§4.1)", min=3)
    cache_dir: str = flag("data_cache", "where packed corpora and vocabularies go")
    preset: str = flag("paper", "paper: BERT's vocabulary size, §4.1's 128 tokens; tiny: the corpus of superplm.py "
                                "--preset tiny (--preset tiny --help shows its defaults)", choices=["paper", "tiny"])


PRESETS = {"paper": {}, "tiny": dict(vocab_size=4096, seq_len=64)}  # tiny: as superplm.py's tiny preset


def prepare(cfg):
    """(tokenizer path, tokenizer, PackedDataset) of a DataConfig-like cfg, a vocabulary trained if none is given."""
    tok_path = Path(cfg.tokenizer or Path(cfg.cache_dir) / f"tokenizer-{corpus_key(cfg.corpus)}-{cfg.vocab_size}"
                    / "tokenizer.json")
    if not cfg.tokenizer and not tok_path.exists():
        docs = load_corpus(cfg.corpus, cfg.cache_dir)
        texts = docs if isinstance(docs, list) else (row["text"] for row in docs)
        print(f"training a {cfg.vocab_size}-token WordPiece vocabulary on {cfg.corpus}", file=sys.stderr)
        train_tokenizer(texts, cfg.vocab_size, tok_path.parent)
    tok = load_tokenizer(tok_path)
    return tok_path, tok, build_dataset(cfg.corpus, tok, cfg.seq_len, cfg.cache_dir)


def main(argv=None):
    cfg = parse_flags(DataConfig, argv, __doc__.split("\n")[0], defaults=lambda first: PRESETS[first.preset])
    tok_path, tok, ds = prepare(cfg)
    print(f"{ds.path}: {len(ds)} sequences x {ds.seq_len} = {int((ds.ids != ds.specials.pad).sum()):,} tokens, "
          f"vocabulary {tok_path} ({tok.get_vocab_size()} tokens)")
    print("first sequence:", tok.decode(ds[0].tolist(), skip_special_tokens=False)[:300])


if __name__ == "__main__":
    run_main(main)
