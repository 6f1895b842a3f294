"""npuctl: inspect and administer npud, in the spirit of nvidia-smi.

Exit codes: 0 ok; 1 the daemon answered with an error, or is not running
(one line naming the endpoint tried); 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

import npu

from . import render


def _common(defaults: bool) -> argparse.ArgumentParser:
    # Options may come before or after the command; the command's copy must not
    # overwrite a value given before it, so only the top level has defaults.
    common = argparse.ArgumentParser(add_help=False, argument_default=None if defaults else argparse.SUPPRESS)
    common.add_argument("--endpoint", help="daemon endpoint (default: $NPUD_ENDPOINT, "
                                           "else ipc://$XDG_RUNTIME_DIR/npud/npud.sock, "
                                           "else ipc:///tmp/npud-$UID/npud.sock)")
    common.add_argument("--json", action="store_true", help="machine-readable output, same fields",
                        **({"default": False} if defaults else {}))
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npuctl", parents=[_common(True)],
                                     description="Inspect and administer npud.")
    common = _common(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="daemon, devices and processes (default)")
    sub.add_parser("devices", parents=[common], help="devices with their architecture parameters")
    sub.add_parser("clients", parents=[common], help="connected processes")
    return parser


def _run(args: argparse.Namespace) -> dict | list:
    with npu.connect(args.endpoint, name="npuctl", timeout=10.0) as client:
        if args.command == "devices":
            return client._request("devices", {})["devices"]
        if args.command == "clients":
            return [c for c in client.clients() if c["session"] != client.session]
        status = client.status()
        status["clients"] = [c for c in status["clients"] if c["session"] != client.session]
        return status


def _text(command: str, data) -> str:
    if command == "devices":
        return render.devices_table(data) + "\n\n" + "\n\n".join(render.device_params(d) for d in data)
    if command == "clients":
        return render.clients_table(data)
    return render.status(data)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.command = args.command or "status"
    try:
        data = _run(args)
    except npu.NpuError as exc:
        print(f"npuctl: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else _text(args.command, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
