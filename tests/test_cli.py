"""One command-line grammar across the stages: the same flag means the same thing in every script, no old spelling is
accepted, and every number is checked where the config is built. Also the run folder (config.json, --overwrite,
--resume, interrupts), the one-line errors a user sees, and --help."""
import argparse
import dataclasses
import json
import socket

import pytest
import torch

import common
import data
import demo
import distill
import export
import finetune
import latency
import search
import superplm
from common import RunFolder, UserError, hub_reachable, run_main
from model import Arch, from_pretrained, read_pretrained
from test_model import VOCAB

# (script, subcommand or None, its config class): every stage that takes flags
STAGES = [(superplm, None, superplm.Config), (latency, "measure", latency.MeasureConfig),
          (latency, "fit", latency.FitConfig), (latency, "table", latency.TableConfig), (search, None, search.Config),
          (finetune, None, finetune.Config), (demo, None, demo.Config), (data, None, data.DataConfig),
          (distill, "make-teacher", distill.TeacherConfig)]
SHARED = {"--seed": ("7", 7), "--out": ("runs/x", "runs/x"), "--batch-size": ("5", 5), "--steps": ("9", 9),
          "--warmup": ("0.25", 0.25), "--resume": (None, True), "--overwrite": (None, True)}


def parse(module, command, cls, argv):
    return common.parse_flags(cls, argv, parser=common.config_parser(cls)) if command else \
        common.parse_flags(cls, argv)


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
        assert f.name not in ("batch", "max_steps", "samples") or cls is latency.MeasureConfig, f.name
        assert f.name != "warmup" or f.metadata["max"] == 1
        assert f.name != "out" or "folder" in f.metadata["help"]
        assert f.name != "data" or cls is finetune.Config


@pytest.mark.parametrize("module, command, cls", STAGES + [(distill, "check", distill.CheckConfig), (export, None,
                                                                                                    export.Config)])
