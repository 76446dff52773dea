"""Stock transformers classes for this project's BERTs, whose Q/K/V width `qkv_size` may differ from hidden_size
(paper Appendix A; e.g. 5-564-1054-8-512 of Table 4). model.save_pretrained copies this file beside an `auto_map` in
config.json: AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True). The project never imports it."""

import torch.nn as nn
from transformers.models.bert import modeling_bert as bert


class QkvSize:
    """Build the transformers class with one head (BertSelfAttention insists that heads divide hidden_size; here they
    need only divide qkv_size, e.g. 8 heads, hidden 564), widen its attention to qkv_size, initialise as it would."""

    def __init__(self, config, *args, **kwargs):
        heads, config.num_attention_heads = config.num_attention_heads, 1
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.num_attention_heads = heads
        hidden = config.hidden_size
        qkv = getattr(config, "qkv_size", None) or hidden
        for m in self.modules():
            if isinstance(m, bert.BertAttention):  # Q/K/V projections hidden -> qkv, the output qkv -> hidden
                att = m.self
                att.query, att.key, att.value = (nn.Linear(hidden, qkv) for _ in range(3))
                att.num_attention_heads, att.attention_head_size, att.all_head_size = heads, qkv // heads, qkv
                att.scaling = att.attention_head_size ** -0.5  # 1 / sqrt(head width)
                m.output.dense = nn.Linear(qkv, hidden)
        self.post_init()


class AutoTinyBertModel(QkvSize, bert.BertModel):
    pass


class AutoTinyBertForMaskedLM(QkvSize, bert.BertForMaskedLM):
    pass


class AutoTinyBertForSequenceClassification(QkvSize, bert.BertForSequenceClassification):
    pass


class AutoTinyBertForQuestionAnswering(QkvSize, bert.BertForQuestionAnswering):
    pass
