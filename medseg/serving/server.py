"""``medseg serve``: checks the security settings, then runs the app on uvicorn (TLS passed through)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

from medseg.errors import MedsegError
from medseg.serving.app import ServeSettings, create_app
from medseg.serving.logs import configure_json_logging

log = logging.getLogger("medseg.serving")


def is_loopback(host: str) -> bool:
    """True when ``host`` (name or address) resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_security(settings: ServeSettings, host: str) -> None:
    """Refuse to start without a token, unless ``--insecure-local`` on a loopback address."""
    if len(settings.tokens) == 0:
        if not settings.insecure_local:
            raise MedsegError("no API token: set MEDSEG_API_TOKENS (comma-separated) or pass --token-file; "
                              "--insecure-local serves without tokens on a loopback address only")
        if not is_loopback(host):
            raise MedsegError(f"--insecure-local serves without tokens only on a loopback address, not on {host}")
    elif settings.insecure_local:
        log.warning("--insecure-local ignored: tokens are configured", extra={"event": "insecure_local_ignored"})


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, ssl_certfile: Path | None = None,
          ssl_keyfile: Path | None = None, ssl_keyfile_password: str | None = None,
          forwarded_allow_ips: str | None = None, root_path: str = "") -> None:
    """Run the service until interrupted. With ``ssl_certfile``/``ssl_keyfile`` uvicorn serves HTTPS."""
    import uvicorn

    check_security(settings, host)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise MedsegError("TLS needs both --ssl-certfile and --ssl-keyfile")
    if not Path(settings.model).exists():
        raise MedsegError(f"{settings.model}: no such run folder or model file")
    configure_json_logging()
    app = create_app(settings)
    log.info("serving", extra={"event": "serving", "host": host, "port": port, "tls": ssl_certfile is not None,
                               "workers": settings.workers, "max_queue": settings.max_queue})
    uvicorn.run(app, host=host, port=port, ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None, ssl_keyfile_password=ssl_keyfile_password,
                # Our middleware logs each request as JSON (route template, status, token id); uvicorn's
                # access log would add client addresses and raw paths.
                access_log=False, log_config=None, proxy_headers=forwarded_allow_ips is not None,
                forwarded_allow_ips=forwarded_allow_ips, root_path=root_path, timeout_keep_alive=5,
                server_header=False)
