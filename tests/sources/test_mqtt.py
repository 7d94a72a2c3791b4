"""MqttSource against a real mosquitto: payload shapes, bad payloads, shared subscriptions, flow
control under a slow consumer, broker restarts and persistent sessions."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from tests.sources.conftest import ErrorSink, running
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.mqtt import make_client
from worker.queues import FrameQueue
from worker.sources.mqtt import RESYNC_TARGET, MqttSource, MqttSourceConfig
from worker.telemetry import RecordingTelemetry

pytestmark = pytest.mark.integration


def image(level: int, h: int = 24, w: int = 32) -> np.ndarray:
    img = np.full((h, w, 3), level, np.uint8)
    img[: h // 2, :, 2] = 255 - level  # not grey: channel order is checked
    return img


def encode(img: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def make_source(
    mosquitto: MosquittoBroker,
    topic: str,
    telemetry: RecordingTelemetry,
    errors: ErrorSink | None = None,
    **kw: object,
) -> MqttSource:
    cfg = MqttSourceConfig.model_validate({"id": "line", "topic": topic, **kw})
    return MqttSource(cfg, mosquitto.config(), telemetry=telemetry, on_error=errors, pipeline="p")


async def publish(mosquitto: MosquittoBroker, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    async with make_client(mosquitto.config(), identifier=f"pub-{os.getpid()}") as pub:
        for payload in payloads:
            await pub.publish(topic, payload, qos=qos)


async def test_raw_jpeg_png_and_json_frames(mosquitto: MosquittoBroker, unique_topic: str) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry)
    queue = FrameQueue("line", 8, "every_frame")
    json_img = image(90)
    payloads = [
        encode(image(40)),
        encode(image(60), ".png"),
        json.dumps(
            {
                "image": base64.b64encode(encode(json_img, ".png")).decode(),
                "frame_id": "press-7/000123",
                "timestamp": 1732790000.25,
                "parameters": {"confidence": 0.55, "classes": ["bolt"]},
                "extra_field": "ignored",
            }
        ).encode(),
        json.dumps(
            {
                "image": "data:image/jpeg;base64," + base64.b64encode(encode(image(120))).decode(),
                "frame_id": 9,
            }
        ).encode(),
    ]
    async with running(source, queue) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, payloads)
        await wait_until(lambda: len(consumer.frames) == 4, what="4 frames")
    jpeg, png, js, data_url = consumer.frames
    assert [f.frame_number for f in consumer.frames] == [0, 1, 2, 3]
    assert jpeg.frame_id == "line:0" and jpeg.parameters == {}
    assert np.abs(jpeg.image.astype(int) - image(40)).mean() < 3  # lossy (chroma at the edge)
    np.testing.assert_array_equal(png.image, image(60))  # lossless, BGR order kept
    np.testing.assert_array_equal(js.image, json_img)
    assert js.frame_id == "press-7/000123" and js.timestamp == 1732790000.25
    assert js.parameters == {"confidence": 0.55, "classes": ["bolt"]}
    assert data_url.frame_id == "9" and data_url.image.shape == (24, 32, 3)
    assert telemetry.received["line"] == 4 and not telemetry.dropped
    assert queue.closed


GOOD = encode(image(50))


@pytest.mark.parametrize(
    ("payload", "reason", "words"),
    [
        (GOOD[: len(GOOD) // 2], "decode_error", "truncated JPEG"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "decode_error", "corrupt JPEG"),
        (b"\x00" + np.random.default_rng(7).bytes(3000), "decode_error", "not a JPEG or PNG"),
        (b"\x07" * 5000, "oversize", "max_payload_bytes=4096"),
        (png_claiming(30000, 30000), "oversize", "900000000 pixels"),
        (b'{"image": "abc', "decode_error", "bad JSON"),
        (b'{"image": "@@not base64@@"}', "decode_error", "base64"),
        (b'{"frame_id": "x"}', "decode_error", "no 'image'"),
        (
            json.dumps({"image": base64.b64encode(GOOD).decode(), "parameters": [1]}).encode(),
            "decode_error",
            "object",
        ),
    ],
    ids=[
        "truncated-jpeg",
        "corrupt-jpeg",
        "random",
        "oversize-bytes",
        "pixel-bomb",
        "bad-json",
        "bad-b64",
        "no-image",
        "bad-parameters",
    ],
)
async def test_a_bad_payload_gives_one_error_report_and_the_next_frame_flows(
    mosquitto: MosquittoBroker, unique_topic: str, errors: ErrorSink, payload: bytes, reason: str, words: str
) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry, errors, max_payload_bytes=4096, max_image_pixels=10**6)
    queue = FrameQueue("line", 4, "every_frame")
    async with running(source, queue) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, [payload, GOOD])
        await wait_until(lambda: len(consumer.frames) == 1, what="the good frame")
    assert len(errors.reports) == 1
    report = errors.reports[0]
    assert (report.reason, report.source_id, report.pipeline, report.frame_number) == (reason, "line", "p", 0)
    assert words in report.message and topic in report.message
    assert consumer.frames[0].frame_number == 1
    assert telemetry.dropped == {("line", reason): 1}


async def test_shared_subscription_splits_frames_without_loss_or_duplicates(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    sources, queues = [], []
    for n in (1, 2):
        cfg = MqttSourceConfig(id=f"w{n}", topic=topic, shared_group="seg", client_id=f"worker-{n}")
        sources.append(MqttSource(cfg, mosquitto.config(), telemetry=telemetry))
        queues.append(FrameQueue(f"w{n}", 64, "every_frame"))
    payload = encode(image(10), ".png")
    frames = [
        json.dumps({"image": base64.b64encode(payload).decode(), "frame_id": f"f{i}"}).encode()
        for i in range(40)
    ]
    async with running(sources[0], queues[0]) as c1, running(sources[1], queues[1]) as c2:
        await wait_until(
            lambda: telemetry.connected.get("w1") is True and telemetry.connected.get("w2") is True
        )
        await publish(mosquitto, topic, frames)
        await wait_until(lambda: len(c1.frames) + len(c2.frames) >= 40, what="all frames")
    ids = [f.frame_id for f in c1.frames + c2.frames]
    assert sorted(ids) == sorted(f"f{i}" for i in range(40))  # none lost, none twice
    assert c1.frames and c2.frames  # both workers took a share


async def test_every_frame_under_a_slow_consumer_loses_nothing(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    # Receive Maximum 4 asks the broker for at most 4 unacknowledged frames; mosquitto 2.0.11 sends many
    # more, so the incoming queue (2 x 4) would overflow: the source stops reading the socket at 4
    # queued messages instead, and the broker keeps the rest in the session
    source = make_source(mosquitto, topic, telemetry, receive_maximum=4)
    queue = FrameQueue("line", 2, "every_frame", telemetry)
    payload = encode(image(10), ".png")
    n = 150
    frames = [
        json.dumps({"image": base64.b64encode(payload).decode(), "frame_id": i}).encode() for i in range(n)
    ]
    async with running(source, queue, delay=0.003) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, frames)
        await wait_until(lambda: len(consumer.frames) == n, what="every frame", timeout=60)
        await asyncio.sleep(0.3)  # a late redelivery would show up now
    assert [f.frame_id for f in consumer.frames] == [str(i) for i in range(n)]  # in order, none twice
    # the broker may resend frames whose PUBACK it had not taken in before a resync: skipped, counted
    assert set(telemetry.dropped) <= {("line", "mqtt_duplicate")}
    assert consumer.max_depth <= 2
    # back-pressure by not reading the socket: no resync (reconnect) was needed, the broker never went away
    assert source.read_pauses >= 1
    assert telemetry.reconnects["broker:source"] == 0 and telemetry.reconnects[RESYNC_TARGET] == 0


async def test_when_the_incoming_queue_overflows_anyway_a_resync_is_counted_apart_and_loses_nothing(
    mosquitto: MosquittoBroker, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.sources.mqtt as mqtt_source

    # without the read pause (as with a client that cannot pause), the broker overfills the queue
    monkeypatch.setattr(mqtt_source._ReadPause, "pause", lambda self: None)
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry, receive_maximum=4)
    queue = FrameQueue("line", 2, "every_frame", telemetry)
    payload = encode(image(10), ".png")
    n = 150
    frames = [
        json.dumps({"image": base64.b64encode(payload).decode(), "frame_id": i}).encode() for i in range(n)
    ]
    async with running(source, queue, delay=0.003) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, frames)
        await wait_until(lambda: len(consumer.frames) == n, what="every frame", timeout=60)
    assert [f.frame_id for f in consumer.frames] == [str(i) for i in range(n)]  # in order, none twice
    assert set(telemetry.dropped) <= {("line", "mqtt_duplicate")}
    # resyncs are counted apart from broker reconnects: dashboards of broker health stay quiet
    assert telemetry.reconnects[RESYNC_TARGET] >= 1 and telemetry.reconnects["broker:source"] == 0


async def test_broker_restart_reconnects_and_frames_flow_again(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry)
    queue = FrameQueue("line", 4, "every_frame")
    async with running(source, queue) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, [GOOD])
        await wait_until(lambda: len(consumer.frames) == 1)
        mosquitto.stop()
        await wait_until(lambda: telemetry.connected.get("line") is False, what="disconnect noticed")
        await wait_until(lambda: telemetry.reconnects["broker:source"] >= 2, what="retries while down")
        mosquitto.start()  # same port; no persistence: the session is gone, the source subscribes again
        await wait_until(lambda: telemetry.connected.get("line") is True, what="reconnected")
        await publish(mosquitto, topic, [GOOD])
        await wait_until(lambda: len(consumer.frames) == 2, what="a frame after the restart")
    assert [f.frame_number for f in consumer.frames] == [0, 1]


async def test_persistent_session_gets_frames_published_while_disconnected(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    topic = f"{unique_topic}/frames"
    telemetry = RecordingTelemetry()
    first = make_source(mosquitto, topic, telemetry, client_id="line-worker")
    async with running(first, FrameQueue("line", 4, "every_frame")):
        await wait_until(lambda: telemetry.connected.get("line") is True, what="first session")
    # the worker is away: QoS 1 frames wait in its session on the broker
    payload = encode(image(10), ".png")
    await publish(
        mosquitto,
        topic,
        [json.dumps({"image": base64.b64encode(payload).decode(), "frame_id": i}).encode() for i in range(5)],
    )
    telemetry = RecordingTelemetry()
    second = make_source(mosquitto, topic, telemetry, client_id="line-worker")
    async with running(second, FrameQueue("line", 8, "every_frame")) as consumer:
        await wait_until(lambda: len(consumer.frames) == 5, what="frames kept by the session")
    assert [f.frame_id for f in consumer.frames] == ["0", "1", "2", "3", "4"]


async def test_unacknowledged_frames_come_back_after_a_stop_under_backpressure(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    """Frames the worker took from the broker but never answered (queued or not) are not lost when it
    stops: a frame is acknowledged only once its outcome was delivered (``Frame.ack``)."""
    topic = f"{unique_topic}/frames"
    payload = encode(image(10), ".png")
    frames = [
        json.dumps({"image": base64.b64encode(payload).decode(), "frame_id": i}).encode() for i in range(12)
    ]
    telemetry = RecordingTelemetry()
    first = make_source(mosquitto, topic, telemetry, client_id="bp-worker", receive_maximum=3)
    first.drain_timeout_s = 0.5  # nobody answers the queued frames: do not wait for them long
    queue = FrameQueue("line", 2, "every_frame")  # nobody consumes it
    task = asyncio.create_task(first.run(queue))
    await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
    await publish(mosquitto, topic, frames)
    await wait_until(lambda: len(queue) == 2, what="queue full")
    await first.stop()
    await asyncio.wait_for(task, 10)
    taken = [queue.get_nowait() for _ in range(2)]
    second = make_source(mosquitto, topic, RecordingTelemetry(), client_id="bp-worker")
    async with running(second, FrameQueue("line", 16, "every_frame")) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 12, what="all of them")
    assert [f.frame_id for f in taken if f] == ["0", "1"]
    # the two queued but never answered come back too, and each frame once
    assert sorted(f.frame_id for f in consumer.frames) == sorted(str(i) for i in range(12))


def test_recent_messages_know_a_redelivery_by_packet_id_length_and_digest() -> None:
    from types import SimpleNamespace

    from worker.sources.mqtt import _digest, _RecentMessages

    def key(qos: int, mid: int, payload: bytes) -> tuple[int, int] | None:
        return _RecentMessages.key(SimpleNamespace(qos=qos, mid=mid), payload)  # type: ignore[arg-type]

    recent = _RecentMessages(2)
    first = key(1, 7, b"frame-a")
    assert first == (7, 7) and recent.candidate(first) is None
    recent.add(first, _digest(b"frame-a"), None)
    # only a message with the same id and length is a candidate, and only then is it hashed
    assert recent.candidate(key(1, 7, b"frame-a")) == (_digest(b"frame-a"), None)
    assert recent.candidate(key(1, 7, b"frame-b")) != (_digest(b"frame-b"), None)  # id reused, other bytes
    assert recent.candidate(key(1, 8, b"frame-a")) is None  # same bytes, another id
    assert recent.candidate(key(1, 7, b"frame-aa")) is None  # same id, another length
    assert key(0, 0, b"frame-a") is None  # QoS 0: never resent
    recent.add(None, b"", None)
    for mid in (8, 9):
        recent.add(key(1, mid, b"x"), _digest(b"x"), None)
    assert recent.candidate(first) is None  # bounded: the oldest is forgotten
    recent.clear()
    assert recent.candidate(key(1, 9, b"x")) is None


def test_config_bounds() -> None:
    with pytest.raises(ValidationError, match="max_payload_bytes"):
        MqttSourceConfig(id="m", topic="t", max_payload_bytes=10**10)
    with pytest.raises(ValidationError, match="shared_group"):
        MqttSourceConfig(id="m", topic="t", shared_group="a/b")
    with pytest.raises(ValidationError, match="topic"):
        MqttSourceConfig(id="m", topic="$share/g/t")
    assert MqttSourceConfig(id="m", topic="a/#", shared_group="g").subscription == "$share/g/a/#"


async def test_payload_digests_are_computed_off_the_event_loop(
    mosquitto: MosquittoBroker, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import worker.sources.mqtt as mqtt_source

    threads: list[str] = []
    real = mqtt_source._digest

    def recording(payload: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return real(payload)

    monkeypatch.setattr(mqtt_source, "_digest", recording)
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry)
    async with running(source, FrameQueue("line", 8, "every_frame")) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, [encode(image(n)) for n in range(5)] + [b"not an image"])
        await wait_until(lambda: len(consumer.frames) == 5 and len(threads) == 6, what="5 frames, 6 digests")
    assert threading.main_thread().name not in threads
    assert all(name.startswith("source[line].decode") for name in threads), threads


async def test_decoded_images_alive_in_the_worker_stay_within_the_inflight_budget(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    # 24x32 BGR = 2304 bytes per image; room for one more 4096-byte image only while <= 4096 are held
    source = make_source(mosquitto, topic, telemetry, max_decoded_bytes=4096, max_inflight_bytes=8192)
    queue = FrameQueue("line", 64, "every_frame")
    async with running(source, queue) as consumer:
        await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
        await publish(mosquitto, topic, [encode(image(n), ".png") for n in range(6)])
        budget = source._budget
        assert budget is not None
        # the consumer keeps every frame it took: the source stops decoding at the budget
        await wait_until(lambda: len(consumer.frames) == 2 and budget.waiting, what="the budget to be full")
        assert source.inflight_bytes == 2 * 2304 and len(queue) == 0
        taken = 2
        while taken < 6:  # frames the rest of the worker lets go free the budget
            consumer.frames.clear()
            await wait_until(lambda: len(consumer.frames) > 0, what="the next frames")
            assert source.inflight_bytes <= 8192
            taken += len(consumer.frames)
        assert taken == 6
        consumer.frames.clear()
        await wait_until(lambda: source.inflight_bytes == 0, what="every image freed")
    assert telemetry.received["line"] == 6 and not telemetry.dropped


def test_inflight_budget_must_hold_two_images() -> None:
    with pytest.raises(ValidationError, match="at least 2 x max_decoded_bytes"):
        MqttSourceConfig(id="m", topic="t", max_decoded_bytes=10**6, max_inflight_bytes=10**6)


async def test_an_unexpected_exception_on_one_message_is_reported_and_the_source_goes_on(
    mosquitto: MosquittoBroker,
    unique_topic: str,
    errors: ErrorSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import worker.sources.mqtt as mqtt_source

    real = mqtt_source.decode_payload

    def buggy(payload: bytes, **limits: int) -> object:
        if payload.startswith(b"BUG"):
            raise KeyError("a bug in the decoder")  # not a FrameDecodeError: a bug
        return real(payload, **limits)

    monkeypatch.setattr(mqtt_source, "decode_payload", buggy)
    telemetry = RecordingTelemetry()
    topic = f"{unique_topic}/frames"
    source = make_source(mosquitto, topic, telemetry, errors)
    with caplog.at_level("ERROR", logger="worker.sources.mqtt"):
        async with running(source, FrameQueue("line", 8, "every_frame")) as consumer:
            await wait_until(lambda: telemetry.connected.get("line") is True, what="subscribed")
            await publish(mosquitto, topic, [b"BUG-1", GOOD, b"BUG-2", GOOD])
            await wait_until(lambda: len(consumer.frames) == 2 and len(errors.reports) == 2, what="all four")
    assert errors.reasons() == ["internal_error", "internal_error"]
    assert [r.frame_number for r in errors.reports] == [0, 2]
    assert [f.frame_number for f in consumer.frames] == [1, 3]
    logged = [r for r in caplog.records if r.name == "worker.sources.mqtt" and r.levelname == "ERROR"]
    assert (
        len(logged) == 2 and logged[0].exc_info is not None and logged[1].exc_info is None
    )  # traceback once
    assert telemetry.dropped == {("line", "internal_error"): 2}
