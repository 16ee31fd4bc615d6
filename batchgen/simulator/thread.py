"""The simulator for sync callers (:class:`SimulatorThread`) and the command line (:func:`serve_forever`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sys
import threading
import time

from batchgen.simulator.config import DEMO_KEY, SimulatorConfig
from batchgen.simulator.server import Clock, Simulator, Sleep


class SimulatorThread:
    """Runs a Simulator on its own event loop in a daemon thread.

    For sync callers (tests, ``batchgen run --simulate``) that cannot share their thread with
    an event loop. ``stats`` is the live object the server thread updates; ``sleep`` and
    ``clock`` are the :class:`Simulator`'s, and run on the server thread.
    """

    def __init__(
        self,
        config: SimulatorConfig = SimulatorConfig(),
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.base_url = ""
        self._simulator = Simulator(config, sleep=sleep, clock=clock)
        self.stats = self._simulator.stats
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def compatible_base_url(self) -> str:
        """The OpenAI-compatible base URL (``.../compatible-mode/v1``), once started."""
        return self.base_url.removesuffix("/api/v1") + "/compatible-mode/v1" if self.base_url else ""

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server thread and return the base URL once it is listening."""
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="batchgen-simulator", daemon=True
        )
        self._thread.start()
        try:
            self.base_url = ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self.base_url

    def stop(self) -> None:
        """Stop the server (cancelling hanging requests) and join its thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join()

    def _run(self, ready: concurrent.futures.Future[str]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            try:
                url = await self._simulator.start(self.host, self.port)
            except BaseException as error:
                ready.set_exception(error)
                return
            ready.set_result(url)
            try:
                await self._stop_event.wait()
            finally:
                await self._simulator.stop()

        # asyncio.run also cancels leftovers and closes the loop, so nothing leaks a warning.
        asyncio.run(main())


def serve_forever(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C or SIGTERM, for the README demo and manual experiments."""

    async def main() -> None:
        simulator = Simulator(config)
        base_url = await simulator.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available on Windows or off the main thread: Ctrl-C then arrives as
            # KeyboardInterrupt, handled below.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
        # Only the simulator's own demo key is echoed: a key someone chose stays off the screen.
        shown_key = config.key if config.key == DEMO_KEY else "<the key you configured>"
        print(
            f"DashScope simulator listening on {base_url} (key {shown_key}); point batchgen "
            f"at it with DASHSCOPE_HTTP_BASE_URL={base_url} DASHSCOPE_API_KEY={shown_key}. "
            "Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await simulator.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