def test_every_bad_flag_of_every_script_is_one_line(module, command, cls, capsys):
    """argparse's errors included: a flag without its value, a word for a number, a choice that is not one, a value
    given to a switch. Each is `error: ...` on one line, exit status 2, no usage block, before any work."""
    cases = []
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            cases.append(([f"{flag}=x"], "ignored explicit argument"))
            continue
        cases.append(([flag], f"{flag} needs a value"))
        if f.metadata.get("choices"):
            cases.append(([flag, "bogus"], f"{flag} bogus: choose one of "))
        elif "int" in str(f.type) or "float" in str(f.type):
            cases.append(([flag, "abc"], f"{flag} abc: not a"))
    cases += [(["--no-such-flag"], "unrecognized arguments: --no-such-flag (")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: module.main(([command] if command else []) + argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, argv
    for main, argv, message in ((finetune.main, ["--task", "RTEE"], "error: --task RTEE: choose one of cola, sst2"),
                                (search.main, ["--target", "-3x"], "error: --target needs a value (one that starts "
                                                                   "with '-' is written --target=VALUE)"),
                                (search.main, ["--target=-3x", "--superplm", "x"], "error: latency target '-3x'")):
        with pytest.raises(SystemExit):
            run_main(lambda: main(argv))
        assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize("parse, argv", [
    (superplm.parse_config, ["--superplm", "2-64-128-2-64"]), (superplm.parse_config, ["--max-steps", "40"]),
    (superplm.parse_config, ["--samples", "2"]), (latency.parse_command, ["measure", "--batch", "2"]),
    (latency.parse_command, ["measure", "--warmup", "0"]), (latency.parse_command, ["fit", "--data", "t.jsonl"])])
def test_old_spellings_are_refused(parse, argv, capsys):
    """The deprecated spellings are gone, and argparse must not take them as abbreviations of the new ones
    (--superplm of --superplm-arch, --batch of --batch-size, --warmup of --warmup-passes)."""
    with pytest.raises(UserError, match=f"^unrecognized arguments: {' '.join(argv[-2:])} "):
        parse(argv)


def test_task_names_in_any_case():
    for text in ("RTE", "rte", "Sst-2", "MNLI"):
        assert common.parse_flags(finetune.Config, ["--task", text]).task == finetune.task_name(text)


@pytest.mark.parametrize("main, argv, message", [
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
    steps: int = dataclasses.field(default=3, metadata={"help": "steps", **common.COUNT})


def test_run_folder_records_the_run_and_round_trips(tmp_path):
    cfg = common.parse_flags(Toy, ["--out", str(tmp_path / "run"), "--steps", "4"])
    with RunFolder(cfg.out, cfg, argv=["--out", cfg.out, "--steps", "4"]) as run:
        run.done_first()
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"] == {"out": str(tmp_path / "run"), "steps": 4} and record["status"] == "finished"
    assert record["command"] == f"python test_cli.py --out {tmp_path / 'run'} --steps 4"
    assert set(record["versions"]) == {"torch", "python", "git_commit", "git_dirty"} and record["ended"]
    assert common.parse_flags(Toy, ["--config", str(tmp_path / "run" / "config.json")]) == cfg
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


def test_no_flag_is_defined_twice_and_no_old_spelling_is_shown():
    for module, command, cls in STAGES:
        parser = common.config_parser(cls)
        shown = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
        assert len(shown) == len(set(shown))
        assert not {"--max-steps", "--samples", "--batch", "--data"} & set(shown) or cls in (
            latency.MeasureConfig, finetune.Config)


def test_a_script_of_several_commands_parses_each_command_with_its_own_flags(tmp_path, capsys):
    commands = {"make-teacher": (distill.TeacherConfig, "write"), "check": (distill.CheckConfig, "load")}
    assert common.parse_flags(commands, ["check", "--teacher", "t"]) == ("check", distill.CheckConfig(teacher="t"))
    assert common.parse_flags(commands, ["make-teacher", "--seed", "3", "--no-overwrite"]) == \
        ("make-teacher", distill.TeacherConfig(seed=3))
    (tmp_path / "config.json").write_text(json.dumps({"config": {"vocab_size": 99, "out": "x", "overwrite": True}}))
    assert common.parse_flags(commands, ["make-teacher", "--config", str(tmp_path), "--out", "y"]) == \
        ("make-teacher", distill.TeacherConfig(vocab_size=99, out="y"))  # flags win; --overwrite is asked anew
    for argv, message in ((["check", "--seed", "3"], "error: unrecognized arguments: --seed 3 ("),
                          (["make-teacher", "--vocab-size", "2"], "error: --vocab-size 2 is out of range"),
                          ([], "error: command: choose one of make-teacher, check")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: distill.main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1


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


# ----------------------------------------------------------------------------- one-line errors: --arch, model folders

@pytest.mark.parametrize("text, field", [
    ("5-564-1054-8", "5 fields"), ("5-564-1054-8-512-1", "5 fields"), ("", "5 fields"),
    ("5-564-x-8-512", "ffn"), ("5-564-10.5-8-512", "ffn"), ("5--1054-8-512", "hidden"),
    ("0-564-1054-8-512", "layers"), ("5-564-1054-0-512", "heads"), ("5-564-1054-7-512", "divisible"),
])
def test_arch_parse_errors_name_the_field(text, field):
    with pytest.raises(UserError, match=field):
        Arch.parse(text)


def test_arch_rejects_non_positive_values():
    with pytest.raises(UserError, match="layers"):
        Arch(-1, 64, 64, 1, 64)
    with pytest.raises(UserError, match="qkv"):
        Arch(1, 64, 64, 1, 0)


def test_bad_model_folders_get_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert",')
    with pytest.raises(UserError, match=r"config\.json is not JSON"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="expected model_type"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="bert", **{
        "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96})))
    with pytest.raises(UserError, match="model.safetensors"):
        from_pretrained(tmp_path)
    from safetensors.torch import save_file
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(VOCAB, 64)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="missing weights"):
        from_pretrained(tmp_path)
    config, state = read_pretrained(tmp_path)
    assert config["hidden_size"] == 64 and list(state) == ["bert.embeddings.word_embeddings.weight"]


# ----------------------------------------------------------------------------- each script's flags and presets

@pytest.mark.parametrize("argv, method, pm, pe", [
    ([], "evolve-elite", 0.8, 0.2), (["--method", "evolve"], "evolve", 0.5, 0.5),
    (["--preset", "paper"], "evolve", 0.5, 0.5),
    (["--preset", "paper", "--method", "evolve-elite"], "evolve-elite", 0.8, 0.2),
    (["--method", "evolve", "--p-mutate", "0.3"], "evolve", 0.5, 0.5)])
def test_search_help_shows_the_methods_pm_and_pe_and_flags_given_win(argv, method, pm, pe, capsys):
    with pytest.raises(SystemExit):
        search.parse_config(argv + ["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"evolve-elite 0.8 (default: {pm})" in shown and f"evolve-elite 0.2 (default: {pe})" in shown
    cfg = search.parse_config(argv)
    assert (cfg.method, cfg.p_mutate, cfg.p_explore) == (method, 0.3 if "0.3" in argv else pm, pe)
    assert cfg.evaluator == ("finetune" if "paper" in argv else "mlm")


def test_search_presets_set_defaults_that_flags_override():
    assert search.parse_config([]) == search.Config(p_mutate=0.8, p_explore=0.2)  # the field defaults
    paper = search.parse_config(["--preset", "paper"])
    assert (paper.generations, paper.population, paper.ft_train_examples, paper.ft_eval_examples) == (4, 25, 0, 0)
    tiny = search.parse_config(["--preset", "tiny", "--population", "5"])
    assert (tiny.superplm, tiny.out, tiny.target, tiny.population) == ("runs/superplm-tiny", "runs/search-tiny",
                                                                        "40x", 5)
    method = next(f for f in dataclasses.fields(search.Config) if f.name == "method")
    assert method.metadata["choices"] == list(search.METHODS)


def test_latency_parses_each_command_in_the_shared_grammar_with_a_preset_for_measure(tmp_path, capsys):
    name, cfg = latency.parse_command(["measure", "--preset", "tiny", "--repeats", "5"])
    assert name == "measure" and (cfg.samples, cfg.warmup_passes, cfg.repeats) == (150, 1, 5)  # flags given win
    assert latency.parse_command(["measure"])[1] == latency.MeasureConfig()  # paper: the defaults shown
    (tmp_path / "config.json").write_text(json.dumps(dict(config=dict(steps=7, holdout=0.5))))
    assert latency.parse_command(["fit", "--config", str(tmp_path), "--holdout", "0.3"])[1] == \
        latency.FitConfig(steps=7, holdout=0.3)
    for command, default in (("measure", "(default: 2000)"), ("fit", "(default: 0.2)"), ("table", "(default: )")):
        with pytest.raises(SystemExit):
            latency.main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert shown.startswith("usage: ") and f" {command} [-h] " in shown.split(" options: ")[0]
        assert default in shown and "None" not in shown
    with pytest.raises(UserError, match="^command mesure: choose one of measure, fit, table$"):
        latency.main(["mesure"])


# ----------------------------------------------------------------------------- run_main and offline mode

def test_run_main_prints_a_user_error_as_one_line(capsys):
    def main():
        raise UserError("--foo 3 is too big: use at most 2")
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --foo 3 is too big: use at most 2\n"


@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) not aligned"), FileNotFoundError("x.bin"),
                                 KeyError("hidden")])
def test_run_main_keeps_the_traceback_of_anything_else(bug, capsys):
    """A ValueError deep inside the code is a bug, not bad input: it leaves run_main as it is, so Python prints its
    traceback, instead of passing for a one-line user error."""
    def main():
        raise bug
    with pytest.raises(type(bug)) as e:
        run_main(main)
    assert e.value is bug and capsys.readouterr().err == ""


def test_hub_reachable_honours_offline_mode_and_probes_the_endpoint(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:  # a local "hub" that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub_reachable() is False  # offline mode: never probed
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        assert hub_reachable() is True
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_reachable() is False


def test_load_hub_dataset_restores_the_online_flags(monkeypatch):
    import datasets
    import huggingface_hub
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    seen = []
    monkeypatch.setattr(common, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: seen.append((a, k, datasets.config.HF_HUB_OFFLINE)) or "rows")
    assert common.load_hub_dataset("corpus 'x'", "give files", "x", split="train") == "rows"
    assert seen == [(("x",), {"split": "train"}, True)]  # offline while loading: the cache or nothing, no retries
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before
