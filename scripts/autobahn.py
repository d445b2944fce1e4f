#!/usr/bin/env python3
"""Helpers for scripts/autobahn.sh: run kosoku (the Autobahn TestSuite cases), drive a
client through kosoku's fuzzing server, and compare runs direct vs through wsgate.

    autobahn.py client  --url ws://127.0.0.1:P --cases '1.*,2.*' --out direct.json
    autobahn.py server  --port-file F --cases '1.*' --out server.json
    autobahn.py testee  --url ws://127.0.0.1:P --agent NAME
    autobahn.py compare --direct a.json --via b.json --title 'kosoku client -> backend'

Result files map a case id to its verdicts and the details needed to explain a
difference (close codes, what was expected, what was received, the end of the wire log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter, defaultdict

# A case passes when both verdicts are acceptable (kosoku's `CaseResult.passed`).
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}


def _short(value, limit=300):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def _result_dict(r) -> dict:
    d = {
        "id": r.case_id,
        "behavior": r.behavior.value,
        "behavior_close": r.behavior_close.value,
        "passed": bool(r.passed),
        "duration_ms": r.duration,
        "description": _short(r.description, 400),
        "expectation": _short(r.expectation, 400),
        "result": r.result,
        "result_close": r.result_close,
        "local_close_code": r.local_close_code,
        "local_close_reason": r.local_close_reason,
        "remote_close_code": r.remote_close_code,
        "remote_close_reason": r.remote_close_reason,
        "was_clean": r.was_clean,
        "was_not_clean_reason": r.was_not_clean_reason,
        "closed_by_me": r.closed_by_me,
        "dropped_by_me": r.dropped_by_me,
        "failed_by_me": r.failed_by_me,
        "was_close_handshake_timeout": r.was_close_handshake_timeout,
        "was_server_connection_drop_timeout": getattr(
            r, "was_server_connection_drop_timeout", None
        ),
        "expected": _short(r.expected),
        "expected_close": _short(r.expected_close),
        "received": _short(r.received),
        "http_response": _short(r.http_response, 600),
    }
    if not r.passed:
        try:
            d["wirelog_tail"] = [_short(e, 200) for e in list(r.wirelog)[-40:]]
        except Exception as e:  # the wire log is optional (off for huge payloads)
            d["wirelog_tail"] = [f"unavailable: {e}"]
    return d


def _dump(results, out: str) -> None:
    data = {r.case_id: _result_dict(r) for r in results}
    with open(out + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=repr)
    os.replace(out + ".tmp", out)
    c = Counter(category(d) for d in data.values())
    print(f"{len(data)} cases -> {out}: {dict(c)}", flush=True)


def _split(globs: str | None) -> list[str] | None:
    if not globs:
        return None
    return [g.strip() for g in globs.split(",") if g.strip()]


async def cmd_client(args) -> int:
    from kosoku import FailureError, run_fuzzingclient

    try:
        results = await run_fuzzingclient(
            args.url, _split(args.cases), _split(args.exclude), concurrency=args.parallelism
        )
    except FailureError as failure:
        results = failure.results
    _dump(results, args.out)
    return 0


async def cmd_server(args) -> int:
    from kosoku import FailureError, run_fuzzingserver

    async with run_fuzzingserver(
        _split(args.cases), _split(args.exclude), host="127.0.0.1", port=0
    ) as server:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{server.port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
        print(f"fuzzingserver on ws://127.0.0.1:{server.port}", flush=True)
        try:
            results = await server.get_result()
        except FailureError as failure:
            results = failure.results
    _dump(results, args.out)
    return 0


async def cmd_testee(args) -> int:
    """The Autobahn client protocol: /getCaseCount, /runCase?case=N (echo every
    message), /updateReports. The client is Python `websockets`."""
    from websockets.asyncio.client import connect

    opts = dict(
        max_size=None,
        max_queue=None,
        ping_interval=None,
        proxy=None,
        open_timeout=10,
        close_timeout=5,
        compression="deflate",
    )
    async with connect(f"{args.url}/getCaseCount", **opts) as ws:
        count = int(await ws.recv())
    print(f"testee: {count} cases", flush=True)

    async def one(n: int) -> None:
        try:
            async with connect(f"{args.url}/runCase?case={n}&agent={args.agent}", **opts) as ws:
                async for message in ws:
                    await ws.send(message)
        except Exception:
            # Cases end connections every way there is; the server judges them.
            pass

    for n in range(1, count + 1):
        try:
            await asyncio.wait_for(one(n), timeout=args.case_timeout)
        except asyncio.TimeoutError:
            print(f"testee: case {n} timed out", file=sys.stderr, flush=True)
    try:
        async with connect(f"{args.url}/updateReports?agent={args.agent}", **opts):
            pass
    except Exception:
        pass
    return 0


def category(d: dict) -> str:
    if d["behavior"] == "UNIMPLEMENTED":
        return "unimplemented"
    if d["passed"]:
        return "passed"
    return "failed"


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def cmd_compare(args) -> int:
    direct, via = _load(args.direct), _load(args.via)
    ids = sorted(set(direct) | set(via), key=_case_key)
    per_section: dict[str, dict[str, Counter]] = defaultdict(
        lambda: {"direct": Counter(), "wsgate": Counter()}
    )
    regressions, changes, missing = [], [], []
    for cid in ids:
        section = cid.split(".")[0]
        d, v = direct.get(cid), via.get(cid)
        if d:
            per_section[section]["direct"][category(d)] += 1
        if v:
            per_section[section]["wsgate"][category(v)] += 1
        if d and not v:
            missing.append(cid)
            if category(d) == "passed":
                regressions.append(cid)
            continue
        if not d or not v:
            continue
        if category(d) == "passed" and category(v) != "passed":
            regressions.append(cid)
        elif (d["behavior"], d["behavior_close"]) != (v["behavior"], v["behavior_close"]):
            changes.append(cid)

    print()
    print(f"== {args.title} ==")
    print(f"{'section':>7} | {'direct pass/fail/unimpl':>23} | {'wsgate pass/fail/unimpl':>23}")
    print(f"{'-' * 7}-+-{'-' * 23}-+-{'-' * 23}")
    totals = {"direct": Counter(), "wsgate": Counter()}
    for section in sorted(per_section, key=int):
        cells = []
        for who in ("direct", "wsgate"):
            c = per_section[section][who]
            totals[who].update(c)
            cells.append(f"{c['passed']}/{c['failed']}/{c['unimplemented']}")
        print(f"{section:>7} | {cells[0]:>23} | {cells[1]:>23}")
    cells = [
        f"{totals[w]['passed']}/{totals[w]['failed']}/{totals[w]['unimplemented']}"
        for w in ("direct", "wsgate")
    ]
    print(f"{'total':>7} | {cells[0]:>23} | {cells[1]:>23}")

    def show(cid: str) -> None:
        for who, data in (("direct", direct), ("wsgate", via)):
            r = data.get(cid)
            if r is None:
                print(f"    {who:6}: no result")
                continue
            print(
                f"    {who:6}: {r['behavior']} / {r['behavior_close']}; "
                f"codes local={r['local_close_code']} remote={r['remote_close_code']}; "
                f"clean={r['was_clean']} ({r['was_not_clean_reason']})"
            )
            if who == "wsgate":
                print(f"            result: {r['result']}")
                print(f"            close:  {r['result_close']}")

    if changes:
        print(f"\nverdicts that differ but still pass: {', '.join(changes)}")
        for cid in changes:
            print(f"  {cid}:")
            show(cid)
    if missing:
        print(f"\nno wsgate result for: {', '.join(missing)}")
    if regressions:
        print(f"\nREGRESSIONS (pass direct, not through wsgate): {', '.join(regressions)}")
        for cid in regressions:
            print(f"  {cid}: {direct[cid]['description'][:160]}")
            show(cid)
        return 1
    print("\nno regression: every case that passes direct passes through wsgate")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("client", help="kosoku fuzzingclient against a server")
    c.add_argument("--url", required=True)
    c.add_argument("--cases")
    c.add_argument("--exclude")
    c.add_argument("--parallelism", type=int, default=1)
    c.add_argument("--out", required=True)

    s = sub.add_parser("server", help="kosoku fuzzingserver on a free port")
    s.add_argument("--port-file", required=True)
    s.add_argument("--cases")
    s.add_argument("--exclude")
    s.add_argument("--out", required=True)

    t = sub.add_parser("testee", help="a websockets client driving a fuzzingserver")
    t.add_argument("--url", required=True)
    t.add_argument("--agent", default="websockets")
    t.add_argument("--case-timeout", type=float, default=60)

    m = sub.add_parser("compare", help="direct vs wsgate; exit 1 on a regression")
    m.add_argument("--direct", required=True)
    m.add_argument("--via", required=True)
    m.add_argument("--title", default="Autobahn")

    args = p.parse_args()
    if args.cmd == "compare":
        return cmd_compare(args)
    status = asyncio.run(
        {"client": cmd_client, "server": cmd_server, "testee": cmd_testee}[args.cmd](args)
    )
    if args.cmd in ("client", "server"):
        # kosoku's native runtime sometimes aborts while the interpreter tears down,
        # after the results are written: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
