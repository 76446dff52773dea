"""One command-line grammar across the stages: the same flag means the same thing in every script, old spellings
still work (with a note), and every number is checked where the config is built."""
import argparse
import dataclasses
import json

import pytest

import config
import data
import demo
import distill
import finetune
import latency
import search
import superplm
from common import UserError, run_main
from runs import RunFolder

# (script, subcommand or None, its config class): every stage that takes flags
STAGES = [(superplm, None, superplm.Config), (latency, "measure", latency.MeasureCfg),
          (latency, "fit", latency.FitCfg), (latency, "table", latency.TableCfg), (search, None, search.Config),
          (finetune, None, finetune.FinetuneConfig), (demo, None, demo.DemoConfig), (data, None, data.DataConfig),
          (distill, "make-teacher", distill.TeacherConfig)]
SHARED = {"--seed": ("7", 7), "--out": ("runs/x", "runs/x"), "--batch-size": ("5", 5), "--steps": ("9", 9),
          "--warmup": ("0.25", 0.25), "--resume": (None, True), "--overwrite": (None, True)}


def parse(module, command, cls, argv):
    return config.parse_config(cls, argv, parser=config.config_parser(cls)) if command else \
        config.parse_config(cls, argv)


@pytest.mark.parametrize("module, command, cls", STAGES, ids=[f"{m.__name__} {c or ''}" for m, c, _ in STAGES])
def test_a_shared_flag_is_parsed_the_same_way_in_every_script(module, command, cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    for flag, (text, value) in SHARED.items():
        name = flag[2:].replace("-", "_")
        if name in fields:
            cfg = parse(module, command, cls, [flag] if text is None else [flag, text])
            assert getattr(cfg, name) == value, (cls, flag)
    # one meaning per name: --warmup is a share of the steps, --out a folder, --data a dataset folder
    for f in dataclasses.fields(cls):
        assert f.name not in ("batch", "max_steps", "samples") or cls is latency.MeasureCfg, f.name
        assert f.name != "warmup" or f.metadata["max"] == 1
        assert f.name != "out" or "folder" in f.metadata["help"]
        assert f.name != "data" or cls is finetune.FinetuneConfig


@pytest.mark.parametrize("argv, field, value, note", [
    (["--samples", "2"], "sub_models", 2, "--samples is deprecated, use --sub-models"),
    (["--max-steps", "40"], "steps", 40, "--max-steps is deprecated, use --steps"),
    (["--superplm", "2-64-128-2-64"], "superplm_arch", "2-64-128-2-64",
     "--superplm is deprecated, use --superplm-arch"),
])
def test_old_superplm_spellings_still_work_with_a_note(argv, field, value, note, capsys):
    assert getattr(superplm.parse_config(argv), field) == value
    assert capsys.readouterr().err == f"note: {note}\n"


@pytest.mark.parametrize("command, old, new, field, value", [
    ("measure", "--batch", "--batch-size", "batch_size", 2), ("measure", "--warmup", "--warmup-passes",
                                                              "warmup_passes", 0),
    ("fit", "--data", "--timings", "timings", "t.jsonl")])
def test_old_latency_spellings_still_work_with_a_note(command, old, new, field, value, capsys, monkeypatch):
    seen = {}
    monkeypatch.setitem(latency.COMMANDS, command, (latency.COMMANDS[command][0],
                                                    lambda cfg, argv: seen.setdefault("cfg", cfg), ""))
    latency.main([command, old, str(value)])
    assert getattr(seen["cfg"], field) == value and capsys.readouterr().err == f"note: {old} is deprecated, use {new}\n"


def test_task_names_in_any_case():
    for text in ("RTE", "rte", "Sst-2", "MNLI"):
        assert config.parse_config(finetune.FinetuneConfig, ["--task", text]).task == finetune.task_name(text)


@pytest.mark.parametrize("main, argv, message", [
    (superplm.main, ["--max-steps", "-5"], "--steps -5 is out of range: it must be >= 1"),
    (superplm.main, ["--steps", "0"], "--steps 0 is out of range: it must be >= 1"),
    (superplm.main, ["--sub-models", "0"], "--sub-models 0 is out of range: it must be >= 1"),
    (superplm.main, ["--batch-size", "-1"], "--batch-size -1 is out of range: it must be >= 1"),
    (superplm.main, ["--lr", "0"], "--lr 0.0 is out of range: it must be > 0"),
    (superplm.main, ["--warmup", "1.5"], "--warmup 1.5 is out of range: it must be >= 0 and <= 1"),
    (latency.main, ["fit", "--steps", "-1"], "--steps -1 is out of range: it must be >= 1"),
    (latency.main, ["fit", "--holdout", "0"], "--holdout 0.0 is out of range: it must be > 0 and <= 0.9"),
    (latency.main, ["measure", "--samples", "-3"], "--samples -3 is out of range: it must be >= 1"),
    (latency.main, ["measure", "--repeats", "0"], "--repeats 0 is out of range: it must be >= 1"),
    (latency.main, ["table", "--seq-len", "600"], "--seq-len 600 is out of range: it must be >= 1 and <= 512"),
    (search.main, ["--population", "0"], "--population 0 is out of range: it must be >= 1"),
    (search.main, ["--p-mutate", "1.5"], "--p-mutate 1.5 is out of range: it must be >= 0 and <= 1"),
    (finetune.main, ["--epochs", "4", "0"], "--epochs 0 is out of range: it must be >= 1"),
    (finetune.main, ["--lr", "-0.001"], "--lr -0.001 is out of range: it must be > 0"),
    (demo.main, ["--steps", "0"], "--steps 0 is out of range: it must be >= 1"),
    (data.main, ["--seq-len", "0"], "--seq-len 0 is out of range: it must be >= 3"),
])
def test_negative_and_zero_values_are_refused_in_one_line(main, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even a folder
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1] == f"error: {message}" and not list(tmp_path.iterdir())


@dataclasses.dataclass
class Toy:
    out: str = "runs/toy"
    steps: int = dataclasses.field(default=3, metadata={"help": "steps", **config.COUNT})


def test_run_folder_records_the_run_and_round_trips(tmp_path):
    cfg = config.parse_config(Toy, ["--out", str(tmp_path / "run"), "--steps", "4"])
    with RunFolder(cfg.out, cfg, argv=["--out", cfg.out, "--steps", "4"]) as run:
        run.done_first()
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"] == {"out": str(tmp_path / "run"), "steps": 4} and record["status"] == "finished"
    assert record["command"] == f"python test_cli.py --out {tmp_path / 'run'} --steps 4"
    assert set(record["versions"]) == {"torch", "python", "git_commit", "git_dirty"} and record["ended"]
    assert config.parse_config(Toy, ["--config", str(tmp_path / "run" / "config.json")]) == cfg
    with pytest.raises(UserError, match="already holds a run: pass --overwrite to replace it or another --out"):
        RunFolder(cfg.out, cfg)  # a script without --resume is never told to pass it
    with pytest.raises(UserError, match="pass --resume to continue it, --overwrite to replace it"):
        RunFolder(cfg.out, cfg, resume=False)


def test_an_interrupt_before_the_first_result_puts_the_folder_back(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("kept")
    cfg = Toy(out=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(cfg.out, cfg, overwrite=True):
            (tmp_path / "run" / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["old.txt"]
    with RunFolder(cfg.out, cfg, overwrite=True) as run:
        (tmp_path / "run" / "new.txt").write_text("done")
        run.done_first()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "new.txt"]


def test_no_flag_is_defined_twice_and_help_hides_old_spellings():
    for module, command, cls in STAGES:
        parser = config.config_parser(cls)
        shown = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
        assert len(shown) == len(set(shown))
        assert not {"--max-steps", "--samples", "--batch", "--data"} & set(shown) or cls in (
            latency.MeasureCfg, finetune.FinetuneConfig)


def test_a_script_of_several_commands_parses_each_command_with_its_own_flags(tmp_path, capsys):
    commands = {"make-teacher": (distill.TeacherConfig, "write"), "check": (distill.CheckConfig, "load")}
    assert config.parse_config(commands, ["check", "--teacher", "t"]) == ("check", distill.CheckConfig(teacher="t"))
    assert config.parse_config(commands, ["make-teacher", "--seed", "3", "--no-overwrite"]) == \
        ("make-teacher", distill.TeacherConfig(seed=3))
    (tmp_path / "config.json").write_text(json.dumps({"config": {"vocab_size": 99, "out": "x", "overwrite": True}}))
    assert config.parse_config(commands, ["make-teacher", "--config", str(tmp_path), "--out", "y"]) == \
        ("make-teacher", distill.TeacherConfig(vocab_size=99, out="y"))  # flags win; --overwrite is asked anew
    for argv, message in ((["check", "--seed", "3"], "check: error: unrecognized arguments: --seed 3"),
                          (["make-teacher", "--vocab-size", "2"], "error: --vocab-size 2 is out of range"),
                          ([], "error: the following arguments are required: command")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: distill.main(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("main, argv, shown", [
    (data.main, [], ["(default: stdlib)", "(default: 30522)", "(default: 128)", "(default: paper)"]),
    (data.main, ["--preset", "tiny"], ["(default: 4096)", "(default: 64)"]),
    (demo.main, [], ["(default: runs/demo)", "(default: 40x)", "(default: 300)"]),
    (distill.main, ["make-teacher"], ["(default: runs/teacher)", "(default: 2-256-1024-4-256)", "(default: 4096)"]),
    (distill.main, ["check"], ["(default: runs/teacher)"])])
def test_help_shows_the_real_defaults(main, argv, shown, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and "None" not in text and all(s in text for s in shown)
