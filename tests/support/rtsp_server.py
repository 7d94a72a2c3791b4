"""A real RTSP server for tests: GStreamer's gst-rtsp-server, run as its own process.

Run it with the *system* Python (the venv's Python cannot import Debian's ``gi``)::

    /usr/bin/python3 tests/support/rtsp_server.py --port 8554 --path /cam1
    /usr/bin/python3 tests/support/rtsp_server.py --port 8554 --path /clip --file worker/assets/demo_clip.mp4

Without ``--file`` the media is a live ``videotestsrc`` (a moving ball) encoded with
``x264enc tune=zerolatency``; with ``--file`` an MP4's video (H.264 or MPEG-4 Part 2) is demuxed and
re-packetized without re-encoding, so the server stays cheap on a small machine. It binds to
127.0.0.1 only, prints ``READY <url>`` on stdout once it listens, and exits cleanly on SIGTERM/SIGINT.
A test kills and restarts it on the same port to simulate a camera going away (see
``tests/support/rtsp.py``).
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def file_codec(path: str) -> str:
    """``"h264"`` or ``"mpeg4"`` from the MP4's sample entry (``avc1``/``avc3`` or ``mp4v``)."""
    with open(path, "rb") as fh:
        data = fh.read()
    at = data.find(b"stsd")
    # stsd: type, version+flags (4), entry count (4), then the first entry: size (4), format (4)
    fmt = data[at + 16 : at + 20] if at >= 0 else b""
    if fmt in (b"avc1", b"avc3"):
        return "h264"
    if fmt == b"mp4v":
        return "mpeg4"
    raise SystemExit(f"{path}: neither H.264 nor MPEG-4 Part 2 video (no re-encoding here)")


def launch_line(args: argparse.Namespace) -> str:
    """The gst-launch description of the served media (one RTP payloader named ``pay0``)."""
    if args.file:
        if file_codec(args.file) == "h264":
            parse_pay = "h264parse ! rtph264pay name=pay0 pt=96 config-interval=1"
        else:
            parse_pay = "mpeg4videoparse config-interval=-1 ! rtpmp4vpay name=pay0 pt=96 config-interval=1"
        return f'( filesrc location="{args.file}" ! qtdemux ! {parse_pay} )'
    return (
        f"( videotestsrc is-live=true pattern={args.pattern} "
        f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
        "! videoconvert "
        f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate=400 key-int-max={args.fps} "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cam", help="mount point, e.g. /cam1")
    parser.add_argument("--file", default=None, help="an H.264 MP4 to serve instead of videotestsrc")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--pattern", default="ball", help="videotestsrc pattern")
    args = parser.parse_args(argv)

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args))
    # one pipeline shared by every client: cheap, and every client sees the same live stream
    factory.set_shared(True)
    # TCP (interleaved) only: this is what segstream asks for, and it needs no UDP ports
    factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, loop.quit)
    print(f"READY rtsp://{args.host}:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
