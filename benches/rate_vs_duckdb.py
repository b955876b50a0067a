#!/usr/bin/env python3
"""`tally rate` versus DuckDB over the same month of events: a benchmark, not a test.

Run through benches/run.sh, which builds tally, generates the data and installs DuckDB
into bench-data/venv, then runs this with that venv's Python from the repo root.

Both sides run as whole child processes, timed by wall clock, alternating
(tally, duckdb, tally, duckdb, ...), `--runs` times each; the median is reported.
Peak RSS of each child comes from os.wait4's rusage (ru_maxrss, KiB on Linux).
Afterwards (untimed) tally runs once more with its invoice lines written to a file and
the totals are compared with DuckDB's: the benchmark prints whether they agree.

`python3 rate_vs_duckdb.py duckdb-child SQL EVENTS OUT` is the DuckDB child process.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def duckdb_child(sql_path, events, out):
    import duckdb

    with open(sql_path) as f:
        sql = f.read().replace("{events}", events).replace("{out}", out)
    con = duckdb.connect()
    con.execute(sql)
    con.close()


def busy_cpu_seconds():
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s):
    """Waits (up to limit_s) until the machine has been idle for 2 s, so that other
    work on a shared machine does not land inside a timed run."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = busy_cpu_seconds()
        time.sleep(2)
        if busy_cpu_seconds() - before < 0.1:
            return True
    return False


def run_timed(argv):
    """Runs argv to completion.

    Returns (wall seconds, peak RSS in KiB, the child's CPU seconds, CPU seconds other
    processes used meanwhile). The last one tells whether a run was disturbed.
    """
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Drain stderr while waiting so a chatty child cannot block on a full pipe.
    stderr = proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    busy = busy_cpu_seconds() - busy_before
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace"))
        raise SystemExit(f"{argv[0]} failed with exit code {proc.returncode}")
    cpu = rusage.ru_utime + rusage.ru_stime
    return elapsed, rusage.ru_maxrss, cpu, max(0.0, busy - cpu)


