import socket

import pytest

import common
from common import UserError, hub_reachable, run_main


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
