#!/usr/bin/env python3
"""Runs the README's shell blocks in order, verbatim, as a newcomer would.

Every ```sh block of README.md runs in bash with what the blocks before it
exported (as in one terminal), each command echoed, stopping at the first
command that fails. A block is marked by an HTML comment on
the line before it:

- `<!-- readme: background [URL] -->`: started in the background, as in
  another terminal (an agent); the next block runs once it answers on URL
  (http://127.0.0.1:9090/ if none is given), and it is stopped with SIGTERM
  at the end, which must end it with exit code 0.
- `<!-- readme: skip REASON -->`: not run; the reason is printed.

Run from the repository root on a machine where nothing else uses
./nine9s-data or the ports 9090 and 50051 (a fresh clone in CI): it fails,
changing nothing, otherwise.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# The file to run: README.md, or the one given.
README = sys.argv[1] if len(sys.argv) > 1 else "README.md"
AGENT = "http://127.0.0.1:9090/"
# The background agent is built by `cargo run --release` first: minutes on
# a cold machine.
AGENT_START = 45 * 60
MARK = re.compile(r"<!--\s*readme:\s*(background|skip)\b\s*(.*?)\s*-->")


def blocks(text):
    """(mark, reason, lines of code) of every ```sh block, in order."""
    out, mark, reason, code = [], None, "", None
    for line in text.splitlines():
        if code is not None:
            if line.startswith("```"):
                out.append((mark, reason, code))
                mark, reason, code = None, "", None
            else:
                code.append(line)
            continue
        found = MARK.search(line)
        if found:
            mark, reason = found.group(1), found.group(2)
        elif line.strip() == "```sh":
            code = []
        elif line.strip():
            mark, reason = None, ""
    return out


def busy():
    """What already holds what the README's agent needs, if anything."""
    if os.path.exists("nine9s-data"):
        return "./nine9s-data exists: run this on a fresh clone"
    for port in (9090, 50051):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"127.0.0.1:{port} is in use"
    return None


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def main():
    with open(README, encoding="utf-8") as f:
        found = blocks(f.read())
    why = busy()
    if why:
        sys.exit(f"readme: {why}")
    # Each block runs in its own bash with what the blocks before it
    # exported (as in one terminal), its stdin empty.
    session = f"/tmp/readme-session-{os.getpid()}.sh"
    open(session, "w").close()
    background = []
    failed = None
    try:
        for n, (mark, reason, code) in enumerate(found, 1):
            first = code[0] if code else ""
            if mark == "skip":
                print(f"== readme block {n} skipped ({reason}): {first}", flush=True)
                continue
            script = "\n".join(code)
            if mark == "background":
                print(f"== readme block {n}, in the background: {first}", flush=True)
                log = f"/tmp/readme-block-{n}.log"
                process = subprocess.Popen(
                    ["bash", "-euo", "pipefail", "-c", f"source {session}\n{script}"],
                    stdin=subprocess.DEVNULL,
                    stdout=open(log, "w"),
                    stderr=subprocess.STDOUT,
                )
                background.append((n, process, log))
                url = reason or AGENT
                deadline = time.monotonic() + AGENT_START
                while not answers(url):
                    if process.poll() is not None or time.monotonic() > deadline:
                        failed = f"block {n} did not start serving {url}"
                        break
                    time.sleep(1)
                if failed:
                    break
                continue
            print(f"== readme block {n}: {first}", flush=True)
            wrapped = f"source {session}\nset -x\n{script}\nset +x\nexport -p > {session}\n"
            ran = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", wrapped], stdin=subprocess.DEVNULL
            )
            if ran.returncode != 0:
                failed = f"block {n} failed (exit {ran.returncode}) at the command above"
                break
    finally:
        for n, process, log in background:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    status = process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    status = "none within 60 s"
            else:
                status = f"{process.returncode}, by itself before the end"
            if status != 0 or failed:
                sys.stdout.write(open(log).read()[-4000:])
            if status != 0:
                failed = failed or f"block {n} stopped with exit code {status}, not 0"
        os.unlink(session)
    if failed:
        sys.exit(f"readme: {failed}")
    print(f"readme: {len(found)} blocks run as written")


if __name__ == "__main__":
    main()
