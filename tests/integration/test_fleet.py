"""A pool of workers on one MQTT line, as real processes (``python -m worker.cli run``) against a real
mosquitto: station identity, unique client ids, graceful leave, SIGKILL and restart, broker restart.

Every worker shares ``<base>/frames/+`` through one shared group and takes its station from the topic
(``source_id: "{topic[2]}"``). Frames are JSON with a ``frame_id``; results are collected on
``segstream/<pipeline>/+/predictions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import frame_json, http_get, jpeg_bytes, make_models_dir, workflow_v4
from tests.sinks.helpers import Collector, PersistentMosquitto
from tests.support.mosquitto import MosquittoBroker, free_port
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STATIONS = ("st1", "st2", "st3")
REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """One ``segstream run`` process of the fleet pipeline (killed by its PID at the end)."""

    def __init__(self, tmp: Path, name: str, broker: MosquittoBroker, base: str, models: Path, **source: Any):
        self.name = name
        self.port = free_port()
        self.log_path = tmp / f"{name}.log"
        doc = {
            "name": "fleet",
            "sources": [
                {
                    "type": "mqtt",
                    "id": "stations",
                    "topic": f"{base}/frames/+",
                    "source_id": "{topic[2]}",
                    "stations": list(STATIONS),
                    "shared_group": "fleet",
                    "qos": 1,
                    "policy": "every_frame",
                    "queue_size": 4,
                    **source,
                }
            ],
            "batching": {"max_batch_size": 4, "max_wait_ms": 5},
            "workflow": workflow_v4(),
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
            },
            "sinks": [{"type": "mqtt"}],
            "http": {"host": "127.0.0.1", "port": self.port},
            "model": {"models_dir": str(models), "intra_op_threads": 1},
            "print_summary": False,
            "shutdown_grace_s": 20,
        }
        self.path = tmp / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(doc))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, worker_id: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("SEGSTREAM_WORKER_ID", None)
        env.pop("POD_NAME", None)
        if worker_id is not None:
            env["SEGSTREAM_WORKER_ID"] = worker_id
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", str(self.path)],
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
            )

    def subscribed(self, reconnected: bool = False) -> bool:
        """``/metrics`` answers and the frames source is subscribed (``reconnected``: again, after it
        lost the broker)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            status, text = http_get(self.port, "/metrics", timeout=1.0)
        except OSError:
            return False
        counted = 'segstream_reconnects_total{target="broker:source"}'
        if reconnected and (counted not in text or f"{counted} 0.0" in text):
            return False
        return status == 200 and 'segstream_source_connected{source="stations"} 1.0' in text

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def fleet(
    tmp: Path, broker: MosquittoBroker, base: str, count: int, slow_channels: int = 0, **source: Any
) -> Iterator[list[WorkerProcess]]:
    models = make_models_dir(tmp / "models", slow_channels=slow_channels)
    workers = [WorkerProcess(tmp, f"w{i}", broker, base, models, **source) for i in range(count)]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.kill()


async def start_all(workers: list[WorkerProcess], ids: list[str | None] | None = None) -> None:
    for worker, worker_id in zip(workers, ids or [None] * len(workers), strict=True):
        worker.start(worker_id)
    await wait_until(lambda: all(w.subscribed() for w in workers), "every worker subscribed", timeout=90)


class Camera:
    """Publishes frame ``n`` of station ``STATIONS[n % 3]`` at QoS 1 (reconnects when the broker goes)."""

    def __init__(self, broker: BrokerConfig, base: str) -> None:
        self.broker = broker
        self.base = base
        self.sent: dict[str, str] = {}  # frame id -> station

    @staticmethod
    def frame_id(n: int) -> str:
        return f"f{n:04d}"

    async def send(self, numbers: range, delay: float = 0.0) -> None:
        pending = list(numbers)
        while pending:
            try:
                async with make_client(self.broker, identifier=f"camera-{uuid.uuid4().hex[:6]}") as client:
                    while pending:
                        n = pending[0]
                        station = STATIONS[n % len(STATIONS)]
                        payload = frame_json(jpeg_bytes(n, size=(48, 64)), self.frame_id(n))
                        await client.publish(f"{self.base}/frames/{station}", payload, qos=1, timeout=5)
                        self.sent[self.frame_id(n)] = station
                        pending.pop(0)
                        if delay:
                            await asyncio.sleep(delay)
            except Exception:  # the broker is restarting: publish the rest once it is back
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def collecting(broker: BrokerConfig) -> AsyncIterator[Collector]:
    async with Collector(
        broker, "segstream/fleet/+/predictions", identifier=f"results-{uuid.uuid4().hex[:6]}"
    ) as c:
        yield c


