"""The BERT WordPiece tokenizer (§4.1): train one on a corpus, load a vocab.txt / tokenizer.json, save both.

    python data.py --vocab-size 30522      # trains one on the corpus (data.cached_tokenizer) and caches it
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common import UserError, atomic_write

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, in the ids a trained vocabulary gets


def _bert_text(tok, lowercase=True):
    """BERT's (uncased) normalisation and word splitting, and WordPiece decoding."""
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
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _with_templates(tok)
    save_tokenizer(tok, out_folder)
    return tok


def save_tokenizer(tok, out_folder):
    """tokenizer.json (exact) and vocab.txt (for BERT tools), written atomically."""
    out = Path(out_folder)
    atomic_write(out / "tokenizer.json", lambda tmp: tok.save(tmp))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    atomic_write(out / "vocab.txt", lambda tmp: Path(tmp).write_text("".join(t + "\n" for t, _ in vocab),
                                                                      encoding="utf-8"))
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
