"""bench/gpu_step.py runs on the CPU (small sizes) exactly as it will on a GPU; its FLOPs count is torch's."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_step  # noqa: E402
from model import Arch, Bert  # noqa: E402


def test_model_flops_are_what_torch_counts_for_the_forward_times_three():
    """The encoder against transformers' BertModel with eager attention (plain matmuls, which torch's counter sees;
    it misses the CPU's fused attention kernel), the MLM head against our head at the masked positions."""
    from transformers import BertConfig, BertModel
    arch, B, T, V = Arch(2, 64, 128, 2, 64), 3, 16, 200
    hf = BertModel(BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, attn_implementation="eager"), add_pooling_layer=False).eval()
    model = Bert(arch, vocab_size=V).eval()
    batch = gpu_step.mlm_batch(gpu_step.BenchConfig(seq_len=T, vocab_size=V), B, 0, torch.device("cpu"))
    encoder, head = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad():
        with encoder:
            hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = model(batch["input_ids"], batch["attention_mask"]).flatten(0, 1)[batch["masked"]]
        with head:
            model.mlm_logits(hidden)
    masked = batch["masked"].numel()
    total = 3 * (encoder.get_total_flops() + head.get_total_flops())
    assert masked > 0 and gpu_step.train_flops(arch, B * T, masked, V, T) == total


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_the_bench_runs_on_the_cpu_and_prints_every_part(tmp_path, capsys, device):
    out = tmp_path / "gpu_step.json"
    result = gpu_step.main(["--superplm-arch", "2-64-128-2-64", "--bert", "2-64-128-2-64", "--batch-size", "2",
                            "--seq-len", "16", "--vocab-size", "200", "--ft-batch", "2", "--steps", "2",
                            "--warmup-steps", "1",
                            "--device", device, "--out", str(out)])
    printed = capsys.readouterr().out
    names = [r["name"] for r in result["rows"]]
    assert [n.split()[0] for n in names] == ["1.", "2.", "the", "3.", "transformers", "4."]
    peak = gpu_step.peak_tflops(gpu_step.BenchConfig(), torch.device(device))[0]
    assert all((r["mfu"] is None) == (peak is None) for r in result["rows"])
    assert device != "cpu" or "no stated peak for a CPU" in printed
    for r in result["rows"]:
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["ms"] / 1e3))  # batch 2 and fine-tuning batch 2
    assert set(result["ratios"]) == {"sub-model: through the SuperPLM / alone",
                                     "2-64-128-2-64 MLM step: ours / transformers",
                                     "SuperPLM loop: prefetched / direct batches"}
    assert "5. data.batches" in printed and out.exists()
    assert gpu_step.peak_tflops(gpu_step.BenchConfig(peak_tflops=100.0), torch.device("cpu"))[0] == 100.0


def test_the_peak_comes_from_the_device_name(monkeypatch):
    cuda, cfg = torch.device("cuda", 0), gpu_step.BenchConfig()
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 NVL", None), ("Tesla V100-SXM2-16GB", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        got, note = gpu_step.peak_tflops(cfg, cuda)
        assert got == peak and name in note and ("unknown" in note) == (peak is None)
