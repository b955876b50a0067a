//! The embedded pipeline: ingest -> aggregator -> rater in one process.
//!
//! The stages are the ones the Kafka services run, joined by bounded in-process queues
//! where Kafka topics would be, with SQLite in place of ClickHouse:
//!
//! ```text
//! events file -> [ingest: decode, reject] -> events queue -> [aggregator: dedupe, windows]
//!             -> windows queue -> [rater: ledger, flush] -> SQLite (window_usage, rated_lines)
//! ```
//!
//! Each stage runs on its own thread and owns its state, so the hand-offs are the only
//! shared points, as with Kafka. Bounded queues give backpressure: a slow store slows
//! ingest instead of filling memory.

pub mod store;

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tally_aggregator::Aggregator;
use tally_ingest::{decode_lines, Line, LineReject};
use tally_rater::{Ledger, RatedLine, Recorded};
use tally_schemas::config::Config;
use tally_schemas::event::EventDecoder;
use tally_schemas::records::UsageUpdate;
use tally_schemas::time::Period;

use crate::summary::Summary;
use store::Store;

/// Batches a queue holds before its producer waits. Ingest hands over the lines of one
/// decoded chunk (about 2 MiB of input) at a time, like a Kafka poll batch.
const QUEUE_DEPTH: usize = 8;

/// What the pipeline produced.
#[derive(Debug)]
pub struct PipelineRun {
    pub summary: Summary,
    /// The period's lines in their final revision, zero usage included.
    pub lines: Vec<RatedLine>,
    pub rejects: Vec<LineReject>,
    pub window_updates: u64,
    pub line_revisions: u64,
}

