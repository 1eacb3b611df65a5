"""`rlhf-time webui` refuses to serve the network without a login, and names the extra when gradio is missing."""

from __future__ import annotations

import sys

import pytest

from rlhf_time.cli import main
from rlhf_time.errors import RlhfTimeError
from rlhf_time.webui.server import is_loopback, parse_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_login(host):
    assert is_loopback(host) and parse_auth(host, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.org"])
def test_any_other_host_without_auth_is_refused_in_one_line_with_exit_2(host, capsys):
    assert not is_loopback(host)
    assert main(["webui", "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --host {host} serves the page to the network: give --auth USER:PASSWORD")
    assert err.count("\n") == 1
    assert parse_auth(host, "ada:secret") == ("ada", "secret")


@pytest.mark.parametrize("auth", ["ada", "ada:", ":secret"])
def test_a_malformed_auth_is_refused(auth):
    with pytest.raises(RlhfTimeError, match="--auth takes USER:PASSWORD"):
        parse_auth("0.0.0.0", auth)


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["webui", "--port", "1"]) == 2
    assert capsys.readouterr().err == 'error: the web UI needs gradio: pip install -e ".[webui]"\n'
