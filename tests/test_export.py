"""export.py: every kind of folder to ONNX, checked here on a fresh ONNX Runtime session of the written file."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import export
import finetune as ft
from common import run_main, torch_save
from model import Arch, Bert, save_pretrained

ARCH = Arch(2, 60, 96, 4, 40)  # qkv != hidden, head width 10, heads not dividing hidden
VOCAB = 120


def write_folder(path, task):
    torch.manual_seed(0)
    bert = Bert(ARCH, vocab_size=VOCAB, max_position=160)
    with torch.no_grad():
        for p in bert.parameters():
            p.normal_(0, 0.2)
    if task is None:
        save_pretrained(bert, path)
        return bert.eval()
    model = ft.Finetuner(bert, 2 if task == "squad" else len(ft.GLUE[task].labels) or 1, span=task == "squad")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ft.save_checkpoint(model, path, task, path.parent, dict(score=0.0))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("task", [None, "mnli", "stsb", "squad"])
def test_export_runs_on_onnx_runtime_like_the_model(tmp_path, task, capsys, monkeypatch):
    ours = write_folder(tmp_path / "model", task)
    monkeypatch.chdir(tmp_path)  # stsb: a bare --out name goes into runs/export/, not the working folder
    result = export.main(["--model", str(tmp_path / "model"), "--out", "m.onnx" if task == "stsb" else
                          str(tmp_path / "m.onnx")] + (["--int8"] if task == "mnli" else []))
    printed = capsys.readouterr().out
    assert f"max abs difference {result['max_abs_diff']:.2e}" in printed and result["max_abs_diff"] <= 1e-4
    path = tmp_path / "runs" / "export" / "m.onnx" if task == "stsb" else tmp_path / "m.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(export.INPUTS)
    g = torch.Generator().manual_seed(1)
    for B, T in ((2, 9), (5, 150)):  # batch and sequence other than any seen at export
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T // 3:] = 0
        types = (torch.arange(T) > T // 2).long().expand(B, T).contiguous()
        outs = session.run(None, dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), token_type_ids=types.numpy()))
        with torch.no_grad():
            mine = export.as_tuple(ours(ids, mask, types))
        assert len(outs) == len(mine)
        for theirs, m in zip(outs, mine):
            assert theirs.shape == tuple(m.shape)
            np.testing.assert_allclose(theirs, m.numpy(), atol=1e-4, rtol=0)
    if task == "mnli":  # the int8 copy: quantized matmuls, and mostly the same labels
        assert "int8" in printed and (tmp_path / "m.int8.onnx").exists()
        assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "m.int8.onnx")).graph.node}
        int8 = onnxruntime.InferenceSession(str(tmp_path / "m.int8.onnx"), providers=["CPUExecutionProvider"])
        logits = int8.run(None, dict(input_ids=ids.numpy(), attention_mask=mask.numpy(),
                                     token_type_ids=types.numpy()))[0]
        assert logits.shape == (B, 3) and (logits.argmax(1) == mine[0].argmax(1).numpy()).mean() >= 0.6


def test_folders_that_are_not_ours_get_one_line_errors(tmp_path, capsys):
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps(dict(model_type="gpt2")))
    run = tmp_path / "superplm"
    run.mkdir()
    torch_save({}, run / "checkpoint.pt")
    for folder, message in ((tmp_path / "missing", "does not exist"), (gpt, "'gpt2' model"),
                            (tmp_path, "no config.json"), (run, "SuperPLM run folder")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: export.main(["--model", str(folder), "--out", str(tmp_path / "x.onnx")]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.onnx").exists()
