"""The prefill server's bootstrap service (SGLang's ``/route`` protocol) and the decode side's client.

A prefill server runs this small HTTP service on ``--disaggregation-bootstrap-port`` (8998).
Each prefill rank registers with ``PUT /route``; a decode server that receives a request with
``bootstrap_host``/``bootstrap_port``/``bootstrap_room`` asks it where to find the rank that
will compute that room:

- ``PUT /route`` with SGLang's Mooncake payload (``role``, ``attn_tp_size``, ``attn_tp_rank``,
  ``attn_dp_size``, ``attn_dp_rank``, ``pp_size``, ``pp_rank``, ``system_dp_size``,
  ``system_dp_rank``, ``rank_ip``, ``rank_port``) -> ``200 OK``. smallm ranks also send
  ``session_id`` (their transfer engine's) and ``kv_layout`` (what the decode side must check
  before letting them write); SGLang ranks simply leave those out.
- ``GET /route?engine_rank=-1&target_dp_group=-1&target_pp_rank=-1`` -> the prefill side's
  sizes ``{"prefill_attn_tp_size", "prefill_dp_size", "prefill_pp_size"}`` (nulls until a rank
  has registered, as in SGLang).
- ``GET /route?engine_rank=T&target_dp_group=D&target_pp_rank=P`` -> ``{"rank_ip", "rank_port"}``
  (plus ``session_id`` and ``kv_layout`` when the rank sent them); 404 when no such rank.
- ``GET /health`` -> ``200 OK``.

The decode side picks the data-parallel group of a room as ``room % prefill_dp_size``, as SGLang
does; the service itself never sees rooms.

Where smallm differs from SGLang 0.5.2 (``MooncakeKVBootstrapServer``): bad input gets a 400
with a message instead of a 500 from an uncaught KeyError/ValueError (malformed PUT body,
non-integer query values), an unregistered rank gets the 404 SGLang meant to send (it raises
KeyError -> 500), a rank whose sizes contradict the first registration is refused with 400
(SGLang keeps the first sizes silently), and the answers carry ``session_id``/``kv_layout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import requests
from aiohttp import web

from smallm.runtime.disaggregation.transfer import join_session

DEFAULT_BOOTSTRAP_PORT = 8998
_INT_FIELDS = (
    "attn_tp_size",
    "attn_tp_rank",
    "attn_dp_size",
    "attn_dp_rank",
    "pp_size",
    "pp_rank",
    "system_dp_size",
    "system_dp_rank",
)


class BootstrapError(RuntimeError):
    """The bootstrap service was unreachable, refused a request, or knows no such rank."""


@dataclass
class PrefillRankInfo:
    """One prefill rank's registration: SGLang's ``PUT /route`` payload plus smallm's extras."""

    rank_ip: str
    rank_port: int
    role: str = "Prefill"
    attn_tp_size: int = 1
    attn_tp_rank: int = 0
    attn_dp_size: int = 1
    attn_dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    system_dp_size: int = 1
    system_dp_rank: int = 0
    session_id: str | None = None  # the rank's transfer engine (smallm only)
    kv_layout: dict[str, Any] | None = None  # e.g. layers, page size, dtype (smallm only)

    @property
    def dp_group(self) -> int:
        """The data-parallel group a decode server addresses (SGLang's rule)."""
        return self.attn_dp_rank if self.system_dp_size == 1 else self.system_dp_rank

    @property
    def dp_size(self) -> int:
        return self.attn_dp_size if self.system_dp_size == 1 else self.system_dp_size

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> PrefillRankInfo:
        """Parse a ``PUT /route`` body; ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        missing = [k for k in ("role", "rank_ip", "rank_port", *_INT_FIELDS) if k not in data]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        if not isinstance(data["role"], str):
            raise ValueError("role must be a string")
        if not isinstance(data["rank_ip"], str) or not data["rank_ip"]:
            raise ValueError("rank_ip must be a non-empty string")
        values: dict[str, Any] = {}
        for name in ("rank_port", *_INT_FIELDS):
            value = data[name]
            # SGLang sends ints (rank_port may come as a string: it calls int() on it)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if values[name] < 0 or (name.endswith("_size") and values[name] < 1):
                raise ValueError(f"{name} is out of range: {value!r}")
        if not 0 < values["rank_port"] < 65536:
            raise ValueError(f"rank_port must be in 1..65535, got {data['rank_port']!r}")
        session_id = data.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise ValueError("session_id must be a string")
        kv_layout = data.get("kv_layout")
        if kv_layout is not None and not isinstance(kv_layout, dict):
            raise ValueError("kv_layout must be a JSON object")
        return cls(
            rank_ip=data["rank_ip"],
            role=data["role"],
            session_id=session_id,
            kv_layout=kv_layout,
            **values,
        )


@dataclass(frozen=True)
class PrefillParallelInfo:
    """The prefill side's sizes, the answer to the all ``-1`` query."""

    prefill_attn_tp_size: int
    prefill_dp_size: int
    prefill_pp_size: int