/// Runs `input` through the three stages into `store`, then closes `period`.
/// `progress` is called from the aggregator stage with the events processed so far.
pub fn run(
    config: &Arc<Config>,
    input: &[u8],
    period: Period,
    now: DateTime<Utc>,
    store: &mut Store,
    progress: impl Fn(u64) + Send,
) -> anyhow::Result<PipelineRun> {
    let decode_workers = crate::default_threads().saturating_sub(1).max(1);
    std::thread::scope(|scope| {
        let (events_tx, events_rx) = mpsc::sync_channel::<Vec<Line<'_>>>(QUEUE_DEPTH);
        let (windows_tx, windows_rx) = mpsc::sync_channel::<Vec<UsageUpdate>>(QUEUE_DEPTH);

        // Ingest: decode lines, hand events and rejects on in batches.
        let ingest = scope.spawn(move || {
            let decoder = EventDecoder::new(config, now);
            // A failed send means the aggregator stopped; its error is reported there.
            let _ = decode_lines(input, decoder, decode_workers, |lines| {
                match events_tx.send(lines) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            });
        });

        // Aggregator: dedupe and window each batch, then hand on what changed.
        let aggregator = scope.spawn(move || {
            let mut aggregator = Aggregator::streaming(config);
            let mut summary = Summary {
                period: period.to_string(),
                ..Summary::default()
            };
            let mut rejects = Vec::new();
            for batch in events_rx {
                for line in &batch {
                    if let Some(bad) = summary.count_line(&mut aggregator, line, period) {
                        rejects.push(bad.reject().clone());
                    }
                }
                progress(summary.events_read);
                if windows_tx.send(aggregator.drain_updates()).is_err() {
                    break;
                }
            }
            (summary, rejects)
        });

        // Rater: price period-to-date usage and store windows and line revisions.
        let mut ledger = Ledger::new(Arc::clone(config));
        let mut window_updates = 0u64;
        let mut line_revisions = 0u64;
        // Each unbilled series of the period with its latest value.
        let mut unbilled = std::collections::BTreeMap::new();
        for updates in windows_rx {
            for u in &updates {
                let update_period = Period::containing(u.period_start);
                let recorded = ledger.record(&u.series, update_period, u.period_to_date);
                let listed = matches!(recorded, Recorded::NotPriced | Recorded::NotSubscribed);
                if listed && update_period == period {
                    unbilled.insert(Arc::clone(&u.series), (recorded, u.period_to_date.value));
                }
                window_updates += u.windows.len() as u64;
            }
            // A line that cannot be rated stays pending: the close reports it.
            let (rated, _) = ledger.flush_available();
            store.write(&updates, &rated)?;
            line_revisions += rated.len() as u64;
        }
        let (lines, unrated) = ledger.close(period);
        store.write(&[], &lines)?;

        ingest
            .join()
            .map_err(|_| anyhow::anyhow!("the ingest stage panicked"))?;
        let (mut summary, rejects) = aggregator
            .join()
            .map_err(|_| anyhow::anyhow!("the aggregator stage panicked"))?;
        // Only a run that read the whole file, and rated every line, becomes the
        // store's current one: a line that cannot be rated would show its last rating.
        if let Some(first) = unrated.first() {
            anyhow::bail!(
                "{} line(s) could not be rated, the first: {first}; the run is not made the store's current one",
                unrated.len()
            );
        }
        store.finish()?;
        for (series, (recorded, quantity)) in unbilled {
            summary.note_unbilled(recorded, &series, quantity);
        }
        Ok(PipelineRun {
            summary,
            lines,
            rejects,
            window_updates,
            line_revisions,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{rate_events, BatchOptions};
    use crate::demo::generate::{config_toml, generate, Spec};
    use std::str::FromStr;

    /// The period the tests rate, and the clock they rate it by.
    fn october_rated_in_november() -> (Period, DateTime<Utc>) {
        let now = DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z").unwrap();
        (
            Period::from_str("2026-10").unwrap(),
            now.with_timezone(&Utc),
        )
    }

    #[test]
    fn the_embedded_pipeline_agrees_with_batch_rating_and_stores_one_current_row_per_line() {
        let (period, now) = october_rated_in_november();
        let config = Arc::new(Config::parse(&config_toml(30), "demo").unwrap());
        let mut input = Vec::new();
        let spec = Spec {
            period,
            events: 40_000,
            customers: 30,
            seed: 7,
            malformed: 16,
        };
        let made = generate(spec, &mut input, |_| {}).unwrap();
        assert!(made.retries > 1000 && made.conflicts > 0 && made.late > 0);

        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tally.db");
        let mut store = Store::open(&db).unwrap();
        let pipeline = run(&config, &input, period, now, &mut store, |_| {}).unwrap();
        let options = BatchOptions {
            period,
            now,
            workers: 2,
            strict: false,
            explained_customer: None,
            keep_counted_events: false,
        };
        let batch = rate_events(&config, &input, &options, |_| Ok(())).unwrap();

        let streamed: Vec<_> = pipeline.lines.iter().map(|r| r.line.clone()).collect();
        assert_eq!(streamed, batch.lines);
        assert_eq!(pipeline.summary, batch.summary);
        assert_eq!(
            pipeline.summary.duplicates,
            made.retries - made.unmetered_retries
        );
        assert_eq!(pipeline.summary.rejected, 16);
        assert_eq!(
            pipeline.summary.conflicts,
            made.conflicts - made.unmetered_conflicts
        );
        // Conflicting resends are kept with the rejected lines, as in the rejected topic.
        let conflicts = pipeline
            .rejects
            .iter()
            .filter(|r| r.error.problem.code() == "conflict");
        assert_eq!(conflicts.count() as u64, made.conflicts);
        assert_eq!(pipeline.rejects.len() as u64, 16 + made.conflicts);
        // Customers cycle through the plans: 8 on starter (4 prices), 8 on pro, 7 on
        // scale-eu and 7 on enterprise-jp (2 prices each): 32 + 16 + 14 + 14 lines.
        assert_eq!(streamed.len(), 76);

        let rows = |sql: &str| -> i64 {
            rusqlite::Connection::open(&db)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap()
        };
        // Writing the same revisions again adds nothing: every row is keyed.
        let revisions = rows("SELECT COUNT(*) FROM rated_lines");
        store.write(&[], &pipeline.lines).unwrap();
        assert_eq!(rows("SELECT COUNT(*) FROM rated_lines"), revisions);
        assert_eq!(rows("SELECT COUNT(*) FROM invoice_lines"), 76);
        assert_eq!(rows("SELECT COUNT(DISTINCT id) FROM invoice_lines"), 76);
        let usd_minor: i64 = streamed
            .iter()
            .filter(|l| l.currency == "usd")
            .map(|l| i64::try_from(l.amount.mantissa()).unwrap())
            .sum();
        assert_eq!(
            rows("SELECT SUM(amount_minor) FROM invoice_lines WHERE currency = 'usd'"),
            usd_minor
        );

        // Re-rating into the same store with a new price book: the new run's lines are
        // current, one per line, with the new price book's hash and amounts.
        let repriced = Arc::new(
            Config::parse(
                &config_toml(30).replace("unit_amount = \"0.99\"", "unit_amount = \"1.99\""),
                "demo",
            )
            .unwrap(),
        );
        let mut later = Store::open(&db).unwrap();
        let rerun = run(&repriced, &input, period, now, &mut later, |_| {}).unwrap();
        assert_eq!(rows("SELECT COUNT(*) FROM invoice_lines"), 76);
        assert_eq!(
            rows("SELECT COUNT(DISTINCT config_hash) FROM invoice_lines"),
            1
        );
        let rerun_usd: i64 = rerun
            .lines
            .iter()
            .filter(|r| r.line.currency == "usd")
            .map(|r| i64::try_from(r.line.amount.mantissa()).unwrap())
            .sum();
        assert!(rerun_usd > usd_minor);
        assert_eq!(
            rows("SELECT SUM(amount_minor) FROM invoice_lines WHERE currency = 'usd'"),
            rerun_usd
        );
    }

    #[test]
    fn the_store_shows_the_latest_finished_run_and_only_the_lines_it_made() {
        let (period, now) = october_rated_in_november();
        let spec = Spec {
            period,
            events: 5_000,
            customers: 30,
            seed: 11,
            malformed: 0,
        };
        let mut input = Vec::new();
        generate(spec, &mut input, |_| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tally.db");
        let current_ids = || -> Vec<String> {
            let conn = rusqlite::Connection::open(&db).unwrap();
            let mut query = conn
                .prepare("SELECT id FROM invoice_lines ORDER BY id")
                .unwrap();
            let ids = query.query_map([], |r| r.get(0)).unwrap();
            ids.map(Result::unwrap).collect()
        };
        let ids = |run: &PipelineRun| -> Vec<String> {
            let mut ids: Vec<_> = run.lines.iter().map(|r| r.line.id.clone()).collect();
            ids.sort();
            ids
        };

        // A run into a new Store, so a run of its own, with `customers` in the price book.
        let run_with = |customers: u32| {
            let config = Arc::new(Config::parse(&config_toml(customers), "demo").unwrap());
            let mut store = Store::open(&db).unwrap();
            run(&config, &input, period, now, &mut store, |_| {}).unwrap()
        };
        let first = run_with(30);
        assert_eq!(current_ids(), ids(&first));

        // One customer fewer in the price book: that customer's lines are not current.
        let second = run_with(29);
        assert!(second.lines.len() < first.lines.len());
        assert_eq!(current_ids(), ids(&second));

        // A run that stops before it finishes never becomes current.
        let mut unfinished = Store::open(&db).unwrap();
        unfinished.write(&[], &first.lines).unwrap();
        assert_eq!(current_ids(), ids(&second));
    }
}
