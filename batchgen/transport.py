"""The HTTP transport: aiohttp's connection pool behind httpx's transport API, with a direct way in.

httpx is batchgen's client API: ``Caller`` sends through any ``httpx.AsyncBaseTransport``
(``httpx.MockTransport``, a wrapper that stamps requests, httpx's own pool). The default is
:class:`Transport`, httpx-aiohttp's transport over one ``aiohttp.ClientSession``, because
httpx 0.28's own pool grows superlinearly costly with connections (``bench/bench_throughput.py
--backend httpx`` shows about 16 ms of CPU per request at 100 connections).

Through httpx's API each request still builds an ``httpx.Request`` and an ``httpx.Response``
around aiohttp's own: at thousands of requests a second that was a tenth of the client's CPU
(``bench/bench_cpu.py``). :meth:`Transport.post` is the same exchange on the same session
without them, which ``Caller`` takes when the transport is this one; the exchange on the wire,
the timeouts, the proxy and the errors raised are aiohttp's either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

if TYPE_CHECKING:
    from batchgen.config import RunConfig


def make_transport(config: RunConfig, *, backend: str = "aiohttp") -> httpx.AsyncBaseTransport:
    """An httpx transport with ``concurrency`` connections (``backend="httpx"``: httpx's own pool)."""
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    if backend == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits)
    return Transport(config, limits)


def _env_proxy(url: str) -> httpx.Proxy | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY for ``url``, looked up once for the run."""
    import urllib.request

    parsed = httpx.URL(url)
    if urllib.request.proxy_bypass(parsed.host):
        return None
    proxy = urllib.request.getproxies().get(parsed.scheme)
    return httpx.Proxy(proxy) if proxy else None


class Transport(AiohttpTransport):
    """httpx-aiohttp's transport on a session of ``config.concurrency`` connections, plus ``post``."""

    def __init__(self, config: RunConfig, limits: httpx.Limits) -> None:
        # SSL_CERT_FILE is honoured through httpx's SSL context, built only for https (loading
        # the CA bundle costs a tenth of a second of start-up). Not trust_env: aiohttp then
        # looks up proxies and .netrc in a thread for every request (2 executor jobs each).
        secure = config.url.startswith("https:")
        ssl = httpx.create_ssl_context(trust_env=True) if secure else False

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=config.concurrency, keepalive_timeout=limits.keepalive_expiry, ssl=ssl
            )
            # No cookies: a batch is stateless, and a sticky load-balancer cookie would pin
            # every request to one backend.
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        proxy = _env_proxy(config.base_url)
        super().__init__(verify=ssl if secure else False, limits=limits, client=session, proxy=proxy)
        # ``post``'s caller bounds each attempt (and a stream's silences) with its own deadline,
        # so aiohttp keeps no timers of its own per request.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None)
        self._targets: dict[str, yarl.URL] = {}
        self._proxy = str(proxy.url) if proxy else None
        self._proxy_auth = aiohttp.BasicAuth(*proxy.auth) if proxy and proxy.auth else None
        self._proxy_headers = dict(proxy.headers) if proxy else None

    def _session(self) -> aiohttp.ClientSession:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()  # inside the event loop, as the generic path does
        return self.client

    async def post(self, url: str, headers: Mapping[str, str], content: bytes) -> aiohttp.ClientResponse:
        """POST ``content``; the response with its body unread (``release`` it when done).

        No timeout: the caller's ``asyncio.timeout`` is the one deadline."""
        target = self._targets.get(url)
        if target is None:  # parsed once, not per request
            target = self._targets[url] = yarl.URL(url)
        return await self._session().post(
            target,
            data=content,
            headers=headers,
            allow_redirects=False,
            auto_decompress=False,
            compress=False,
            timeout=self._timeout,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
            proxy_headers=self._proxy_headers,
        )