@dataclass(frozen=True)
class BootstrapInfo:
    """Where a prefill rank listens: the answer to ``GET /route`` for one rank."""

    rank_ip: str
    rank_port: int
    session_id: str | None = None
    kv_layout: dict[str, Any] | None = field(default=None, hash=False)


class BootstrapServer:
    """The bootstrap HTTP service; run it in an existing event loop or on its own thread.

    ``await start()`` / ``await stop()`` inside a running loop, or ``start_in_thread()`` /
    ``close()`` from synchronous code. ``port=0`` binds a free port; ``port`` tells which.
    """

    def __init__(self, host: str, port: int = DEFAULT_BOOTSTRAP_PORT) -> None:
        self.host = host
        self.port = port
        self.app = web.Application()
        self.app.router.add_route("*", "/route", self._route)
        self.app.router.add_get("/health", self._health)
        # dp_group -> attn_tp_rank -> pp_rank -> rank. The handlers run on one event loop and
        # never await while touching it, so no lock is needed (SGLang's asyncio.Lock guards
        # nothing more).
        self._table: dict[int, dict[int, dict[int, PrefillRankInfo]]] = {}
        self._sizes: PrefillParallelInfo | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        """Listen in the running event loop; return the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when 0 was asked for
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self) -> int:
        """Run on a daemon thread with its own event loop; return once it listens."""
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="bootstrap-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise BootstrapError(
                f"bootstrap server cannot listen on {self.host}:{self.port}: {failure[0]}"
            ) from failure[0]
        return self.port

    def close(self) -> None:
        """Stop the thread started by ``start_in_thread``."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._thread = None

    def registered(self) -> list[PrefillRankInfo]:
        """Every registered prefill rank."""
        return [r for tp in self._table.values() for pp in tp.values() for r in pp.values()]

    # ---- routes ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _route(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            return await self._put(request)
        if request.method == "GET":
            return self._get(request)
        return web.Response(text="Method not allowed", status=405)

    async def _put(self, request: web.Request) -> web.Response:
        try:
            info = PrefillRankInfo.from_json(await request.json())
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            return web.Response(text=f"Bad bootstrap registration: {e}", status=400)
        if info.role != "Prefill":
            return web.Response(text="OK")  # SGLang accepts and ignores other roles
        sizes = PrefillParallelInfo(info.attn_tp_size, info.dp_size, info.pp_size)
        if self._sizes is not None and sizes != self._sizes:
            return web.Response(
                text=f"Bad bootstrap registration: sizes {sizes} differ from the first "
                f"registered rank's {self._sizes}",
                status=400,
            )
        self._sizes = sizes
        by_tp = self._table.setdefault(info.dp_group, {})
        by_tp.setdefault(info.attn_tp_rank, {})[info.pp_rank] = info
        return web.Response(text="OK")

    def _get(self, request: web.Request) -> web.Response:
        names = ("engine_rank", "target_dp_group", "target_pp_rank")
        raw = [request.query.get(n) for n in names]
        if not all(raw):
            return web.Response(text="Missing inputs for bootstrap server.", status=400)
        try:
            engine_rank, dp_group, pp_rank = (int(v) for v in raw)  # type: ignore[arg-type]
        except ValueError:
            return web.Response(
                text=f"Bad inputs for bootstrap server: {', '.join(names)} must be integers",
                status=400,
            )
        if engine_rank == dp_group == pp_rank == -1:
            sizes = self._sizes
            return web.json_response(
                dataclasses.asdict(sizes)
                if sizes is not None
                else dict.fromkeys(f.name for f in dataclasses.fields(PrefillParallelInfo))
            )
        info = self._table.get(dp_group, {}).get(engine_rank, {}).get(pp_rank)
        if info is None:
            return web.Response(
                text=f"Bootstrap info not Found: no prefill rank registered for "
                f"engine_rank={engine_rank} target_dp_group={dp_group} target_pp_rank={pp_rank}",
                status=404,
            )
        answer: dict[str, Any] = {"rank_ip": info.rank_ip, "rank_port": info.rank_port}
        if info.session_id is not None:
            answer["session_id"] = info.session_id
        if info.kv_layout is not None:
            answer["kv_layout"] = info.kv_layout
        return web.json_response(answer)


