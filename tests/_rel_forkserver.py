"""A fork server for tests/test_reliability.py: pay for `import torch` once, then run each
CLI command in a forked child that can be signalled or SIGKILLed at a chosen moment.

A fresh `python -m functrain` costs ~5 s before it trains; a fork costs milliseconds, so the
kill test can afford dozens of real process deaths. The child is a real process: SIGKILL
ends it between any two instructions, with its files as the kernel left them.

Protocol: one JSON request per stdin line, one JSON reply per stdout line.
  request: {"argv": [...], "env": {...}, "log": PATH, "timeout": S,
            "actions": [["sleep", S] | ["until", PATH, TEXT] | ["signal", "SIGTERM"], ...]}
  reply:   {"code": exit status, or -N if killed by signal N, "seconds": S, "acted": K}
Actions run in order while the child lives ("until" waits for TEXT to appear in PATH);
`acted` says how many ran before the child exited.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch

import functrain.cli

_POLL = 0.002


def _child(argv: list[str], env: dict, log: str) -> None:
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(env)
        code = functrain.cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reaped(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def _ready(action: list, t0: float) -> bool:
    if action[0] == "sleep":
        return time.monotonic() - t0 >= action[1]
    if action[0] == "until":
        try:
            with open(action[1], "rb") as f:
                return action[2].encode() in f.read()
        except FileNotFoundError:
            return False
    return True


def run(argv: list[str], env: dict, log: str, timeout: float, actions: list) -> dict:
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(argv, env, log)
    acted, since = 0, t0
    while (code := _reaped(pid)) is None:
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return {"code": code, "seconds": time.monotonic() - t0, "acted": acted, "timeout": 1}
        if acted < len(actions) and _ready(actions[acted], since):
            if actions[acted][0] == "signal":
                os.kill(pid, signal.Signals[actions[acted][1]])
            acted, since = acted + 1, time.monotonic()
            continue
        time.sleep(_POLL)
    return {"code": code, "seconds": time.monotonic() - t0, "acted": acted}


def main() -> None:
    torch.set_num_threads(1)  # children share a small CPU with the test and each other
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(**json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