def warm_page_cache(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def machine():
    info = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    return info


def source_state(tally):
    """The commit and whether the tree had uncommitted changes when the binary was built."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"
    changed = git("status", "--porcelain", "--untracked-files=no")
    built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(tally)))
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_files": len(changed.splitlines()) if changed != "?" else "?",
            "tally_built": built}


def check_equivalence(config_path, tally_lines_path, tally_summary_path, duckdb_csv):
    """Compares tally's invoice-line quantities with DuckDB's monthly totals.

    Each tally line is one price of the customer's plan; its quantity is the meter's
    period total restricted to the price's filter (here: a model, or none). So the
    expected quantity for (customer, price) is the sum of DuckDB's totals for
    (customer, price.meter) over the models the filter admits. Every price of every
    configured customer is checked, plus the event counts in tally's summary.
    """
    with open(config_path, "rb") as f:
        config = tomllib.load(f)
    plans = {p["id"]: p for p in config["plans"]}
    meters = {m["slug"]: m for m in config["meters"]}
    customers = {c["id"]: c["plan"] for c in config["customers"]}

    duck = defaultdict(int)  # (customer, meter, model) -> quantity
    duck_events = defaultdict(int)  # customer -> metered events in the period
    with open(duckdb_csv, newline="") as f:
        for row in csv.DictReader(f):
            duck[(row["customer"], row["meter"], row["model"] or None)] += int(row["quantity"])
            duck_events[row["customer"]] += int(row["events"])

    expected = {}
    for customer, plan_id in customers.items():
        for price in plans[plan_id]["prices"]:
            meter = price["meter"]
            wanted = (price.get("filter") or {}).get("model")
            expected[(customer, price["id"])] = sum(
                q
                for (c, m, model), q in duck.items()
                if c == customer and m == meter and (wanted is None or model == wanted)
            )

    got = {}
    with open(tally_lines_path) as f:
        for line in f:
            rec = json.loads(line)
            key = (rec["customer"], rec["price"])
            if key in got:
                return False, [f"tally wrote two lines for {key}"]
            got[key] = int(rec["quantity"]) if "." not in rec["quantity"] else rec["quantity"]

    problems = []
    for key in sorted(set(expected) | set(got)):
        e, g = expected.get(key, 0), got.get(key, 0)
        if e != g:
            problems.append(f"{key}: duckdb {e}, tally {g}")

    with open(tally_summary_path) as f:
        summary = json.load(f)
    known = sum(n for c, n in duck_events.items() if c in customers)
    unknown = {c: n for c, n in duck_events.items() if c not in customers}
    if summary["accepted"] != known:
        problems.append(f"billed events: duckdb {known}, tally {summary['accepted']}")
    if summary["unknown_customers"] != unknown:
        problems.append(f"unknown customers: duckdb {unknown}, tally {summary['unknown_customers']}")
    stats = {
        "prices_compared": len(expected),
        "tally_lines": len(got),
        "billed_events": known,
        "unknown_customer_events": sum(unknown.values()),
        "total_tokens": sum(q for (c, m, _), q in duck.items() if m == "tokens" and c in customers),
        "total_resolutions": sum(q for (c, m, _), q in duck.items() if m == "resolutions" and c in customers),
        "meters": sorted(meters),
    }
    return not problems, problems[:20] or [json.dumps(stats)]


def check_file_order(events):
    """Checks that WITH ORDINALITY numbers rows in file order, which the dedupe relies on.

    Generated ids end in the line index i that made them; retries and conflicting
    resends copy an earlier line's id. So in file order, idnum == ordinality - 1 for
    every original line and idnum < ordinality - 1 for every resend.
    """
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    rows, exact, ahead, keys = con.execute(
        f"""
        SELECT count(*),
               count(*) FILTER (WHERE CAST(split_part(id, '-', 2) AS BIGINT) = ordinality - 1),
               count(*) FILTER (WHERE CAST(split_part(id, '-', 2) AS BIGINT) > ordinality - 1),
               count(DISTINCT (source, id))
        FROM read_json('{events}', format = 'newline_delimited',
                       columns = {{id: 'VARCHAR', source: 'VARCHAR'}}) WITH ORDINALITY
        """
    ).fetchone()
    con.close()
    return ahead == 0 and exact == keys, {"rows": rows, "originals_in_place": exact, "distinct_keys": keys}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "duckdb-child":
        duckdb_child(*sys.argv[2:5])
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bench-data", help="directory with events.jsonl and tally.toml")
    ap.add_argument("--tally", default="target/release/tally")
    ap.add_argument("--period", default="2026-10")
    ap.add_argument("--now", default="2026-11-24T00:00:00Z")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--results", default=None, help="write the figures as JSON here")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="before each timed run, wait up to this many seconds for an idle machine")
    args = ap.parse_args()

    import duckdb

    events = os.path.join(args.data, "events.jsonl")
    config = os.path.join(args.data, "tally.toml")
    duck_out = os.path.join(args.data, "duckdb-totals.csv")
    with open(events, "rb") as f:
        n_events = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    size = os.path.getsize(events)

    tally_cmd = [
        args.tally, "rate", "--config", config, "--events", events, "--period", args.period,
        "--format", "json", "--output", "/dev/null",
        "--rejects", os.path.join(args.data, "rejects.jsonl"), "--now", args.now,
    ]
    duck_cmd = [sys.executable, os.path.abspath(__file__), "duckdb-child",
                os.path.join(HERE, "rate_vs_duckdb.sql"), events, duck_out]
    # What the DuckDB side pays before any work: starting Python and importing duckdb.
    startup_cmd = [sys.executable, "-c", "import duckdb"]

    info = machine()
    src = source_state(args.tally)
    print(f"machine: {info}")
    print(f"source: {src}")
    print(f"duckdb {duckdb.__version__}; events: {events}, {n_events} lines, {size} bytes ({size / 1e6:.1f} MB)")
    print(f"tally:  {' '.join(tally_cmd)}")
    print(f"duckdb: {' '.join(duck_cmd)}")
    warm_page_cache(events)

    times = {"tally": [], "duckdb": []}
    rss = {"tally": [], "duckdb": []}
    cpus = {"tally": [], "duckdb": []}
    others = {"tally": [], "duckdb": []}
    for i in range(args.runs):
        for name, cmd in (("tally", tally_cmd), ("duckdb", duck_cmd)):
            if args.quiet_wait > 0 and not wait_for_quiet(args.quiet_wait):
                print(f"(the machine did not go idle within {args.quiet_wait:.0f} s; running anyway)")
            t, kib, cpu, other = run_timed(cmd)
            times[name].append(t)
            rss[name].append(kib)
            cpus[name].append(cpu)
            others[name].append(other)
            print(f"run {i + 1} {name:6}: {t:7.3f} s wall, {cpu:6.2f} s CPU, peak RSS {kib / 1024:7.1f} MiB"
                  f"  (other processes meanwhile: {other:.2f} CPU s)")
    startup = statistics.median(run_timed(startup_cmd)[0] for _ in range(3))
    if max(others["tally"] + others["duckdb"]) > 0.5:
        print("WARNING: other processes used the CPU during some runs; the times are disturbed")

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["duckdb"] / med["tally"]
    print()
    best = {k: min(v) for k, v in times.items()}
    print(f"{'':8}{'median s':>10}{'events/s':>14}{'peak RSS MiB':>14}{'median CPU s':>14}{'best s':>10}")
    for name in ("tally", "duckdb"):
        print(f"{name:8}{med[name]:10.3f}{n_events / med[name]:14,.0f}{max(rss[name]) / 1024:14.1f}"
              f"{statistics.median(cpus[name]):14.2f}{best[name]:10.3f}")
    print(f"ratio duckdb time / tally time: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'});"
          f" best against best: {best['duckdb'] / best['tally']:.2f}x")
    print(f"(python start + import duckdb, included in the duckdb time: {startup:.3f} s)")

    # Equivalence, untimed: tally once more with its lines kept, against DuckDB's totals.
    lines_path = os.path.join(args.data, "tally-lines.jsonl")
    summary_path = os.path.join(args.data, "tally-summary.json")
    cmd = tally_cmd[:]
    cmd[cmd.index("/dev/null")] = lines_path
    subprocess.run(cmd + ["--summary", summary_path], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    order_ok, order_stats = check_file_order(events)
    print(f"file order check (WITH ORDINALITY is file order): {'ok' if order_ok else 'FAILED'} {order_stats}")
    agree, notes = check_equivalence(config, lines_path, summary_path, duck_out)
    print(f"equivalence: tally and DuckDB {'AGREE' if agree else 'DISAGREE'}")
    for note in notes:
        print(f"  {note}")

    if args.results:
        with open(args.results, "w") as f:
            json.dump({
                "machine": info, "source": src, "duckdb_version": duckdb.__version__, "events": n_events,
                "file_bytes": size, "runs": times, "peak_rss_kib": rss, "cpu_s": cpus,
                "other_cpu_s": others, "median_s": med,
                "events_per_s": {k: n_events / v for k, v in med.items()}, "ratio": ratio,
                "duckdb_startup_s": startup, "file_order_ok": order_ok, "equivalent": agree,
                "notes": notes,
            }, f, indent=2)
    if not (agree and order_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
