import inspect
import json
import time
import urllib.parse

import datasets
import numpy as np
import pytest
import torch

import common
import data
from common import UserError
from data import (SPECIAL_TOKENS, Specials, batches, build_dataset, load_tokenizer, mask_tokens, stdlib_corpus,
                  steps_per_epoch, train_tokenizer)


@pytest.fixture(scope="module")
def docs():
    return stdlib_corpus()[:400]  # a small slice of the default corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(docs, 400, folder)
    return folder


# ----------------------------------------------------------------------------- tokenizer and corpus


def test_stdlib_corpus_is_the_standard_library_docstrings():
    docs = stdlib_corpus()
    size = sum(map(len, docs))
    assert 1.0e6 < size < 4.0e6  # ~1.8 MB on CPython 3.11
    for obj in (json, json.dumps, urllib.parse.urlparse, inspect.signature):  # modules and functions, cleaned
        assert inspect.getdoc(obj) in docs
    assert inspect.getdoc(json).startswith("JSON (JavaScript Object Notation)")
    assert docs == stdlib_corpus()


def test_trained_tokenizer_is_bert_shaped_and_reloads_from_every_form(tok_dir):
    assert (tok_dir / "tokenizer.json").exists() and (tok_dir / "vocab.txt").exists()
    vocab = (tok_dir / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == list(SPECIAL_TOKENS)
    text_a, text_b = "Return the Number of items.", "Raise ValueError"
    ref = load_tokenizer(tok_dir).encode(text_a, text_b)
    assert ref.tokens[0] == "[CLS]" and ref.tokens.count("[SEP]") == 2 and ref.tokens[-1] == "[SEP]"
    first_sep = ref.tokens.index("[SEP]")
    assert set(ref.type_ids[:first_sep + 1]) == {0} and set(ref.type_ids[first_sep + 1:]) == {1}
    assert "return" in ref.tokens  # uncased
    for path in (tok_dir / "tokenizer.json", tok_dir / "vocab.txt"):
        enc = load_tokenizer(path).encode(text_a, text_b)
        assert enc.ids == ref.ids and enc.type_ids == ref.type_ids and enc.attention_mask == ref.attention_mask


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.txt")


def test_local_json_and_text_corpora_load_through_datasets(tmp_path, docs):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs[:5])))
    got = data.load_corpus(str(tmp_path / "a.jsonl"), str(tmp_path / "hf"))
    assert list(got["text"]) == docs[:5]  # the only string column is the text
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "1.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    got = data.load_corpus(str(folder), str(tmp_path / "hf"))
    assert len(got) == 2 and got[1]["text"].strip() == "second paragraph"
    (folder / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(data.UserError, match="of one kind"):
        data.load_corpus(str(folder), str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.csv").write_text("a,b\n")
    with pytest.raises(data.UserError, match="found none"):
        data.load_corpus(str(tmp_path / "empty"), str(tmp_path / "hf"))



def test_a_latin1_file_in_a_corpus_folder_is_read_and_counted(tmp_path, capsys):
    """Older Project Gutenberg texts hold Latin-1 bytes: each becomes U+FFFD, and one line says how many."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("It was the best of times.\n\nIt was the worst of times.\n", encoding="utf-8")
    (books / "b.txt").write_bytes("Caf\xe9 au lait, na\xefve fa\xe7ade.\n\nThe end.\n".encode("latin-1"))
    assert data.not_utf8(books / "a.txt") == 0 and data.not_utf8(books / "b.txt") == 3
    got = data.load_corpus(str(books), str(tmp_path / "hf"))
    assert [t.strip() for t in got["text"]] == ["It was the best of times.", "It was the worst of times.",
                                               "Caf\ufffd au lait, na\ufffdve fa\ufffdade.", "The end."]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("corpus")]  # not datasets' bars
    assert err == [f"corpus {books}: 1 of 2 files not UTF-8, 3 bytes read as U+FFFD ({books / 'b.txt'})"]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl is not UTF-8 \(1 bytes\): convert it"):
        data.load_corpus(str(tmp_path / "bad.jsonl"), str(tmp_path / "hf"))


def test_a_missing_file_and_an_offline_hub_name_fail_fast_with_one_line(tmp_path, monkeypatch):
    """A name that looks like a file is checked on disk, never on the hub; offline, a hub name is one line after one
    look in the local cache only (retries against an unreachable hub took 27 s)."""
    loads, load_dataset = [], datasets.load_dataset

    def spy(*args, **kwargs):  # which dataset is asked for, and whether the hub may be tried then
        loads.append((args[0], datasets.config.HF_HUB_OFFLINE))
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(common, "hub_reachable", lambda: False)  # a machine without a network
    with pytest.raises(UserError, match="corpus nope.txt: no such file or folder"):
        data.load_corpus("nope.txt", str(tmp_path / "hf"))
    assert loads == []
    with pytest.raises(UserError, match="corpus 'someone/nothing' is not in the local datasets cache and the Hugging "
                                        "Face hub cannot be reached"):
        data.load_corpus("someone/nothing", str(tmp_path / "hf"))
    assert loads == [("someone/nothing", True)]  # once, offline: no retries

# ----------------------------------------------------------------------------- packing and caching


def test_packing_keeps_the_token_stream_and_the_cache_is_reused(tmp_path, docs, tok_dir, monkeypatch):
    tok = load_tokenizer(tok_dir)
    sp = Specials.of(tok)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    ds = build_dataset(str(corpus), tok, 64, tmp_path / "cache")
    ids = np.asarray(ds.ids)
    assert ids.shape[1] == 64 and len(ds) == ids.shape[0] > 10
    assert (ids[:, 0] == sp.cls).all()
    assert (ids[:-1, -1] == sp.sep).all()  # every row is [CLS] ... [SEP]; only the last is padded
    last = ids[-1][ids[-1] != sp.pad]
    assert last[-1] == sp.sep and (ids[-1][len(last):] == sp.pad).all() and sp.pad not in ids[:-1]
    # Rows hold the documents' tokens in order; a [SEP] inside a row ends a document.
    body = [t for row in ids for t in row[1:][row[1:] != sp.pad][:-1]]
    encs = [e for e in (tok.encode(d, add_special_tokens=False).ids for d in docs[:200]) if e]
    stream = []  # the documents' tokens in order, a [SEP] between two unless a row's end already parts them
    for e in encs:
        stream += ([sp.sep] if stream and len(stream) % 62 else []) + e
    assert body == stream
    # A second run maps the same file, without reading or tokenising the corpus again.
    monkeypatch.setattr(data, "load_corpus", lambda *a: pytest.fail("the corpus was read again"))
    monkeypatch.setattr(data, "pack", lambda *a: pytest.fail("the corpus was tokenised again"))
    again = build_dataset(str(corpus), tok, 64, tmp_path / "cache")
    assert again.path == ds.path and np.array_equal(np.asarray(again.ids), ids)
    assert isinstance(again.ids, np.memmap)


def test_cache_key_follows_corpus_tokenizer_and_length(tmp_path, docs, tok_dir):
    tok = load_tokenizer(tok_dir)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(docs[:30]))
    a = build_dataset(str(corpus), tok, 32, tmp_path / "cache")
    assert build_dataset(str(corpus), tok, 48, tmp_path / "cache").path != a.path
    time.sleep(0.01)
    corpus.write_text("\n\n".join(docs[:31]))  # edited corpus: rebuilt
    assert build_dataset(str(corpus), tok, 32, tmp_path / "cache").path != a.path


# ----------------------------------------------------------------------------- masked LM


def test_masking_statistics_follow_bert():
    sp = Specials(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 128), generator=g)
    ids[:, 0], ids[:, 60], ids[:, -1] = sp.cls, sp.sep, sp.sep
    ids[:50, 100:] = sp.pad
    ids[::7, 10] = sp.unk
    inputs, labels = mask_tokens(ids, sp, torch.Generator().manual_seed(1))
    chosen = labels != -100
    special = torch.isin(ids, sp.ids())
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])  # never masked
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = (~special).sum().item()
    assert abs(chosen.sum().item() / n - 0.15) < 0.005
    as_mask = (inputs[chosen] == sp.mask).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    random_ = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / 1000) < 0.01 and abs(random_ - 0.1) < 0.01
    again = mask_tokens(ids, sp, torch.Generator().manual_seed(1))
    other = mask_tokens(ids, sp, torch.Generator().manual_seed(2))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)  # deterministic per seed
    assert not torch.equal(other[1], labels)


class Rows:
    """A stand-in PackedDataset: row i is filled with id 10 + i."""

    def __init__(self, n, T=16):
        self.ids = (10 + np.arange(n))[:, None].repeat(T, 1)
        self.specials = Specials(0, 1, 2, 3, 4, 10 + n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, rows):
        return torch.from_numpy(self.ids[rows].astype(np.int64))


def rows_of(batch):
    """Which dataset rows a sub-batch holds (masking changes some ids but labels restore them)."""
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    return ids[:, 0].tolist()


def test_ranks_read_disjoint_shares_of_each_batch_and_masks_are_fresh_each_epoch():
    ds = Rows(100)
    steps = steps_per_epoch(ds, 24)
    assert steps == 4
    seen = []
    for step_batches in zip(*(batches(ds, 24, 0, 7, r, 3) for r in range(3))):
        shares = [set(rows_of(b)) for b in step_batches]
        assert all(len(s) == 8 for s in shares) and len(set.union(*shares)) == 24  # disjoint, equal sub-batches
        seen += [r for s in shares for r in s]
    assert len(seen) == len(set(seen)) == 96  # no row twice in an epoch
    single = [rows_of(b) for b in batches(ds, 24, 0, 7, 0, 1)]
    assert sorted(sum(single, [])) == sorted(seen)  # same batches whatever the number of ranks
    # A row's mask depends on (seed, epoch, row) only: same with 1 or 3 ranks, new in the next epoch.
    one = {r: (b["input_ids"][i], b["labels"][i]) for b in batches(ds, 24, 0, 7) for i, r in enumerate(rows_of(b))}
    three = {r: (b["input_ids"][i], b["labels"][i]) for b in batches(ds, 24, 0, 7, 2, 3)
             for i, r in enumerate(rows_of(b))}
    assert all(torch.equal(one[r][1], three[r][1]) and torch.equal(one[r][0], three[r][0]) for r in three)
    for r, (inputs, labels) in one.items():  # the batch masks at once what each row's generator draws alone
        alone = mask_tokens(ds[[r - 10]], ds.specials, torch.Generator().manual_seed(data.derive_seed(7, 0, r - 10)))
        assert torch.equal(alone[0][0], inputs) and torch.equal(alone[1][0], labels)
    b = next(batches(ds, 24, 0, 7))
    assert torch.equal(b["masked"], (b["labels"].flatten() != -100).nonzero().squeeze(1))  # positions, host-side
    nxt = {r: b["labels"][i] for b in batches(ds, 24, 1, 7) for i, r in enumerate(rows_of(b))}
    common = set(one) & set(nxt)
    assert sum(not torch.equal(one[r][1], nxt[r]) for r in common) > 0.8 * len(common)
    assert [rows_of(b) for b in batches(ds, 24, 1, 7)] != [rows_of(b) for b in batches(ds, 24, 0, 7)]
    # Resuming inside an epoch continues with the same batches.
    assert [rows_of(b) for b in batches(ds, 24, 0, 7, start=2)] == single[2:]


def test_bad_batch_sizes_are_user_errors():
    with pytest.raises(data.UserError, match="multiple of 3"):
        next(batches(Rows(100), 25, 0, 0, 0, 3))
    with pytest.raises(data.UserError, match="fewer than one batch"):
        next(batches(Rows(10), 24, 0, 0))
