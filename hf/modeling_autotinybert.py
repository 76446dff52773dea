"""Stock transformers classes for the BERTs this project writes, whose Q/K/V width `qkv_size` may differ from
hidden_size (AutoTinyBERT, paper Appendix A; e.g. 5-564-1054-8-512 of Table 4).

Such a model is BERT in every other way: the query, key and value projections map hidden_size -> qkv_size
(num_attention_heads heads of qkv_size / num_attention_heads dims each) and the attention output maps
qkv_size -> hidden_size. model.Bert.save_pretrained copies this file into every folder it writes, beside an
`auto_map` in config.json, so that an unmodified transformers loads the folder:

    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)

It needs only torch and transformers; this project never imports it (transformers is not one of its dependencies).
"""

import contextlib

import torch.nn as nn
from transformers.models.bert import modeling_bert as bert


@contextlib.contextmanager
def one_head(config):
    """transformers' BertSelfAttention insists that heads divide hidden_size; here they need only divide
    qkv_size (e.g. 8 heads, hidden 564). So the layers are built with one head, and `widen` sets the real count."""
    heads = config.num_attention_heads
    config.num_attention_heads = 1
    try:
        yield
    finally:
        config.num_attention_heads = heads


def widen(model, config):
    """Give every attention block Q/K/V projections hidden -> qkv and an output projection qkv -> hidden."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    qkv = getattr(config, "qkv_size", None) or hidden
    for m in model.modules():
        if isinstance(m, bert.BertAttention):
            att = m.self
            att.query, att.key, att.value = (nn.Linear(hidden, qkv) for _ in range(3))
            att.num_attention_heads, att.attention_head_size, att.all_head_size = heads, qkv // heads, qkv
            att.scaling = att.attention_head_size ** -0.5  # 1 / sqrt(head width)
            m.output.dense = nn.Linear(qkv, hidden)


class QkvSize:
    """Build the transformers class with attention of width config.qkv_size, then initialise as it would."""

    def __init__(self, config, *args, **kwargs):
        with one_head(config):
            super().__init__(config, *args, **kwargs)
        widen(self, config)
        self.post_init()


class AutoTinyBertModel(QkvSize, bert.BertModel):
    pass


class AutoTinyBertForMaskedLM(QkvSize, bert.BertForMaskedLM):
    pass


class AutoTinyBertForSequenceClassification(QkvSize, bert.BertForSequenceClassification):
    pass


class AutoTinyBertForQuestionAnswering(QkvSize, bert.BertForQuestionAnswering):
    pass
