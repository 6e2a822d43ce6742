"""`duplexline dial sip:...`: ask a running bridge to place a call (POST /calls).

    duplexline dial sip:1000@pbx.example.com [--account NAME] [--server URL]
                    [--admin-token TOKEN] [--timeout SECONDS]

Prints one JSON line with the outcome (answered and its call id, busy, declined,
no_answer, failed, refused). Exit status: 0 answered, 1 not answered, 2 bad usage or the
bridge could not be reached. The token falls back to DUPLEXLINE_ADMIN_TOKEN, the server to
http://127.0.0.1:8080 (the serve command's default --http-listen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

__all__ = ["add_dial_parser", "run_dial", "main"]


def add_dial_parser(subparsers) -> argparse.ArgumentParser:
    dial = subparsers.add_parser("dial", help="place an outbound SIP call through a running bridge",
                                 description="Place a call through a running bridge; an agent session "
                                 "talks to whoever answers.")
    dial.add_argument("uri", metavar="URI", help="who to call, e.g. sip:1000@pbx.example.com")
    dial.add_argument("--account", help="the account to call through (default: the first in --sip-accounts)")
    dial.add_argument("--server", default="http://127.0.0.1:8080",
                      help="the bridge's HTTP address (default http://127.0.0.1:8080)")
    dial.add_argument("--admin-token", help="bearer token (default: $DUPLEXLINE_ADMIN_TOKEN)")
    dial.add_argument("--timeout", type=float, default=None, help="seconds to ring (default: the bridge's)")
    dial.set_defaults(func=run_dial)
    return dial


def run_dial(args: argparse.Namespace) -> int:
    if not args.uri.startswith(("sip:", "sips:")):
        print(f"duplexline dial: {args.uri!r} is not a SIP URI (sip:user@host)", file=sys.stderr)
        return 2
    body: dict = {"to": args.uri}
    if args.account:
        body["account"] = args.account
    if args.timeout is not None:
        body["timeout"] = args.timeout
    token = args.admin_token or os.environ.get("DUPLEXLINE_ADMIN_TOKEN")
    request = urllib.request.Request(args.server.rstrip("/") + "/calls", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    ring = args.timeout if args.timeout is not None else 300.0
    try:
        with urllib.request.urlopen(request, timeout=ring + 15) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        print(f"duplexline dial: cannot reach the bridge at {args.server}: {exc}", file=sys.stderr)
        return 2
    try:
        result = json.loads(raw or b"{}")
    except json.JSONDecodeError:
        result = {"error": raw.decode(errors="replace")}
    result.setdefault("http_status", status)
    print(json.dumps(result))
    if status == 401:
        print("duplexline dial: the bridge wants an admin token (--admin-token)", file=sys.stderr)
        return 2
    return 0 if status == 201 else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m bridge.sip.dial_cli URI ...`: the same command outside `duplexline`."""
    parser = argparse.ArgumentParser(prog="duplexline")
    add_dial_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dial", *(sys.argv[1:] if argv is None else argv)])
    return run_dial(args)


if __name__ == "__main__":
    sys.exit(main())
