"""An unreachable Hub is found with one connection attempt and huggingface_hub then works
offline, instead of retrying every request for ~23 s (peftkit/offline.py)."""

import os
import socket

import pytest
from huggingface_hub import constants

from peftkit import offline
from peftkit.cli.app import main


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not checked yet, with the user's HF_HUB_OFFLINE unset; whatever the
    check sets is undone afterwards."""
    monkeypatch.setattr(offline, "_checked", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_unreachable_hub_switches_to_offline_once(fresh, capsys):
    fresh.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert offline.go_offline_if_unreachable() is True
    assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # for the processes started later
    err = capsys.readouterr().err
    assert err.count("note: the Hugging Face Hub") == 1 and "unreachable" in err
    # checked once per process: no second probe, no second note
    fresh.setattr(offline, "reachable", lambda *a, **k: pytest.fail("probed twice"))
    assert offline.go_offline_if_unreachable() is True
    assert capsys.readouterr().err == ""


def test_reachable_hub_changes_nothing(fresh, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        fresh.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert offline.go_offline_if_unreachable() is False
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["1", "0"])
def test_users_choice_is_never_probed_or_changed(fresh, value):
    fresh.setenv("HF_HUB_OFFLINE", value)
    fresh.setattr(offline, "reachable", lambda *a, **k: pytest.fail("probed"))
    assert offline.go_offline_if_unreachable() is False
    assert os.environ["HF_HUB_OFFLINE"] == value


def test_show_of_a_hub_model_goes_offline_before_its_first_lookup(fresh, capsys):
    """`peftkit show` of a Hub-named recipe with the Hub unreachable: one note, offline mode
    on before the config lookup (so huggingface_hub never enters its retry loop), the shapes
    from peftkit's table."""
    from peftkit.model import summary

    fresh.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    summary.base_config.cache_clear()  # another test may have looked this recipe up
    seen = []
    import transformers

    original = transformers.AutoConfig.from_pretrained
    fresh.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: (
        seen.append(constants.HF_HUB_OFFLINE), original(*a, **k))[1])
    rc = main(["show", "llama3-8b-lora"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert seen and all(seen), seen  # every config lookup ran offline
    assert "table of published shapes" in out
    assert err.count("note: the Hugging Face Hub") == 1


def test_a_local_base_never_probes_the_hub(fresh, tmp_path):
    from peftkit.model import sources
    from peftkit.recipe.schema import Model

    fresh.setattr(offline, "reachable", lambda *a, **k: pytest.fail("probed"))
    assert sources.resolve(Model(str(tmp_path))) == str(tmp_path)
