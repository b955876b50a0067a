"""Where one thread's wall time went, from two perf recordings of the same seconds.

    python3 benches/aggregator_wall.py TID SWITCHES.data SLEEPS.data

SWITCHES.data: `perf record -a -e sched:sched_switch -e sched:sched_wakeup` (every
context switch and wakeup of the machine: when TID leaves a CPU, and when it is woken
or runs again). SLEEPS.data:
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
    # (time, kind, state): "out" when the thread leaves a CPU (state S: sleeps, R:
    # preempted), "in" when it gets one, "wake" when something wakes it.
    events = []
    switch = re.compile(
        r"\s*([\d.]+): sched:sched_switch: prev_comm=.* prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)"
    )
    wakeup = re.compile(r"\s*([\d.]+): sched:sched_wakeup: comm=.* pid=(\d+) ")
    for line in perf_script(switches, "time,event,trace").splitlines():
        m = switch.match(line)
        if m:
            if m[2] == tid:
                events.append((float(m[1]), "out", m[3]))
            elif m[4] == tid:
                events.append((float(m[1]), "in", ""))
            continue
        m = wakeup.match(line)
        if m and m[2] == tid:
            events.append((float(m[1]), "wake", ""))
    events.sort()
    # The stack at each "out", in the same order (the two sessions stamp the same switch
    # a few microseconds apart).
    stacks = []
    for block in perf_script(sleeps, "time,ip,sym").split("\n\n"):
        lines = [l.strip() for l in block.strip().splitlines()]
        if lines:
            stacks.append((float(lines[0].rstrip(":")), lines[1:]))
    stacks.sort()
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
    pointer = 0
    left = None  # (time, state, stack) of the last "out"
    for t, kind, state in events:
        if kind == "out":
            while pointer < len(stacks) and stacks[pointer][0] < t - 1e-4:
                pointer += 1
            stack = []
            if pointer < len(stacks) and stacks[pointer][0] <= t + 1e-4:
                stack = stacks[pointer][1]
                pointer += 1
            left = (t, state, stack)
        elif left is not None and (kind == "in" or not left[1].startswith("R")):
            # A sleep ends when the thread is woken (or seen running); a preemption
            # when it runs again.
            off[classify(left[2], left[1])].append(t - left[0])
            left = None
    span = events[-1][0] - events[0][0]
    asleep = sum(sum(v) for v in off.values())
    print(f"{span:.2f} s recorded; thread {tid} off a CPU {asleep:.2f} s ({asleep / span:.0%}), "
          f"so on a CPU or about to run {span - asleep:.2f} s ({(span - asleep) / span:.0%})")
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
