//! The embedded store: SQLite in place of ClickHouse.
//!
//! In: usage updates (with their changed windows) and rated line revisions. Out: three
//! tables a person can query.
//! - `window_usage`: one row per (series, window), keeping the latest revision. Late
//!   usage of a closed month is kept in a window at the start of the month that bills
//!   it, so `adjusts_period` (empty for a month's own usage) is part of the key, as in
//!   ClickHouse.
//! - `rated_lines`: every revision of every invoice line, keyed by (id, run, revision):
//!   writing the same revision again changes nothing, and a later run (re-rating with a
//!   new price book, or corrected events) adds its own rows.
//! - `invoice_lines`: a view with the current row of each line: the latest finished
//!   run's latest revision. A run rates the whole events file, so a line it does not
//!   make (a customer removed, a price renamed) is not current, and a run that stopped
//!   half way never shows.
//!
//! Each [`Store::open`] starts a new run, numbered after the ones already stored, and
//! [`Store::finish`] makes it the current one.
//!
//! Decimals are stored as TEXT, so nothing is rounded through floating point;
//! `amount_minor` holds the amount in the currency's minor unit as an INTEGER, so
//! `SUM(amount_minor)` is exact in SQL.

use std::path::Path;

use anyhow::Context;
use chrono::Utc;
use rusqlite::{params, Connection};
use tally_rater::RatedLine;
use tally_schemas::records::UsageUpdate;
use tally_schemas::time::rfc3339;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS window_usage (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    dimensions TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    period_start TEXT NOT NULL,
    value TEXT NOT NULL,
    period_to_date TEXT NOT NULL,
    run INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    adjusts_period TEXT NOT NULL,
    PRIMARY KEY (customer, meter, dimensions, adjusts_period, window_start)
);
CREATE TABLE IF NOT EXISTS rated_lines (
    id TEXT NOT NULL,
    run INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    customer TEXT NOT NULL,
    plan TEXT NOT NULL,
    price TEXT NOT NULL,
    meter TEXT NOT NULL,
    period_start TEXT NOT NULL,
    period_end TEXT NOT NULL,
    quantity TEXT NOT NULL,
    subtotal TEXT NOT NULL,
    discount TEXT NOT NULL,
    amount TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    delta TEXT NOT NULL,
    currency TEXT NOT NULL,
    tiers TEXT NOT NULL,
    PRIMARY KEY (id, run, revision)
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT
);
DROP VIEW IF EXISTS invoice_lines;
CREATE VIEW invoice_lines AS
    SELECT r.* FROM rated_lines r
    WHERE r.run = (SELECT MAX(run) FROM runs WHERE finished IS NOT NULL)
    AND NOT EXISTS (
        SELECT 1 FROM rated_lines x
        WHERE x.id = r.id AND x.run = r.run AND x.revision > r.revision
    );
";

