import json
import types
import warnings

import numpy as np
import pytest
import torch

import latency
from common import UserError, read_jsonl, torch_load, torch_save
from common import config_parser, parse_flags
from latency import (BACKENDS, TABLE4, LatencyPredictor, accuracy, archs_to_time, kendall_tau, measure, on_backends,
                     parse_target, relative)
from model import BERT_BASE, KD_SPACE, PRETRAIN_SPACE, Arch, Bert, SearchSpace, grid

DEVICE = dict(cpu=latency.cpu_model(), cores=2, threads=1, torch=str(torch.__version__), seq_len=128, batch=1)


def synthetic_ms(arch):
    """A made-up CPU: per-layer overhead, per-head cost, matmul work and attention maps (not our feature set)."""
    a = arch
    return a.layers * (0.15 + 0.04 * a.heads + 1.1e-5 * a.hidden * (a.ffn + 2 * a.qkv) + 2e-4 * a.qkv) + 0.3


def fitted(n=400, steps=1500):
    archs = archs_to_time(PRETRAIN_SPACE, n, seed=0)
    ms = np.array([synthetic_ms(a) for a in archs])
    train, test = archs[: n * 4 // 5], archs[n * 4 // 5:]
    pred = LatencyPredictor.fit(train, ms[: n * 4 // 5] / 10.0, ref_ms=10.0, base_ms=synthetic_ms(BERT_BASE),
                                device=DEVICE, width=64, steps=steps, seed=0)
    return pred, test, ms[n * 4 // 5:]


def test_predictor_learns_a_known_latency_function():
    pred, test, ms = fitted()
    m = accuracy(pred.predict(test), ms)
    assert m["mape"] < 3.0, m
    assert m["tau"] > 0.95, m
    arch = test[0]
    assert pred(arch) == pytest.approx(pred.predict([arch])[0])
    assert pred(str(arch)) == pred(arch)
    assert pred.speedup(arch) == pytest.approx(pred.base_ms / pred(arch))


def test_save_load_same_predictions_and_foreign_cpu_warns(tmp_path):
    pred, test, _ = fitted(n=100, steps=200)
    pred.save(tmp_path / "lat.pt")
    state = torch_load(tmp_path / "lat.pt")  # plain data: loads with weights_only=True
    assert state["device"]["cpu"] == latency.cpu_model() and state["base_ms"] == pred.base_ms
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same CPU: no warning
        again = LatencyPredictor.load(tmp_path / "lat.pt")
    np.testing.assert_array_equal(again.predict(test), pred.predict(test))
    assert again.base_ms == pred.base_ms
    state["device"]["cpu"] = "Some Other CPU 9000"
    torch_save(state, tmp_path / "other.pt")
    with pytest.warns(UserWarning, match="Some Other CPU 9000"):
        LatencyPredictor.load(tmp_path / "other.pt")
    with pytest.raises(UserError, match="latency.py fit"):
        LatencyPredictor.load(tmp_path / "missing.pt")


def test_parse_target():
    assert parse_target("7x", 700.0) == pytest.approx(100.0)
    assert parse_target("7.5x", 750.0) == pytest.approx(100.0)
    assert parse_target(" 2X ", 10.0) == pytest.approx(5.0)
    assert parse_target("12ms", 700.0) == 12.0
    assert parse_target("0.5ms", 700.0) == 0.5
    for bad in ("7", "fast", "0x", "-3x", "0ms", "", "7 x y", "x", "ms", "12 s", "nanx"):
        with pytest.raises(UserError) as e:
            parse_target(bad, 700.0)
        msg = str(e.value)
        assert "\n" not in msg and "7x" in msg and "12ms" in msg


def test_kendall_tau_and_accuracy():
    from scipy.stats import kendalltau
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(scale=0.5, size=50)
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b)[0])
    m = accuracy([110.0, 90.0], [100.0, 100.0])
    assert m["mape"] == pytest.approx(10.0) and m["rmse"] == pytest.approx(10.0)


def test_collect_times_each_arch_beside_the_reference(monkeypatch):
    monkeypatch.setattr(latency, "BERT_BASE", Arch(2, 128, 512, 2, 128))  # keep the test fast
    monkeypatch.setattr(latency, "BASE_EVERY", 2)
    cfg = latency.TimingConfig(seq_len=32, warmup_passes=0, repeats=3)
    archs = [Arch(1, 64, 64, 1, 64), Arch(2, 96, 128, 2, 128), Arch(1, 64, 128, 1, 64)]
    recs = list(latency.collect(archs, cfg, start=5))
    assert [r["kind"] for r in recs] == ["base", "arch", "arch", "base", "arch"]
    assert [r["i"] for r in recs if r["kind"] == "arch"] == [5, 6, 7]
    assert relative(recs[1]) == recs[1]["ms"] / recs[1]["ref_ms"] < 1  # a 1-layer 64-wide model vs BERT-S1


def test_collect_records_the_median_and_spread_of_each_model_and_its_reference(monkeypatch):
    calls = []

    def timings(models, *settings):  # the model's passes, then the reference's
        calls.append(([m.arch for m in models], settings))
        return [[3.0, 1.0, 2.0, 10.0], [5.0, 4.0, 4.0, 6.0]]

    monkeypatch.setattr(latency, "timings", timings)
    monkeypatch.setattr(latency, "build", lambda arch, backend, threads: types.SimpleNamespace(arch=arch))
    cfg = latency.TimingConfig(threads=2, seq_len=32, batch_size=3, warmup_passes=4, repeats=5)
    arch, ref = Arch(1, 64, 64, 1, 64), Arch(2, 128, 256, 2, 128)
    base, rec = latency.collect([arch], cfg, reference=ref)
    assert calls == [([BERT_BASE, ref], (2, 32, 3, 4, 5)), ([arch, ref], (2, 32, 3, 4, 5))]
    # medians 2.5 and 4.5; quartiles (numpy's linear interpolation) 1.75-4.75 and 4-5.25
    assert (rec["ms"], rec["spread"], rec["ref_ms"], rec["ref_spread"]) == (2.5, 3.0 / 2.5, 4.5, 1.25 / 4.5)
    assert (base["kind"], base["arch"], rec["kind"], rec["arch"], rec["i"]) == ("base", str(BERT_BASE), "arch",
                                                                                str(arch), 0)


def test_measure_positive_larger_is_slower_and_threads_restored():
    before = torch.get_num_threads()
    small = measure(Arch(1, 64, 64, 1, 64), seq_len=64, warmup=1, repeats=3)
    large = measure(Arch(4, 512, 2048, 8, 512), seq_len=64, warmup=1, repeats=3)
    assert 0 < small < large
    assert torch.get_num_threads() == before
    other = 2 if before == 1 else 1
    assert measure(Arch(1, 64, 64, 1, 64), threads=other, seq_len=16, warmup=0, repeats=1) > 0
    assert torch.get_num_threads() == before


TINY = SearchSpace(layers=grid(1, 2, 1), hidden=grid(64, 128, 32), ffn=grid(64, 256, 64), heads=(1, 2))


def test_measure_fit_cli_resumes_and_refuses_mixing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(latency, "BERT_BASE", Arch(2, 128, 512, 2, 128))  # keep the test fast
    ckpt = tmp_path / "checkpoint.pt"
    torch_save(dict(space=dict(layers=list(TINY.layers), hidden=list(TINY.hidden), ffn=list(TINY.ffn),
                               heads=list(TINY.heads), qkv=None, head_dim=64)), ckpt)
    out = tmp_path / "latency"
    flags = ["--space", str(ckpt), "--out", str(out), "--warmup-passes", "0", "--repeats", "2",
             "--seq-len", "32"]
    latency.main(["measure", "--samples", "7", *flags])
    with open(out / "timings.jsonl", "a") as f:
        f.write('{"kind": "arch", "ar')  # a run killed mid-line
    with pytest.raises(UserError, match="--resume"):  # never appended to without being asked
        latency.main(["measure", "--samples", "12", *flags])
    latency.main(["measure", "--samples", "12", *flags, "--resume"])
    recs = read_jsonl(out / "timings.jsonl")
    archs = [r["arch"] for r in recs if r["kind"] == "arch"]
    assert len(archs) == 12 == len(set(archs)) and all(Arch.parse(a) in TINY for a in archs)
    assert [r["i"] for r in recs if r["kind"] == "arch"] == list(range(12))
    assert sum(r["kind"] == "base" for r in recs) == 2  # one per session
    assert recs[0]["reference"] == "2-128-256-2-128"  # the reference shrunk to the tiny space
    assert all(r["ms"] > 0 and r["spread"] >= 0 for r in recs[1:])
    record = json.loads((out / "config.json").read_text())  # the resumed run's settings, round-tripping
    assert record["config"]["samples"] == 12 and record["command"].startswith("python latency.py measure --samples 12")
    assert parse_flags(latency.MeasureConfig, ["--config", str(out / "config.json")],
                       parser=config_parser(latency.MeasureConfig)) == latency.MeasureConfig(**dict(record["config"],
                                                                                                   resume=False))
    with pytest.raises(UserError, match="--seq-len 64 is not one of them"):
        latency.main(["measure", "--samples", "13", *flags[:-1], "64", "--resume"])
    with pytest.raises(UserError, match="--space nowhere: no such folder; --space also takes pretrain or kd"):
        latency.main(["measure", "--space", "nowhere", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # a failed start leaves nothing behind

    fit = tmp_path / "predictor"
    latency.main(["fit", "--timings", str(out), "--out", str(fit), "--steps", "100"])
    assert "MAPE" in capsys.readouterr().out and (fit / "metrics.json").exists()
    pred = LatencyPredictor.load(fit)
    ref_ms = np.median([r["ref_ms"] for r in recs[1:]])  # BERT-base's ms: its drift-free ratio x the reference's
    base_ms = np.median([r["ms"] / r["ref_ms"] for r in recs if r["kind"] == "base"]) * ref_ms
    assert pred.device["seq_len"] == 32 and pred.base_ms == pytest.approx(base_ms, rel=1e-12)
    assert pred.state["metrics"]["heldout"]["n"] == 2
    with pytest.raises(UserError, match="--overwrite"):
        latency.main(["fit", "--timings", str(out), "--out", str(fit)])
    # config.json round-trips: the same settings fit the same predictor
    latency.main(["fit", "--config", str(fit / "config.json"), "--out", str(tmp_path / "again")])
    again = torch_load(tmp_path / "again" / "predictor.pt")
    assert all(torch.equal(v, again["net"][k]) for k, v in pred.state["net"].items())


def test_a_predictor_warns_once_outside_the_shapes_it_was_fitted_on(capsys):
    pred, test, _ = fitted(n=60, steps=50)
    ranges = pred.state["ranges"]
    inside = [a for a in test if all(lo <= getattr(a, d) <= hi for d, (lo, hi) in ranges.items())]
    pred.predict(inside)
    assert capsys.readouterr().err == ""
    big = Arch(ranges["layers"][1] + 1, ranges["hidden"][1], ranges["ffn"][1], ranges["heads"][1], ranges["qkv"][1])
    pred.predict([big, big])
    pred(big)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"layers 1-{big.layers - 1}" in err and f"1 of 1 shapes are outside ({big})" in err


def test_table_prints_the_papers_speedups_beside_measured_and_predicted_ones(tmp_path, monkeypatch, capsys):
    timed = []

    def collect(archs, cfg, start=0, reference=None):  # a machine where latency is synthetic_ms, the reference 10ms
        timed.extend(archs)
        for arch in [BERT_BASE] + archs:
            yield dict(kind="base" if arch == BERT_BASE else "arch", arch=str(arch), ms=synthetic_ms(arch), ref_ms=10.0)

    monkeypatch.setattr(latency, "collect", collect)
    pred, _, _ = fitted(n=100, steps=200)
    pred.save(tmp_path / "lat.pt")
    latency.main(["table", "--predictor", str(tmp_path / "lat.pt")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["setting", "model", "arch", "paper", "measured", "predicted"]
    assert sorted(map(str, timed)) == sorted({a for _, _, a, _ in TABLE4})  # each of Table 4's shapes once
    rows = [line.split() for line in lines[2:]]
    paper = "7.1/7.2×14.8/15.7×20.1/20.2×28.4/27.2× 4.9/4.6×9.8/9.0×11.7/10.7×17.0/17.0×"  # Table 4 as printed
    assert [r[3] for r in rows[:16]] == [f"{v}x" for v in paper.replace("×", "/").replace(" ", "").split("/") if v]
    assert [tuple(r[:3]) for r in rows] == [(s, m, a) for s, m, a, _ in TABLE4]
    for (_, _, arch, paper), row in zip(TABLE4, rows):
        measured = synthetic_ms(BERT_BASE) / synthetic_ms(Arch.parse(arch))
        predicted = pred.base_ms / float(pred.predict([Arch.parse(arch)])[0])
        assert row[3:] == [f"{paper:.1f}x", f"{measured:.1f}x", f"{predicted:.1f}x"], row


def test_reference_fits_the_space():
    assert latency.reference_for(PRETRAIN_SPACE) == latency.REFERENCE
    assert latency.reference_for(KD_SPACE) == latency.REFERENCE
    assert latency.reference_for(TINY) == Arch(2, 128, 256, 2, 128)


def test_archs_to_time_distinct_prefix_and_too_many():
    a = archs_to_time(PRETRAIN_SPACE, 50, seed=3)
    assert len(set(a)) == 50 and archs_to_time(PRETRAIN_SPACE, 20, seed=3) == a[:20]
    with pytest.raises(UserError, match="--samples"):
        archs_to_time(TINY, TINY.size() + 1, seed=0)


def test_an_interrupted_measure_keeps_its_timings_and_says_how_to_continue(tmp_path, monkeypatch):
    def collect(archs, cfg, start=0, reference=None):  # one timing, then Ctrl-C
        yield dict(kind="arch", arch=str(archs[0]), ms=2.0, spread=0.0, ref_ms=1.0, ref_spread=0.0, i=start)
        raise KeyboardInterrupt

    monkeypatch.setattr(latency, "collect", collect)
    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt, match=r"the 1 archs timed so far are kept in \S+timings.jsonl; continue "
                                                 r"with: python latency.py measure --samples 5 --out \S+ --resume$"):
        latency.main(["measure", "--samples", "5", "--out", str(out)])
    assert [r["kind"] for r in read_jsonl(out / "timings.jsonl")] == ["meta", "arch"]
@pytest.mark.slow
def test_onnx_runtime_backends(tmp_path, monkeypatch):
    """The ONNX Runtime models compute the model; measure records the backend and refuses to mix backends;
    a predictor knows its backend and `table` refuses another one."""
    torch.manual_seed(0)
    arch = Arch(2, 60, 96, 4, 40)
    eager, fp32, int8 = on_backends(Bert(arch).eval(), BACKENDS)
    ids = torch.randint(30522, (3, 9))
    with torch.no_grad():
        ref = eager(ids)
    assert (fp32(ids) - ref).abs().max().item() <= 1e-4
    err = (int8(ids) - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item()  # quantized: close, not equal

    monkeypatch.setattr(latency, "BERT_BASE", Arch(2, 48, 64, 2, 32))
    space = dict(layers=(1, 2), hidden=(32, 48), ffn=(64,), heads=(1, 2), head_dim=16)
    torch_save({"space": space}, tmp_path / "superplm.pt")
    out = tmp_path / "lat"
    flags = ["--space", str(tmp_path / "superplm.pt"), "--samples", "1", "--seq-len", "16", "--warmup-passes", "0",
             "--repeats", "2", "--out", str(out)]
    latency.main(["measure", "--backend", "onnxruntime-int8"] + flags)
    records = read_jsonl(out / "timings.jsonl")
    assert records[0]["device"]["backend"] == "onnxruntime-int8" and "onnxruntime" in records[0]["device"]
    assert [r["kind"] for r in records[1:]] == ["base", "arch"] and all(r["ms"] > 0 for r in records[1:])
    with pytest.raises(UserError, match="--backend torch is not one of them \\(it has onnxruntime-int8\\)"):
        latency.main(["measure", "--resume", "--backend", "torch"] + flags)  # resuming with another backend

    pred, _, _ = fitted(n=50, steps=50)
    assert pred.backend == "torch"  # DEVICE predates backends
    pred.save(tmp_path / "lat.pt")
    with pytest.raises(UserError, match="--backend torch"):
        latency.run_table(latency.TableConfig(backend="onnxruntime", predictor=str(tmp_path / "lat.pt")))


def test_training_free_proxies_count_each_layers_weights_and_eq_1_3s_multiply_adds():
    """latency.params and latency.macs on hand-computed shapes, then against the modules they count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel
    dm, df, dqkv = 64, 128, 64  # 1-64-128-1-64, term by term
    per_layer = (3 * (dm * dqkv + dqkv)  # Q, K, V: weight and bias
                 + dqkv * dm + dm  # output projection
                 + dm * df + df + df * dm + dm  # the feed-forward network's two linears
                 + 2 * (dm + dm))  # two LayerNorms
    assert per_layer == 12480 + 4160 + 8320 + 8256 + 256 == 33472
    archs = [Arch.parse(a) for a in ("1-64-128-1-64", "3-64-128-1-64", "2-96-200-3-96", "1-128-300-2-192")]
    assert latency.params(archs).tolist()[:2] == [33472, 3 * 33472]
    T = 128  # one 128-token input: 4 projections, 2 FFN matmuls, QK^T and attention x V, each a multiply-add per
    assert latency.macs(archs[:1]).tolist() == [T * 4 * dm * dqkv + T * 2 * dm * df + 2 * T * T * dqkv]
    assert latency.macs(archs[:1]).tolist() == [6_291_456]
    ids = torch.zeros(1, T, dtype=torch.long)
    for a in archs:
        bert = Bert(a, vocab_size=100)  # without the embeddings and the masked-LM head: the layers
        assert latency.params([a])[0] == sum(p.numel() for p in bert.layers.parameters())
        if a.qkv == a.hidden:  # transformers' BERT has qkv = hidden
            encoder = BertModel(BertConfig(vocab_size=100, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                           num_attention_heads=a.heads, intermediate_size=a.ffn)).encoder
            assert latency.params([a])[0] == sum(p.numel() for p in encoder.parameters())
        if a.layers == 1:  # one layer: its attention through explicit matmuls (return_scores), which are counted
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                bert.eval()(ids, return_scores=True)
            assert latency.macs([a])[0] == counter.get_total_flops() / 2  # a multiply-add is two FLOPs


def test_a_predictor_names_every_shape_it_extrapolates_to_in_one_warning(capsys):
    pred = LatencyPredictor.fit([Arch(2, 64, 128, 2, 64), Arch(4, 128, 256, 2, 128)], np.array([0.1, 0.4]), ref_ms=10.0,
                                base_ms=100.0, device=DEVICE, width=8, steps=5, seed=0)
    pred.predict([Arch(3, 96, 200, 2, 64), Arch(8, 768, 3072, 12, 768), Arch(1, 32, 64, 1, 32)])
    pred.predict([Arch(9, 768, 3072, 12, 768)])  # said once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 3 shapes are outside (8-768-3072-12-768, 1-32-64-1-32)" in err