def results_by_frame(collector: Collector) -> Counter[str]:
    return Counter(m.json()["frame_id"] for m in collector.messages)


def check_results(collector: Collector, camera: Camera, base: str) -> None:
    """Every result names its station (``source``), its topic and its idempotency key."""
    for message in collector.messages:
        doc = message.json()
        station = camera.sent[doc["frame_id"]]
        assert doc["source"] == station, doc
        assert message.topic == f"segstream/fleet/{station}/predictions"
        assert doc["topic"] == f"{base}/frames/{station}"
        assert doc["idempotency_key"] == f"{station}/{doc['frame_id']}"


def kicked(broker: MosquittoBroker) -> list[str]:
    """mosquitto's log lines of a client taken over by another connection with its id."""
    return [line for line in broker.log_path.read_text().splitlines() if "already connected" in line]


async def retained_statuses(broker: BrokerConfig) -> dict[str, dict[str, Any]]:
    """The pool as a consumer sees it: ``segstream/fleet/status/+`` (retained, one per worker)."""
    async with Collector(
        broker, "segstream/fleet/status/+", identifier=f"pool-{uuid.uuid4().hex[:6]}", persistent=False
    ) as seen:
        await asyncio.sleep(0.5)  # retained messages arrive right after the SUBACK
    return {m.json()["worker"]: m.json() for m in seen.messages}


async def test_a_three_default_workers_share_the_stations_exactly_once(
    tmp_path: Path, mosquitto: MosquittoBroker, broker_config: BrokerConfig
) -> None:
    base = f"fa{uuid.uuid4().hex[:6]}"
    count = 60
    with fleet(tmp_path, mosquitto, base, 3) as workers:
        await start_all(workers)
        async with collecting(broker_config) as results:
            camera = Camera(broker_config, base)
            await camera.send(range(count))
            await wait_until(lambda: len(results.messages) >= count, f"{count} results", timeout=90)
            await asyncio.sleep(0.5)  # a duplicate would come right behind
        pool = await retained_statuses(broker_config)
    ids = results_by_frame(results)
    assert sorted(ids) == sorted(camera.sent) and set(ids.values()) == {1}, ids
    check_results(results, camera, base)
    assert {camera.sent[i] for i in ids} == set(STATIONS)
    assert not kicked(mosquitto), kicked(mosquitto)
    online = [w for w, s in pool.items() if s["status"] == "online"]
    assert len(online) >= 3, pool  # three distinct worker ids, each with its own retained status


async def test_b_sigterm_mid_stream_leaves_nothing_queued_for_the_stopped_worker(
    tmp_path: Path, mosquitto: MosquittoBroker, broker_config: BrokerConfig
) -> None:
    base = f"fb{uuid.uuid4().hex[:6]}"
    with fleet(tmp_path, mosquitto, base, 2) as workers:
        await start_all(workers, ["fleet-b-stop", "fleet-b-stay"])
        stopping = workers[0]
        async with collecting(broker_config) as results:
            camera = Camera(broker_config, base)
            stream = asyncio.create_task(camera.send(range(40), delay=0.02))
            await wait_until(lambda: len(results.messages) >= 10, "the first results", timeout=60)
            stopping.signal(signal.SIGTERM)  # mid-stream
            assert await asyncio.to_thread(stopping.wait) == 0, stopping.log()
            await stream
            # every frame published after the stop goes to the worker that stays
            await camera.send(range(40, 70))
            await wait_until(
                lambda: set(results_by_frame(results)) >= set(camera.sent), "every result", timeout=90
            )
            await asyncio.sleep(0.5)
        pool = await retained_statuses(broker_config)
    ids = results_by_frame(results)
    assert sorted(ids) == sorted(camera.sent) and set(ids.values()) == {1}, ids
    check_results(results, camera, base)
    assert pool["fleet-b-stop"]["status"] == "offline" and pool["fleet-b-stop"]["reason"] == "shutdown"
    assert pool["fleet-b-stay"]["status"] == "online"
    assert "session ended (expiry 0)" in stopping.log()


