#!/usr/bin/env python3
"""Where a storm upgrade's server CPU goes (issue 18; docs/benchmarks.md,
"Reconnect storms"). Attributes the samples of a `perf record` of the
server, in a time window, to upgrade-path categories: the innermost frame
that matches a category's pattern decides.

  perf record -F 15000 --call-graph dwarf,16384 -p SERVER_PID -o perf.data
  (run `loadgen storm` meanwhile; stop perf when the storm's line appears)
  tools/perf-upgrade-categories.py perf.data T0 T1 UPGRADES CPU_US

T0..T1: the storm (first sample .. last sample in the accept path, so the
connections' teardown after the storm is left out); UPGRADES and CPU_US
(server CPU per upgrade) scale the shares to microseconds."""
import re, subprocess, sys
from collections import Counter
data = sys.argv[1]; t0, t1 = map(float, sys.argv[2:4]); upgrades = int(sys.argv[4]); cpu_us = float(sys.argv[5])
CATS = [  # (category, regex on a frame symbol); innermost match wins
 ("101 + welcome write (sendmsg)", r"__libc_sendmsg|^sendmsg$|__send\b|__libc_send\b"),
 ("epoll registration (epoll_ctl)", r"epoll_ctl"),
 ("notify / wake accept task", r"Notify::notify|accept_wake"),
 ("descriptor dup", r"__GI___dup|__x64_sys_dup|^dup$"),
 ("glommio stream teardown (close, drop)", r"drop_in_place<glommio::net::tcp_socket::TcpStream>|__GI___close|__close$|__x64_sys_close"),
 ("glommio stream setup (fcntl, From<Socket>)", r"fcntl|GlommioStream.*From<socket2|set_nodelay|setsockopt|set_read_timeout|set_write_timeout"),
 ("key lookup (hash + index)", r"KeyIndex::authenticate|hash_key|check_key"),
 ("per-IP limiters", r"IpBuckets::take|AddressLimit::enter|Counted as core::ops::drop|http_connections"),
 ("head parse + validate", r"parse_head_with|validate_upgrade|accept_key|query_param|percent_decode"),
 ("welcome text + 101 (format)", r"format_inner|write_switching_protocols|core::fmt::write|text_frame"),
 ("registry add", r"Registry::add|set_session|set_deflate"),
 ("head read (recv)", r"__libc_recv|^recv$|recv_syscall|yolo_recv|GlommioStream.*poll_read|read_head"),
 ("accept (accept4)", r"yolo_accept|do_accept|__sys_accept|TcpListener::accept|accept4|accept_round"),
 ("task spawn (glommio)", r"LocalExecutor::spawn$|LocalExecutor::spawn\b|spawn_local"),
 ("allocations (malloc/free)", r"^_?mi_|mi_malloc|mi_free|__rust_alloc|__rust_dealloc|RawVec|alloc::raw_vec|_int_malloc|cfree|^malloc$|^free$"),
 ("io_uring submit/wait (glommio)", r"io_uring|Reactor::wait|park|io_cqring"),
 ("reactor epoll_wait", r"epoll_wait"),
 ("handoff/adopt (rest)", r"hand_off|public::adopt|reactor::adopt|credential_still_valid"),
 ("handshake task (rest)", r"public::handshake|authenticate|route|take_connection|upgrade_if_read|serve_parked|Parked::"),
]
CATS = [(n, re.compile(p)) for n, p in CATS]
out = subprocess.run(["perf", "script", "-i", data, "-F", "time,ip,sym"], capture_output=True, text=True).stdout
counts = Counter(); total = 0
stack = []; t = None
def flush():
    global total
    if t is None or not (t0 <= t <= t1):
        return
    total += 1
    for sym in stack:  # leaf first
        for name, rx in CATS:
            if rx.search(sym):
                counts[name] += 1
                return
    counts["other (kernel softirq, executor, ...)"] += 1
for line in out.splitlines():
    m = re.match(r"^\s*(\d+\.\d+):", line)
    if m:
        flush(); t = float(m.group(1)); stack = []
        continue
    parts = line.strip().split(None, 1)
    if len(parts) == 2:
        stack.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1]).strip())
flush()
print(f"samples {total}; {cpu_us:.1f} µs server CPU per upgrade over {upgrades} upgrades")
for name, n in counts.most_common():
    print(f"| {name} | {100*n/total:.1f}% | {cpu_us*n/total:.1f} |")
