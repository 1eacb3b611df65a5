"""`rlhf-time webui`: serve the page on this machine (127.0.0.1 by default), never through a public share link.

Listening on another interface exposes training and code paths to the network, so it needs --auth USER:PASSWORD.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

from rlhf_time.errors import RlhfTimeError

INSTALL_HINT = 'pip install -e ".[webui]"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def parse_auth(host: str, auth: Optional[str]) -> Optional[tuple[str, str]]:
    """The (user, password) pair of --auth; RlhfTimeError for a malformed one, or for a non-loopback host without."""
    if auth is not None:
        user, colon, password = auth.partition(":")
        if not (colon and user and password):
            raise RlhfTimeError("--auth takes USER:PASSWORD (both non-empty)")
        return user, password
    if not is_loopback(host):
        raise RlhfTimeError(f"--host {host} serves the page to the network: give --auth USER:PASSWORD too "
                            f"(or keep the default --host 127.0.0.1)")
    return None


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a training machine
    try:
        import gradio
    except ImportError:
        raise RlhfTimeError(f"the web UI needs gradio: {INSTALL_HINT}") from None
    return gradio


def serve(host: str = "127.0.0.1", port: int = 7860, output_dir: str = "outputs", auth: Optional[str] = None) -> None:
    """Build the page and serve it until interrupted; the page's training runs get SIGTERM when it stops."""
    credentials = parse_auth(host, auth)
    import_gradio()
    from rlhf_time.webui.app import build_app

    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    app = build_app(output)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"rlhf-time webui: http://{shown_host}:{port}  (runs in {output}; Ctrl-C stops)", flush=True)
    try:
        app.queue().launch(server_name=host, server_port=port, auth=credentials, share=False, quiet=True,
                           allowed_paths=[str(output)], footer_links=[], prevent_thread_lock=False)
    finally:
        app.run_control.stop_all()
