"""Where one thread's wall time went, from two perf recordings of the same seconds.

    python3 benches/aggregator_wall.py TID SWITCHES.data SLEEPS.data

SWITCHES.data: `perf record -a -e sched:sched_switch` (every context switch of the
machine, so both when TID leaves a CPU and when it comes back). SLEEPS.data:
`perf record -t TID -e sched:sched_switch --call-graph dwarf` (the stack TID had each
time it left a CPU). Each interval off CPU is classified by that stack; `benches/run.sh
stream-profile` makes both recordings of the aggregator's consume loop.
"""

import collections
import re
import subprocess
import sys

# First match wins: the frame that says why the thread waits.
CLASSES = [
    ("commit_transaction", "commit_transaction: waiting for the commit (flush, acks, EndTxn)"),
    ("send_offsets_to_transaction", "send_offsets_to_transaction: waiting for the broker"),
    ("begin_transaction", "begin_transaction"),
    ("abort_transaction", "abort_transaction"),
    ("fetch_watermarks", "fetch_watermarks (the lag metric)"),
    ("committed_offsets", "committed_offsets"),
    ("rd_kafka_q_pop_serve", "consumer poll: no message ready"),
    ("poll_queue", "consumer poll: no message ready"),
    ("rd_kafka_consumer_poll", "consumer poll: no message ready"),
    ("nanosleep", "sleeping (std::thread::sleep)"),
]


def perf_script(path, fields):
    return subprocess.run(
        ["perf", "script", "-i", path, "-F", fields], capture_output=True, text=True, check=True
    ).stdout


def main():
    tid, switches, sleeps = sys.argv[1], sys.argv[2], sys.argv[3]
    events = []
    pattern = re.compile(
        r"\s*([\d.]+): prev_comm=.* prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)"
    )
    for line in perf_script(switches, "time,trace").splitlines():
        m = pattern.match(line)
        if m:
            events.append((float(m[1]), m[2], m[3], m[4]))
    stacks = {}
    for block in perf_script(sleeps, "time,sym").split("\n\n"):
        lines = [l.strip() for l in block.strip().splitlines()]
        if lines:
            stacks[round(float(lines[0].rstrip(":")), 6)] = lines[1:]
    if not events:
        sys.exit("no context switches recorded")

    def classify(stack, state):
        if state.startswith("R"):
            return "preempted (runnable, waiting for a CPU)"
        text = " ".join(stack)
        for key, name in CLASSES:
            if key in text:
                return name
        user = [f for f in stack if "tally" in f or "rd_kafka" in f]
        return "other: " + (user[0] if user else (stack[-1] if stack else "no stack"))

    off = collections.defaultdict(list)
    on_cpu = 0.0
    left = None
    came_back = None
    for t, prev, state, nxt in events:
        if prev == tid:
            if came_back is not None:
                on_cpu += t - came_back
            left = (t, state)
        elif nxt == tid:
            if left is not None:
                cls = classify(stacks.get(round(left[0], 6), []), left[1])
                off[cls].append(t - left[0])
            came_back = t
            left = None
    span = events[-1][0] - events[0][0]
    print(f"{span:.2f} s recorded; thread {tid} on a CPU {on_cpu:.2f} s ({on_cpu / span:.0%})")
    print(f"{'off CPU':>8} {'share':>6} {'times':>7} {'median ms':>10} {'max ms':>8}  why")
    for cls, spans in sorted(off.items(), key=lambda kv: -sum(kv[1])):
        spans.sort()
        total = sum(spans)
        print(
            f"{total:7.2f}s {total / span:6.0%} {len(spans):7d} "
            f"{spans[len(spans) // 2] * 1e3:10.2f} {spans[-1] * 1e3:8.1f}  {cls}"
        )


if __name__ == "__main__":
    main()