#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// This run's number: one more than any run already stored.
    run: i64,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
        // The store is rebuilt from the events file, so durability per commit is not
        // needed; WAL keeps readers unblocked while the pipeline writes.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")?;
        // An earlier build keyed windows without the month an adjustment is for, so a
        // month's first window and late usage of the month before overwrote each
        // other. Every run writes all of its windows again: the old table can go.
        let keyed_by_adjusted_month: bool = conn.query_row(
            "SELECT COUNT(*) = 0 OR SUM(name = 'adjusts_period') > 0 \
             FROM pragma_table_info('window_usage')",
            [],
            |r| r.get(0),
        )?;
        if !keyed_by_adjusted_month {
            conn.execute_batch("DROP TABLE window_usage")?;
        }
        conn.execute_batch(SCHEMA)
            .context("cannot create the store's tables")?;
        // Numbered after every run the store holds rows of, those of a store made
        // before `runs` existed included.
        let run = conn.query_row(
            "INSERT INTO runs (run, started) SELECT MAX( \
                (SELECT COALESCE(MAX(run), 0) FROM runs), \
                (SELECT COALESCE(MAX(run), 0) FROM rated_lines), \
                (SELECT COALESCE(MAX(run), 0) FROM window_usage)) + 1, ?1 \
             RETURNING run",
            [rfc3339(Utc::now())],
            |r| r.get(0),
        )?;
        Ok(Store { conn, run })
    }

    /// Marks this run finished: its lines become `invoice_lines`.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET finished = ?1 WHERE run = ?2",
                params![rfc3339(Utc::now()), self.run],
            )
            .context("cannot mark the run finished in the store")?;
        Ok(())
    }

    /// Writes one batch of usage updates (each changed window a row) and line revisions
    /// in one transaction.
    pub fn write(&mut self, updates: &[UsageUpdate], lines: &[RatedLine]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut upsert_window = tx.prepare_cached(
                "INSERT INTO window_usage VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (customer, meter, dimensions, adjusts_period, window_start) DO UPDATE SET
                    value = excluded.value, period_to_date = excluded.period_to_date,
                    run = excluded.run, revision = excluded.revision
                 WHERE excluded.run > window_usage.run
                    OR (excluded.run = window_usage.run AND excluded.revision > window_usage.revision)",
            )?;
            for u in updates {
                let dimensions = serde_json::to_string(&u.series.group)?;
                let adjusts = u.series.adjusts.map_or_else(String::new, |p| p.to_string());
                for w in &u.windows {
                    upsert_window.execute(params![
                        u.series.customer,
                        u.series.meter,
                        dimensions,
                        rfc3339(w.window_start),
                        rfc3339(w.window_end),
                        rfc3339(u.period_start),
                        w.value.value.to_string(),
                        u.period_to_date.value.to_string(),
                        self.run,
                        w.revision as i64,
                        adjusts,
                    ])?;
                }
            }
            let mut insert_line = tx.prepare_cached(
                "INSERT OR IGNORE INTO rated_lines VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?;
            for r in lines {
                let l = &r.line;
                insert_line.execute(params![
                    l.id,
                    self.run,
                    r.revision as i64,
                    l.config_hash,
                    l.customer,
                    l.plan,
                    l.price,
                    l.meter,
                    rfc3339(l.period_start),
                    rfc3339(l.period_end),
                    l.quantity.to_string(),
                    l.subtotal.to_string(),
                    l.discount.to_string(),
                    l.amount.to_string(),
                    l.amount_minor()
                        .context("amount does not fit a 64-bit count of minor units")?,
                    r.delta.to_string(),
                    l.currency,
                    serde_json::to_string(&l.tiers)?,
                ])?;
            }
        }
        tx.commit().context("cannot commit to the store")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_made_before_runs_were_recorded_numbers_its_next_run_after_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.db");
        let first = Store::open(&path).unwrap();
        assert_eq!(first.run, 1);
        // Rows of run 5 and no `runs` rows: what an earlier build left.
        first
            .conn
            .execute_batch(
                "INSERT INTO rated_lines VALUES ('l', 5, 1, 'h', 'c', 'p', 'pr', 'm', \
                 '2026-11-01T00:00:00Z', '2026-12-01T00:00:00Z', '1', '1.00', '0.00', \
                 '1.00', 100, '1.00', 'usd', '[]'); DELETE FROM runs;",
            )
            .unwrap();
        drop(first);
        assert_eq!(Store::open(&path).unwrap().run, 6);
    }

    #[test]
    fn late_usage_of_a_closed_month_and_the_months_first_window_are_two_rows() {
        use std::str::FromStr;
        use std::sync::Arc;

        use rust_decimal::Decimal;
        use tally_schemas::records::{MeterValue, SeriesKey, WindowUsage};
        use tally_schemas::time::Period;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.db");
        // A table as an earlier build made it, without the adjusted month.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE window_usage (customer TEXT, meter TEXT, dimensions TEXT, \
                 window_start TEXT, window_end TEXT, period_start TEXT, value TEXT, \
                 period_to_date TEXT, run INTEGER, revision INTEGER, \
                 PRIMARY KEY (customer, meter, dimensions, window_start))",
            )
            .unwrap();
        let mut store = Store::open(&path).unwrap();
        let november = Period::from_str("2026-11").unwrap();
        let value = |v: i64| MeterValue {
            value: Decimal::from(v),
            latest: None,
        };
        let update = |adjusts: Option<Period>, v: i64| UsageUpdate {
            series: Arc::new(SeriesKey {
                customer: "c".into(),
                meter: "calls".into(),
                group: Vec::new(),
                adjusts,
            }),
            period_start: november.start(),
            period_to_date: value(v),
            windows: vec![WindowUsage {
                window_start: november.start(),
                window_end: november.start() + chrono::Duration::hours(1),
                value: value(v),
                revision: 1,
            }],
        };
        let october = Period::from_str("2026-10").unwrap();
        store
            .write(&[update(None, 3), update(Some(october), 2)], &[])
            .unwrap();
        let rows: Vec<(String, String)> = (store.conn)
            .prepare("SELECT adjusts_period, value FROM window_usage ORDER BY adjusts_period")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                ("".to_owned(), "3".to_owned()),
                ("2026-10".to_owned(), "2".to_owned())
            ]
        );
    }
}
