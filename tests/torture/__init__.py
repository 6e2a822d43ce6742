"""The torture tier: the bridge under hostile and heavy traffic, seeded and scaled.

    make torture                      full counts (TORTURE_SCALE=full): 10,000 fuzzed UDP
                                      datagrams, 1,000 TCP messages, 2,000 idle TCP
                                      connections, 1,000 short calls, 400 hostile WebRTC
                                      offers, SIPVicious with a 10-minute svcrack budget
    make test / pytest tests/torture  the short counts (TORTURE_SCALE=short, the default)
    TORTURE_SEED=N                    a run's seed again (printed in the header and report;
                                      short runs default to a fixed one, full runs draw one)
    TORTURE_BISECT=1                  a short run also bisects a bad SIGTERM exit to its case
    TORTURE_TCP_IDLE_S=S              by when idle half-sent TCP connections must be closed
                                      (default 40)
    TORTURE_SIP_BACKEND=pjsua2        the bridges run the second SIP stack (--sip-backend)
    python -m tests.torture.replay    fuzz cases against a fresh bridge: one, a range, or a
                                      bisection (--help)

Modules: sip_fuzz (cases) and sip_mutations (what bends them), fuzz_client (sending them
as a user agent would, over UDP and TCP), offers (hostile WebRTC offers), sipvicious (the
attack tools), probe (what a process holds, from /proc), harness (the bridge under test,
the echo call, phases and the report), replay (the command line above).

Each phase runs on a fresh `duplexline serve --agent echo` inside a private network
namespace (root; `ip netns`), so nothing a mutated Via, Contact or SDP names can reach
past the machine, and ends with the same checks (tests/torture/harness.py): the process
is alive; fds, RTP ports, SIP TCP connections and live calls are back to the baseline
after a bounded settle; RSS grew less than a tolerance; a real call echoes a tone;
SIGTERM exits 0; the log holds no traceback, no control characters and no more lines
than the phase's budget. A markdown table of every phase is printed at the end of the
run (and written to out/torture-<scale>.md): messages tried, their answers by status
class (first final answer; "1xx": only provisional ones), no answer at all, datagrams the
kernel dropped at the bridge's UDP sockets, the deltas of fds, RSS, RTP ports, SIP TCP
connections and asyncio tasks after the settle, log lines and tracebacks, crashes and the
SIGTERM exit status.

What the bridge does not expose yet and the harness would read: an asyncio task gauge,
`duplexline_bridge_asyncio_tasks` (probe.TASKS_METRIC; the Δtasks column says n/a until
it exists, and a task leak goes unseen unless it holds a socket or memory).
"""
