//! Heap bytes per key held by `tally_aggregator::dedupe::DedupeSet`, measured with a
//! counting global allocator. The requirement: at or under 40 bytes per key held.
//!
//! Run: `cargo run --release -p tally-benches --bin dedupe_memory [max_keys]`
//! (default 10,000,000; `benches/run.sh dedupe` does this).
//!
//! What it prints:
//! - growth: keys are inserted one by one with `observe`, and live heap bytes are read
//!   after every insert, so the moment right after each table growth (the emptiest
//!   table, the worst case) is among the samples. Reported at 10k, 100k, 1M and 10M
//!   keys, plus the worst bytes/key over all sizes from 1,000 keys up and, separately,
//!   below 1,000 (where a fixed overhead dominates).
//! - transient peak: the highest live heap seen so far divided by keys held, which
//!   includes the moment during a growth when the old and the new table are both
//!   allocated.
//! - expiry: a set of n keys, half dated day 0 and half day 1, after
//!   `expire_before(1)` (which shrinks the table).
//! - throughput: `observe` calls per second on precomputed keys, new and retried.
//!
//! Live bytes are the allocator's count minus the count just before the set was made,
//! so only what the set holds is counted; key strings are formatted into a buffer
//! allocated before that baseline. The figure is cross-checked against the set's own
//! `allocated_bytes()`.

// Bytes per key are ratios; printing them as floats is the point of this tool.
#![allow(clippy::float_arithmetic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tally_aggregator::dedupe::{DedupeSet, Seen};
use tally_schemas::ids::{EventKey, PayloadFingerprint};

