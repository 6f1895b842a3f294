"""``npud``: the daemon's command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import trio

from npud.ipc_schema.schema import PROTOCOL_VERSION
from npud.ipc_schema.version import distribution_version

from . import fds, log
from .config import LOG_FORMATS, LOG_LEVELS, ConfigError, device_arg, load, parse_devices
from .server import AlreadyRunning, Daemon


def build_parser() -> argparse.ArgumentParser:
    """npud's command line (also the source of its man page and completions: npud/manpages.py)."""
    parser = argparse.ArgumentParser(
        prog="npud", description="npud: the NPU daemon. Runs in the foreground until SIGTERM/SIGINT.")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--endpoint", help="ZeroMQ endpoint to serve (default: the config's, else "
                                           "$NPUD_ENDPOINT, else ipc://$XDG_RUNTIME_DIR/npud/npud.sock, "
                                           "else ipc:///tmp/npud-$UID/npud.sock: where clients look)")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="text (default; under systemd, the journal's native protocol with structured "
                             "fields) or json (one object per line: ts, level, logger, msg, context)")
    parser.add_argument("--cache-dir", metavar="DIR", help="compile cache directory")
    parser.add_argument("--device", metavar="[DRIVER:]PRESET", action="append",
                        help="create a device from this preset of npu-emu, a driver's first preset (`cpu`), or "
                             "DRIVER:PRESET (repeatable; replaces the config's devices)")
    parser.add_argument("--test-mode", action="store_true",
                        help="allow test-only fault injection (the inject_fault op); never in production")
    parser.add_argument("--policy", metavar="FILE", help="policy file (overrides the config's `policy`)")
    parser.add_argument("--generate-keys", metavar="DIR",
                        help="write a CURVE key pair (DIR/server.key, DIR/server.key_secret; see --key-name) "
                             "as zmq.auth certificates, then exit")
    parser.add_argument("--key-name", metavar="NAME", default="server",
                        help="file name of the pair --generate-keys writes (default: server)")
    parser.add_argument("--version", action="version",
                        version=f"npud {distribution_version()} (protocol {'.'.join(map(str, PROTOCOL_VERSION))})")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_keys:
        from .auth import generate_keys

        try:
            public_file, secret_file = generate_keys(args.generate_keys, args.key_name)
        except OSError as exc:
            print(f"npud: --generate-keys: {exc}", file=sys.stderr)
            return 2
        print(f"public key: {public_file}\nsecret key: {secret_file} (keep it private)")
        return 0
    try:
        config = load(args.config)
        if args.policy:
            config = dataclasses.replace(config, policy=args.policy)
        if args.device:
            config = dataclasses.replace(config, devices=parse_devices(
                [{"name": f"npu{i}", **device_arg(p)} for i, p in enumerate(args.device)]))
    except ConfigError as exc:
        print(f"npud: {exc}", file=sys.stderr)
        return 2
    if args.endpoint:
        config = dataclasses.replace(config, endpoint=args.endpoint)
    if args.log_level:
        config = dataclasses.replace(config, log_level=args.log_level)
    if args.log_format:
        config = dataclasses.replace(config, log_format=args.log_format)
    if args.cache_dir:
        config = dataclasses.replace(config, cache_dir=args.cache_dir)
    if args.test_mode:
        config = dataclasses.replace(config, test_mode=True)
    log.setup(config.log_level, fmt=config.log_format)
    fds.raise_soft_limit()        # buffers hold descriptors: see npud/fds.py
    try:
        daemon = Daemon(config)   # reads the policy file and the CURVE key: ConfigError names the key
    except ConfigError as exc:
        print(f"npud: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(daemon.serve)
    except AlreadyRunning as exc:
        logging.getLogger("npud").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