class BootstrapClient:
    """Talks to a prefill server's bootstrap service at ``"host:port"``; synchronous.

    Every failure (unreachable, refused, unknown rank, timeout after ``timeout`` seconds)
    raises ``BootstrapError`` with the service's answer in the message.
    """

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._session = requests.Session()

    @classmethod
    def for_request(cls, bootstrap_host: str, bootstrap_port: int, **kw: Any) -> BootstrapClient:
        """The client for a request's ``bootstrap_host``/``bootstrap_port`` fields."""
        return cls(join_session(bootstrap_host, int(bootstrap_port)), **kw)

    def _call(
        self, method: str, path: str = "/route", *, params: dict | None = None, json: Any = None
    ) -> requests.Response:
        try:
            response = self._session.request(
                method,
                f"http://{self.address}{path}",
                params=params,
                json=json,
                timeout=self.timeout,
            )
        except requests.RequestException as e:
            raise BootstrapError(f"bootstrap service at {self.address} unreachable: {e}") from e
        if response.status_code != 200:
            raise BootstrapError(
                f"bootstrap service at {self.address} answered {response.status_code}: "
                f"{response.text.strip()}"
            )
        return response

    def health(self) -> bool:
        """Whether the service answers ``GET /health``."""
        try:
            self._call("GET", "/health")
        except BootstrapError:
            return False
        return True

    def alive(self) -> bool:
        """False only when nothing listens at the address any more (the connection is
        refused: the prefill server is gone); a slow answer counts as alive."""
        try:
            self._session.get(f"http://{self.address}/health", timeout=self.timeout)
        except requests.Timeout:
            return True
        except requests.ConnectionError:
            return False
        return True

    def register(self, info: PrefillRankInfo) -> None:
        """``PUT /route``: register a prefill rank."""
        self._call("PUT", json=info.to_json())

    def parallel_info(self) -> PrefillParallelInfo:
        """The prefill side's sizes; BootstrapError until some rank has registered."""
        data = self._call(
            "GET", params={"engine_rank": -1, "target_dp_group": -1, "target_pp_rank": -1}
        ).json()
        try:
            return PrefillParallelInfo(
                int(data["prefill_attn_tp_size"]),
                int(data["prefill_dp_size"]),
                int(data["prefill_pp_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BootstrapError(
                f"bootstrap service at {self.address} has no prefill rank registered yet "
                f"(answered {data})"
            ) from e

    def lookup(
        self, engine_rank: int, target_dp_group: int, target_pp_rank: int = 0
    ) -> BootstrapInfo:
        """Where one prefill rank listens."""
        data = self._call(
            "GET",
            params={
                "engine_rank": engine_rank,
                "target_dp_group": target_dp_group,
                "target_pp_rank": target_pp_rank,
            },
        ).json()
        return BootstrapInfo(
            rank_ip=data["rank_ip"],
            rank_port=int(data["rank_port"]),
            session_id=data.get("session_id"),
            kv_layout=data.get("kv_layout"),
        )

    def lookup_room(
        self, bootstrap_room: int, engine_rank: int = 0, target_pp_rank: int = 0
    ) -> BootstrapInfo:
        """The rank that computes ``bootstrap_room``: its group is ``room % prefill_dp_size``."""
        if isinstance(bootstrap_room, bool) or not isinstance(bootstrap_room, int):
            raise BootstrapError(f"bootstrap_room must be an integer, got {bootstrap_room!r}")
        if bootstrap_room < 0:
            raise BootstrapError(f"bootstrap_room must be >= 0, got {bootstrap_room}")
        sizes = self.parallel_info()
        return self.lookup(engine_rank, bootstrap_room % sizes.prefill_dp_size, target_pp_rank)

    def close(self) -> None:
        self._session.close()