/// `System`, counting the bytes currently allocated and the most ever allocated at once.
#[derive(Debug)]
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn added(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn removed(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// The one place the benchmarks need unsafe code: see the [lints] comment in Cargo.toml.
// Every method forwards to `System` with the caller's arguments unchanged, so the
// caller's obligations pass straight through; the counters only see sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as the new block appearing before the old one goes, as a moving
            // realloc does; for the live count the order does not matter.
            added(new_size);
            removed(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// A key like the ones the generator makes: `source` and a numbered `id`.
fn key(buf: &mut String, i: u64) -> EventKey {
    buf.clear();
    let _ = write!(buf, "tok-{i:09}");
    EventKey::new("llm-gateway", buf)
}

const CHECKPOINTS: [u64; 4] = [10_000, 100_000, 1_000_000, 10_000_000];

fn growth(max: u64) -> bool {
    println!("growth: observe() new keys one by one, live heap read after every insert");
    println!(
        "{:>12} {:>14} {:>10} {:>16} {:>14}",
        "keys", "heap bytes", "bytes/key", "allocated_bytes", "peak bytes/key"
    );
    let mut buf = String::with_capacity(64);
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    let mut set = DedupeSet::new();
    // (bytes/key, keys, bytes) at the worst sample from 1,000 keys up, and below.
    let mut worst = (0.0f64, 0u64, 0usize);
    let mut worst_small = (0.0f64, 0u64, 0usize);
    let mut worst_peak = (0.0f64, 0u64);
    let mut agrees = true;
    // Sizes at which the bound is exceeded: (how many, the largest).
    let mut over = (0u64, 0u64);
    for i in 0..max {
        let seen = set.observe(key(&mut buf, i), PayloadFingerprint(i as u32), 20_000);
        debug_assert_eq!(seen, Seen::First);
        let n = i + 1;
        let bytes = live() - base;
        let per_key = bytes as f64 / n as f64;
        if bytes > 40 * n as usize {
            over = (over.0 + 1, n);
        }
        let slot = if n >= 1000 {
            &mut worst
        } else {
            &mut worst_small
        };
        if per_key > slot.0 {
            *slot = (per_key, n, bytes);
        }
        let peak_per_key = (PEAK.load(Ordering::Relaxed) - base) as f64 / n as f64;
        if n >= 1000 && peak_per_key > worst_peak.0 {
            worst_peak = (peak_per_key, n);
        }
        if bytes != set.allocated_bytes() {
            agrees = false;
        }
        if CHECKPOINTS.contains(&n) || n == max {
            println!(
                "{:>12} {:>14} {:>10.2} {:>16} {:>14.2}",
                n,
                bytes,
                per_key,
                set.allocated_bytes(),
                peak_per_key
            );
        }
    }
    println!(
        "worst over every size from 1,000 to {max} keys: {:.2} bytes/key ({} bytes for {} keys, right after a growth)",
        worst.0, worst.2, worst.1
    );
    println!(
        "worst below 1,000 keys: {:.2} bytes/key ({} bytes for {} keys)",
        worst_small.0, worst_small.2, worst_small.1
    );
    println!(
        "sizes above 40 bytes/key: {} (the largest: {} keys)",
        over.0, over.1
    );
    println!(
        "worst transient peak (old + new table during a growth), from 1,000 keys up: {:.2} bytes/key at {} keys",
        worst_peak.0, worst_peak.1
    );
    println!(
        "counting allocator {} DedupeSet::allocated_bytes() at every sample",
        if agrees { "matched" } else { "did NOT match" }
    );
    drop(set);
    worst.0 <= 40.0
}

fn expiry(sizes: &[u64]) -> bool {
    println!();
    println!("expiry: n keys, half on day 0 and half on day 1, then expire_before(1)");
    println!(
        "{:>12} {:>14} {:>10} {:>12} {:>14} {:>10}",
        "keys before", "bytes before", "bytes/key", "keys after", "bytes after", "bytes/key"
    );
    let mut buf = String::with_capacity(64);
    let mut ok = true;
    for &n in sizes {
        let base = live();
        let mut set = DedupeSet::new();
        for i in 0..n {
            set.observe(key(&mut buf, i), PayloadFingerprint(0), (i % 2) as u16);
        }
        let before = live() - base;
        let removed = set.expire_before(1);
        let after = live() - base;
        let held = set.len() as u64;
        assert_eq!(removed as u64 + held, n);
        let per_key = after as f64 / held as f64;
        ok &= per_key <= 40.0;
        println!(
            "{:>12} {:>14} {:>10.2} {:>12} {:>14} {:>10.2}",
            n,
            before,
            before as f64 / n as f64,
            held,
            after,
            per_key
        );
    }
    ok
}

fn throughput(n: u64) {
    println!();
    let mut buf = String::with_capacity(64);
    let started = Instant::now();
    let keys: Vec<EventKey> = (0..n).map(|i| key(&mut buf, i)).collect();
    let hashing = started.elapsed().as_secs_f64();
    let mut set = DedupeSet::new();
    let started = Instant::now();
    for (i, k) in keys.iter().enumerate() {
        set.observe(*k, PayloadFingerprint(i as u32), 20_000);
    }
    let first = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut retries = 0u64;
    for (i, k) in keys.iter().enumerate() {
        retries += u64::from(set.observe(*k, PayloadFingerprint(i as u32), 20_000) == Seen::Retry);
    }
    let again = started.elapsed().as_secs_f64();
    assert_eq!(retries, n);
    println!("throughput over {n} keys (one thread):");
    println!(
        "  EventKey::new (XXH3-128 of source, id): {:>12.0} keys/s",
        n as f64 / hashing
    );
    println!(
        "  observe, new keys (table grows):        {:>12.0} inserts/s",
        n as f64 / first
    );
    println!(
        "  observe, same keys again (retries):     {:>12.0} lookups/s",
        n as f64 / again
    );
}

fn main() {
    let max = std::env::args()
        .nth(1)
        .map(|s| {
            s.replace('_', "")
                .parse::<u64>()
                .expect("max_keys: a number")
        })
        .unwrap_or(10_000_000);
    let sizes: Vec<u64> = CHECKPOINTS.iter().copied().filter(|&n| n <= max).collect();
    let grows_ok = growth(max);
    let expiry_ok = expiry(&sizes);
    throughput(max);
    println!();
    println!(
        "bound of 40 bytes per key held (from 1,000 keys up, and after expiry): {}",
        if grows_ok && expiry_ok {
            "met"
        } else {
            "NOT met"
        }
    );
}
