//! Work spread over the machine's cores: the aggregator processes each partition's
//! share of a batch and restores partitions this way, the rater rebuilds partitions'
//! ledgers. In: items and a function; out: the results, in item order. Also how the
//! services lock state shared between threads ([`lock`]).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks, carrying on after a panic elsewhere. Every state Tally shares this way stays
/// usable after one: the services' is rebuilt from Kafka on any error, a rate limit's
/// bucket is at worst stale.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on every item, spread over at most as many threads as the machine has
/// cores (the calling thread is one of them); returns the results in item order.
pub fn on_threads<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    // Asked once: the answer reads cgroup files, and this runs for every batch.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads =
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if items.len() <= 1 || threads <= 1 {
        return items.into_iter().map(f).collect();
    }
    let groups = items.len().min(threads);
    let mut shares: Vec<Vec<(usize, T)>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        shares[i % groups].push((i, item));
    }
    let f = &f;
    let run = move |share: Vec<(usize, T)>| -> Vec<(usize, R)> {
        share.into_iter().map(|(i, item)| (i, f(item))).collect()
    };
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let mut shares = shares.into_iter();
        let own = shares.next().unwrap_or_default();
        let spawned: Vec<_> = shares
            .map(|share| scope.spawn(move || run(share)))
            .collect();
        let mut results = run(own);
        for handle in spawned {
            // A panic on a processing thread is a bug: carry it to this thread.
            results.extend(
                handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            );
        }
        results
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::on_threads;

    #[test]
    fn on_threads_runs_every_item_once_and_keeps_their_order() {
        let items: Vec<u64> = (0..7).collect();
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        let results = on_threads(items, |n| {
            threads.lock().unwrap().insert(std::thread::current().id());
            n * n
        });
        assert_eq!(results, vec![0, 1, 4, 9, 16, 25, 36]);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let used = threads.into_inner().unwrap().len();
        assert!(
            used >= 1 && used <= cores.min(7),
            "{used} threads for {cores} cores"
        );
        assert!(on_threads(Vec::<u8>::new(), |n| n).is_empty());
    }
}