async def test_c_sigkill_and_restart_with_the_same_id_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, broker_config: BrokerConfig
) -> None:
    base = f"fc{uuid.uuid4().hex[:6]}"
    # a model as slow as a real one on a CPU: frames wait in the victim's queue when it is killed
    with fleet(tmp_path, mosquitto, base, 2, slow_channels=256) as workers:
        # stable ids (a StatefulSet's pod names): a persistent session (600 s by default)
        await start_all(workers, ["fleet-c-0", "fleet-c-1"])
        victim = workers[0]
        async with collecting(broker_config) as results:
            camera = Camera(broker_config, base)
            stream = asyncio.create_task(camera.send(range(40), delay=0.02))
            await wait_until(lambda: len(results.messages) >= 10, "the first results", timeout=60)
            victim.kill()  # SIGKILL mid-stream: frames queued and in inference are unacknowledged
            sent_before_kill = set(camera.sent)
            answered_before_kill = set(results_by_frame(results))
            await stream
            victim.start("fleet-c-0")  # same id: resumes its session, gets its unfinished frames
            await wait_until(victim.subscribed, "the restarted worker subscribed", timeout=90)
            await camera.send(range(40, 60))
            await wait_until(
                lambda: set(results_by_frame(results)) >= set(camera.sent), "every result", timeout=90
            )
            await asyncio.sleep(1.0)
    ids = results_by_frame(results)
    assert set(ids) == set(camera.sent)
    check_results(results, camera, base)
    duplicates = sorted(i for i, n in ids.items() if n > 1)
    # only frames the killed worker had taken could come twice: sent before the kill
    assert set(duplicates) <= sent_before_kill, duplicates
    print(
        f"SIGKILL: {len(camera.sent)} frames, {len(answered_before_kill)} answered before the kill, "
        f"{len(duplicates)} duplicated (in flight at the kill): {duplicates}"
    )


async def test_d_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = PersistentMosquitto(tmp_path / "broker")
    broker.start()
    config = broker.config()
    base = f"fd{uuid.uuid4().hex[:6]}"
    try:
        with fleet(tmp_path, broker, base, 2) as workers:
            await start_all(workers, ["fleet-d-0", "fleet-d-1"])
            async with collecting(config) as results:
                camera = Camera(config, base)
                await camera.send(range(30), delay=0.01)
                await wait_until(lambda: len(results.messages) >= 5, "the first results", timeout=60)
                await asyncio.to_thread(broker.restart)  # mid-stream: frames queued and in flight
                # mosquitto 2.0.11 drops what is published to a shared subscription it restored from
                # its store before a member has reconnected (seen here: every such frame lost), so
                # the line goes on once the workers are back
                await wait_until(
                    lambda: all(w.subscribed(reconnected=True) for w in workers), "back", timeout=60
                )
                await camera.send(range(30, 60))
                try:
                    await wait_until(
                        lambda: set(results_by_frame(results)) >= set(camera.sent),
                        "every result",
                        timeout=120,
                    )
                except AssertionError:
                    missing = sorted(set(camera.sent) - set(results_by_frame(results)))
                    logs = "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in workers)
                    raise AssertionError(f"no result for {missing}\n{logs}") from None
                await asyncio.sleep(0.5)
        ids = results_by_frame(results)
        assert set(ids) == set(camera.sent)
        check_results(results, camera, base)
        print(f"broker restart: {len(ids)} frames, {sum(n > 1 for n in ids.values())} with duplicates")
    finally:
        broker.stop()


def test_status_topic_default_is_per_worker() -> None:
    from worker.sinks.mqtt import MqttSinkConfig

    assert MqttSinkConfig().status_topic == "segstream/{pipeline}/status/{worker}"
