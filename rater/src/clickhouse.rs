//! The rater's store: rated invoice lines, and usage windows, into ClickHouse over its
//! HTTP interface.
//!
//! In: invoice lines and a version. Out: rows in `<database>.rated_lines`, a
//! ReplacingMergeTree keyed by the line's deterministic id, and the view
//! `<database>.invoice_lines` with the current (highest-version) row of each line, so
//! writing the same lines again, or re-rating them, never double-counts. Lines a
//! changed price book no longer makes (a customer removed, a price renamed) are
//! retired: their current row is copied as a `superseded` one, which the view leaves
//! out. A batch run retires the lines of its period it did not make; the streaming
//! rater, the stale lines of open periods it finds after a restart with a new book.
//!
//! ```sql
//! SELECT customer, price, quantity, amount, currency FROM tally.invoice_lines
//! WHERE period_start = '2026-11-01 00:00:00'
//! ```
//!
//! The streaming rater also stores each series' event-time windows in
//! `<database>.window_revisions` (a ReplacingMergeTree versioned by the windows offset)
//! and the view `<database>.window_usage` with each window's latest value, so finance
//! can see when the usage behind a line happened.
//!
//! An adjustment line (late usage of a closed period, billed in a later one) has
//! `adjusts_period` set to that closed period (`YYYY-MM`); other lines have it empty.
//!
//! A database is one pipeline's: `<database>.pipeline_claims` names the topic prefix
//! whose rater claimed it first ([`ClickHouse::claim_for_pipeline`]), as line ids do
//! not name a pipeline. A rater of another prefix is refused it, and so is one on a
//! database of batch runs ([`ClickHouse::replace_period`]), whose row versions would
//! outrank the pipeline's; a batch run is refused a pipeline's database likewise.
//!
//! The SQL runs on ClickHouse 18.16 (Debian's) as well as current releases: plain
//! `DateTime('UTC')`, no `DateTime64`, no `LowCardinality`. Decimal values are stored
//! as the exact text `tally rate` prints (ClickHouse 18.16's JSON input refuses quoted
//! decimals and its `sum` of decimals can overflow silently), with `amount_minor`, the
//! amount in whole minor units, for exact sums in SQL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_schemas::config::{
    ClickHouseCredentials, ClickHouseSettings, DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT,
};
use tally_schemas::records::{InvoiceLine, MeterValue, SeriesKey, SeriesWindows, WindowUsage};
use tally_schemas::time::Period;
use ureq::tls::{parse_pem, Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// Where and why a read or write of ClickHouse failed.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("cannot reach ClickHouse at {url} ({source}); {}", reach_hint(.source))]
    Unreachable { url: String, source: ureq::Error },
    #[error("cannot use {} as clickhouse.ca_file (or TALLY_CLICKHOUSE_CA_FILE): {why}; name a PEM file of the certificate authorities to trust", .path.display())]
    CaFile { path: PathBuf, why: String },
    #[error("clickhouse.ca_file (or TALLY_CLICKHOUSE_CA_FILE) is set, but {url} is not an https:// url; write it with https://, or leave ca_file out")]
    CaFileWithoutTls { url: String },
    #[error("ClickHouse at {url} refused to {what}: HTTP {status}: {body}{}", refusal_hint(self.exception_code()))]
    Refused {
        url: String,
        what: &'static str,
        status: u16,
        /// The exception's code, where ClickHouse's answer names it in a header.
        code: Option<u32>,
        body: String,
    },
    #[error("{0:?} is not a usable database name: {rule}", rule = ClickHouseSettings::DATABASE_NAME_RULE)]
    DatabaseName(String),
    #[error("ClickHouse at {url} returned a row of {table} Tally cannot read ({error}): {row}")]
    Unreadable {
        url: String,
        table: &'static str,
        row: String,
        error: String,
    },
    #[error("ClickHouse database {database} at {url} is a streaming pipeline's (it holds its rater's lines, versioned by windows offsets, or its claim), whose lines a batch run's rows, versioned by the run's start time, would outrank for good; store the run in a database of its own (--clickhouse-database, tally_batch unless given)")]
    PipelineDatabase { url: String, database: String },
    #[error("ClickHouse database {database} at {url} is claimed by the pipeline of topic prefix {owner}, and this rater is of topic prefix {topic_prefix}: two pipelines' lines in one database overwrite each other (a line's id does not name its pipeline). Set [kafka] topic_prefix (TALLY_KAFKA_TOPIC_PREFIX) right, or give this pipeline a database of its own ([clickhouse] database, TALLY_CLICKHOUSE_DATABASE); a pipeline renamed on purpose needs a new database too, as its windows offsets, which version its lines, start again at 0, below the old lines'. A claim made by mistake (a rater started once with a mistyped prefix) before any line was stored is undone with TRUNCATE TABLE {database}.pipeline_claims, the raters stopped")]
    ClaimedByAnotherPipeline {
        url: String,
        database: String,
        owner: String,
        topic_prefix: String,
    },
    #[error("ClickHouse database {database} at {url}: this rater claimed it for topic prefix {topic_prefix} but does not read its claim back {settled:?} later, so it cannot tell whether another pipeline claimed it too. Inserts are not visible to the next read: [clickhouse] url (TALLY_CLICKHOUSE_URL) likely balances over replicas, or the login's profile makes inserts asynchronous; point it at one server, with synchronous inserts")]
    ClaimNotReadBack {
        url: String,
        database: String,
        topic_prefix: String,
        settled: Duration,
    },
    #[error("ClickHouse database {database} at {url} holds lines of `tally rate --clickhouse` runs (versioned by their start time), which would outrank the streaming rater's for good; give the pipeline a database of its own ([clickhouse] database, TALLY_CLICKHOUSE_DATABASE)")]
    BatchDatabase { url: String, database: String },
    #[error("line {id}: amount {amount} {currency} does not fit a 64-bit count of minor units")]
    AmountTooLarge {
        id: String,
        amount: String,
        currency: String,
    },
}

/// The code of the exception in ClickHouse's answer, which says `Code: 60,` (18.16) or
/// `Code: 60.` (current releases), after whatever a proxy put before it.
fn body_exception_code(body: &str) -> Option<u32> {
    let (_, after) = body.split_once("Code: ")?;
    let end = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..end].parse().ok()
}

/// What to check, for the refusals whose fix is Tally's configuration.
fn refusal_hint(code: Option<u32>) -> &'static str {
    match code {
        // UNKNOWN_USER, WRONG_PASSWORD, AUTHENTICATION_FAILED
        Some(192 | 193 | 516) => {
            "; are [clickhouse] user (TALLY_CLICKHOUSE_USER) and TALLY_CLICKHOUSE_PASSWORD right?"
        }
        // READONLY, ACCESS_DENIED
        Some(164 | 497) => {
            "; the login in [clickhouse] user needs CREATE, INSERT and SELECT on the database"
        }
        _ => "",
    }
}

fn reach_hint(error: &ureq::Error) -> &'static str {
    match error {
        ureq::Error::NativeTls(_) | ureq::Error::Tls(_) => {
            "is its certificate signed by an authority Tally trusts (the system's, or clickhouse.ca_file's), for its name?"
        }
        ureq::Error::Timeout(_) => {
            "it did not answer within clickhouse.request_timeout: is it overloaded, or does this request need longer?"
        }
        _ => "is it running?",
    }
}

/// A ClickHouse server and the database Tally writes to.
#[derive(Debug)]
pub struct ClickHouse {
    agent: ureq::Agent,
    /// Whom the agent trusts and how long it waits, kept to make it again when either
    /// changes.
    roots: RootCerts,
    request_timeout: Duration,
    url: String,
    database: String,
    /// Sent as ClickHouse's `X-ClickHouse-User`/`-Key` headers when either is set.
    credentials: ClickHouseCredentials,
}

/// Rows per insert: a batch of a rater far behind (after a long outage) can hold
/// millions, and one insert of them all could outlast the HTTP timeout on every retry.
/// 50,000 lines are about 25 MB of JSON, seconds to send and parse.
const INSERT_ROWS: usize = 50_000;

/// `rated_lines`' columns and types, in order, but for `superseded`. The view shows
/// these; a tombstone copies them.
const COLUMNS: [(&str, &str); 17] = [
    ("id", "String"),
    ("version", "UInt64"),
    ("config_hash", "String"),
    ("customer", "String"),
    ("plan", "String"),
    ("price", "String"),
    ("meter", "String"),
    ("period_start", "DateTime('UTC')"),
    ("period_end", "DateTime('UTC')"),
    ("quantity", "String"),
    ("subtotal", "String"),
    ("discount", "String"),
    ("amount", "String"),
    ("amount_minor", "Int64"),
    ("currency", "String"),
    ("tiers", "String"),
    ("adjusts_period", "String"),
];

/// `window_revisions`' columns and types, in order, but for `version`; the
/// `window_usage` view shows these.
const WINDOW_COLUMNS: [(&str, &str); 9] = [
    ("customer", "String"),
    ("meter", "String"),
    ("dimensions", "String"),
    ("period_start", "DateTime('UTC')"),
    ("adjusts_period", "String"),
    ("window_start", "DateTime('UTC')"),
    ("window_end", "DateTime('UTC')"),
    ("value", "String"),
    ("revision", "UInt64"),
];

/// `line_repricings`' columns and types, in order, but for `version`: a stored line of
/// a month not yet settled that a new price book changed, what it billed before and
/// what the new book bills for the same usage, and the two books, so support can tell
/// why a line changed. One row per line and pair of books (a change made again, after
/// a roll-back, keeps the latest).
const REPRICING_COLUMNS: [(&str, &str); 10] = [
    ("id", "String"),
    ("customer", "String"),
    ("price", "String"),
    ("period_start", "DateTime('UTC')"),
    ("adjusts_period", "String"),
    ("repriced_at", "DateTime('UTC')"),
    ("book_before", "String"),
    ("book_after", "String"),
    ("amount_before", "String"),
    ("amount_after", "String"),
];

/// The lowest version of a batch run's rows: its start in Unix milliseconds, past
/// 10^12 since 2001. The streaming rater's are windows offsets, far below.
const BATCH_VERSIONS_FROM: u64 = 1_000_000_000_000;

/// How long a rater that claimed a database waits before reading the claims again
/// ([`ClickHouse::claim_for_pipeline`]): a claim that sorts before its own was stamped
/// within the same whole second at the latest, so it was made by the end of that
/// second; the second one more is a bet that its insert finishes within it (an insert
/// of one row on one server takes milliseconds), not a guarantee.
const CLAIM_SETTLES: Duration = Duration::from_secs(2);

/// Most lines retired by one statement.
const RETIRE_CHUNK: usize = 2000;

/// One row of `rated_lines`, as JSONEachRow.
#[derive(Serialize)]
struct Row<'a> {
    id: &'a str,
    version: u64,
    config_hash: &'a str,
    customer: &'a str,
    plan: &'a str,
    price: &'a str,
    meter: &'a str,
    period_start: String,
    period_end: String,
    quantity: String,
    subtotal: String,
    discount: String,
    amount: String,
    amount_minor: i64,
    currency: &'a str,
    tiers: String,
    adjusts_period: String,
    /// 1 on a tombstone: the line's current rating is that it is no longer billed.
    superseded: u8,
}

/// One event-time window of a series as the streaming rater stores it, so finance can
/// see when the usage behind a line happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWindow {
    /// Shared by the windows of one usage update.
    pub series: Arc<SeriesKey>,
    /// The period the series' usage is billed in (for late usage of a closed period,
    /// `series.adjusts` names that one).
    pub period_start: DateTime<Utc>,
    pub window: WindowUsage,
    /// The windows offset the row accounts for: a window's latest state has the
    /// highest.
    pub version: u64,
}

/// One row of `window_revisions`, as JSONEachRow.
#[derive(Serialize)]
struct WindowRow<'a> {
    customer: &'a str,
    meter: &'a str,
    dimensions: String,
    period_start: String,
    adjusts_period: String,
    window_start: String,
    window_end: String,
    value: String,
    revision: u64,
    version: u64,
}

/// A stored line a new price book changed: what it billed before, and what the new book
/// bills for the same usage (zero for a line the book retired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repricing {
    pub id: String,
    pub customer: String,
    pub price: String,
    pub period: Period,
    pub adjusts: Option<Period>,
    pub repriced_at: DateTime<Utc>,
    pub book_before: String,
    pub book_after: String,
    pub amount_before: rust_decimal::Decimal,
    pub amount_after: rust_decimal::Decimal,
}

/// One row of `line_repricings`, as JSONEachRow.
#[derive(Serialize)]
struct RepricingRow<'a> {
    id: &'a str,
    customer: &'a str,
    price: &'a str,
    period_start: String,
    adjusts_period: String,
    repriced_at: String,
    book_before: &'a str,
    book_after: &'a str,
    amount_before: String,
    amount_after: String,
    version: u64,
}

/// A row of `line_repricings` as [`ClickHouse::repricings_of`] reads it.
#[derive(Deserialize)]
struct RepricingRead {
    id: String,
    customer: String,
    price: String,
    #[serde(deserialize_with = "period_or_empty")]
    adjusts_period: Option<Period>,
    /// Unix seconds.
    repriced_at: i64,
    book_before: String,
    book_after: String,
    amount_before: rust_decimal::Decimal,
    amount_after: rust_decimal::Decimal,
}

impl ClickHouse {
    /// `url` is the HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub fn new(url: &str, database: &str) -> Result<Self, ClickHouseError> {
        if !ClickHouseSettings::is_database_name(database) {
            return Err(ClickHouseError::DatabaseName(database.to_owned()));
        }
        let roots = RootCerts::PlatformVerifier;
        let request_timeout = DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT;
        Ok(ClickHouse {
            agent: agent(roots.clone(), request_timeout),
            roots,
            request_timeout,
            url: url.trim_end_matches('/').to_owned(),
            database: database.to_owned(),
            credentials: ClickHouseCredentials::default(),
        })
    }

    /// The client of a `[clickhouse]` section: its database, its credentials (the CA
    /// file read now) and its request timeout.
    pub fn configured(settings: &ClickHouseSettings) -> Result<Self, ClickHouseError> {
        Ok(ClickHouse::new(&settings.url, &settings.database)?
            .with_credentials(&settings.credentials)?
            .with_request_timeout(settings.request_timeout))
    }

    /// Authenticates as `credentials.user` (ClickHouse's `default` when `None`), and
    /// over https trusts the authorities of `credentials.ca_file` instead of the
    /// system's.
    pub fn with_credentials(
        mut self,
        credentials: &ClickHouseCredentials,
    ) -> Result<Self, ClickHouseError> {
        if let Some(path) = &credentials.ca_file {
            if !self.url.starts_with("https://") {
                return Err(ClickHouseError::CaFileWithoutTls {
                    url: self.url.clone(),
                });
            }
            self.roots = RootCerts::Specific(Arc::new(authorities(path)?));
            self.agent = agent(self.roots.clone(), self.request_timeout);
        }
        self.credentials = credentials.clone();
        Ok(self)
    }

    /// Fails a request (answer included) that takes longer than `timeout`
    /// ([`DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT`] unless set).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self.agent = agent(self.roots.clone(), timeout);
        self
    }

    /// The database this store reads and writes, for messages.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Creates the database, the tables and the views that do not exist. Only those:
    /// a schema a DBA made beforehand (replicated tables, say) is used as it is, by a
    /// user who may not create anything, as `CREATE ... IF NOT EXISTS` needs the
    /// privilege to create even when there is nothing to do.
    pub fn ensure_schema(&self) -> Result<(), ClickHouseError> {
        let db = &self.database;
        let existing = self.tables()?;
        let missing = |name: &str| !existing.iter().any(|table| table == name);
        if !self.database_exists()? {
            self.execute(
                "create the database",
                &format!("CREATE DATABASE IF NOT EXISTS {db}"),
            )?;
        }
        if missing("rated_lines") {
            self.create_table(
                "create the rated_lines table",
                "rated_lines",
                &format!("{}, superseded UInt8", definitions(&COLUMNS)),
                "period_start, customer, price, id",
            )?;
        }
        // A database made before `superseded` existed: its view, which shows retired
        // lines, goes first, then the table gains the column, then the view below is
        // made anew; a start stopped half way finds one of those steps still to do.
        // ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS.
        let view_dropped = !self.has_column("rated_lines", "superseded")?;
        if view_dropped {
            self.execute(
                "drop the invoice_lines view of an earlier version",
                &format!("DROP TABLE IF EXISTS {db}.invoice_lines"),
            )?;
            self.execute(
                "add the superseded column to rated_lines",
                &format!("ALTER TABLE {db}.rated_lines ADD COLUMN superseded UInt8"),
            )?;
        }
        if missing("pipeline_claims") {
            // Which pipeline's lines the database holds ([`Self::claim_for_pipeline`]).
            self.execute(
                "create the pipeline_claims table",
                &format!(
                    "CREATE TABLE IF NOT EXISTS {db}.pipeline_claims \
                     (topic_prefix String, claimed_at DateTime) \
                     ENGINE = MergeTree ORDER BY (claimed_at, topic_prefix)"
                ),
            )?;
        }
        if missing("line_repricings") {
            // Keyed by the line, its stored figure and the two books: a batch made
            // again (a retry, a new owner of the partition) replaces its row.
            self.create_table(
                "create the line_repricings table",
                "line_repricings",
                &format!("{}, version UInt64", definitions(&REPRICING_COLUMNS)),
                "period_start, customer, id, book_before, book_after, amount_before",
            )?;
        }
        if missing("window_revisions") {
            self.create_table(
                "create the window_revisions table",
                "window_revisions",
                &format!("{}, version UInt64", definitions(&WINDOW_COLUMNS)),
                "period_start, customer, meter, dimensions, adjusts_period, window_start",
            )?;
        }
        if missing("window_usage") {
            let window_names: Vec<&str> = WINDOW_COLUMNS.iter().map(|(name, _)| *name).collect();
            let columns = window_names.join(", ");
            let what = "create the window_usage view";
            self.create_view(what, "window_usage", &columns, "window_revisions", None)?;
        }
        if missing("invoice_lines") || view_dropped {
            let columns = column_names(|name| name.to_owned());
            let (what, current) = ("create the invoice_lines view", Some("superseded = 0"));
            self.create_view(what, "invoice_lines", &columns, "rated_lines", current)?;
        }
        Ok(())
    }

    /// Claims this database for the pipeline of `topic_prefix`, or says whose it is.
    /// Line ids do not name a pipeline, so a second pipeline writing here (a
    /// staging and a production one both on the default database, a prefix mistyped
    /// in one service) would overwrite the first one's lines, whichever's windows
    /// offsets are higher winning. The first claim (by its server time, in whole
    /// seconds, then by prefix) is the owner. A rater that finds none claims it and
    /// reads the claims again only after [`CLAIM_SETTLES`], by when a claim that sorts
    /// before its own is in the table too, so raters of two pipelines claiming at
    /// once agree on the owner (of one server: replicas' clocks and lag are not
    /// covered, and a claim not read back at all is refused as a sign of them). A
    /// database of batch runs is refused too: their versions outrank every offset.
    /// After [`Self::ensure_schema`].
    pub fn claim_for_pipeline(&self, topic_prefix: &str) -> Result<(), ClickHouseError> {
        let db = &self.database;
        let first_claim = || -> Result<Option<String>, ClickHouseError> {
            let answer = self.post(
                "read whose database this is",
                &format!(
                    "SELECT topic_prefix FROM {db}.pipeline_claims \
                     ORDER BY claimed_at, topic_prefix LIMIT 1"
                ),
            )?;
            Ok(answer.lines().next().map(str::to_owned))
        };
        let owner = match first_claim()? {
            Some(owner) => owner,
            None => {
                let batch_lines = self.has_any(
                    "check whose lines the database holds",
                    &format!("rated_lines WHERE version >= {BATCH_VERSIONS_FROM}"),
                )?;
                if batch_lines {
                    return Err(ClickHouseError::BatchDatabase {
                        url: self.url.clone(),
                        database: db.clone(),
                    });
                }
                self.execute(
                    "claim the database for this pipeline",
                    &format!(
                        "INSERT INTO {db}.pipeline_claims VALUES ({}, now())",
                        string_literal(topic_prefix)
                    ),
                )?;
                std::thread::sleep(CLAIM_SETTLES);
                first_claim()?.ok_or_else(|| ClickHouseError::ClaimNotReadBack {
                    url: self.url.clone(),
                    database: db.clone(),
                    topic_prefix: topic_prefix.to_owned(),
                    settled: CLAIM_SETTLES,
                })?
            }
        };
        if owner != topic_prefix {
            return Err(ClickHouseError::ClaimedByAnotherPipeline {
                url: self.url.clone(),
                database: db.clone(),
                owner,
                topic_prefix: topic_prefix.to_owned(),
            });
        }
        Ok(())
    }

    /// Creates `view` of `columns` of `table`'s current rows (for which `filter`
    /// holds). FINAL is in a subquery, so a filter sees merged rows only: filtered
    /// first (as a PREWHERE may be), a retired line would show its older row instead.
    fn create_view(
        &self,
        what: &'static str,
        view: &str,
        columns: &str,
        table: &str,
        filter: Option<&str>,
    ) -> Result<(), ClickHouseError> {
        let db = &self.database;
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        self.execute(
            what,
            &format!(
                "CREATE VIEW IF NOT EXISTS {db}.{view} AS SELECT {columns} \
                 FROM (SELECT * FROM {db}.{table} FINAL){filter}"
            ),
        )
    }

    /// Creates `table` with `columns` as Tally's tables are: a row's latest `version`
    /// replaces the others of its sorting key, partitioned by the month billed.
    fn create_table(
        &self,
        what: &'static str,
        table: &str,
        columns: &str,
        order_by: &str,
    ) -> Result<(), ClickHouseError> {
        self.execute(
            what,
            &format!(
                "CREATE TABLE IF NOT EXISTS {}.{table} ({columns}) \
                 ENGINE = ReplacingMergeTree(version) \
                 PARTITION BY toYYYYMM(period_start) \
                 ORDER BY ({order_by})",
                self.database
            ),
        )
    }

    fn database_exists(&self) -> Result<bool, ClickHouseError> {
        self.counts_any(
            "read the schema",
            &format!(
                "SELECT count() FROM system.databases WHERE name = {}",
                string_literal(&self.database)
            ),
        )
    }

    /// The names of this database's tables and views (none when it does not exist).
    fn tables(&self) -> Result<Vec<String>, ClickHouseError> {
        let answer = self.post(
            "read the schema",
            &format!(
                "SELECT name FROM system.tables WHERE database = {}",
                string_literal(&self.database)
            ),
        )?;
        Ok(answer.lines().map(str::to_owned).collect())
    }

    /// Writes a run's lines of `period`, all with one version, in one insert, then
    /// retires the period's lines the run did not make: each gets a `superseded` row
    /// at this version. A line's row with the highest `version` is current; writing
    /// the same version again replaces nothing and adds nothing to the view.
    /// A database of a streaming pipeline is refused, whether its rater stored lines
    /// there yet or only claimed it: its versions are windows offsets, far below a
    /// run's.
    pub fn replace_period(
        &self,
        version: u64,
        period: Period,
        lines: &[InvoiceLine],
    ) -> Result<(), ClickHouseError> {
        // A pipeline's lines, or a pipeline's claim made before it stored any.
        let streamed = self.has_any(
            "check whose lines the database holds",
            &format!("rated_lines WHERE version < {BATCH_VERSIONS_FROM}"),
        )? || self.has_any(
            "check whether a pipeline claimed the database",
            "pipeline_claims",
        )?;
        if streamed {
            return Err(ClickHouseError::PipelineDatabase {
                url: self.url.clone(),
                database: self.database.clone(),
            });
        }
        let rows: Vec<_> = lines.iter().map(|line| (version, line)).collect();
        self.insert_versioned(&rows)?;
        // The run's own lines are at `version`: only older ones are retired.
        self.supersede(
            "retire the lines this run no longer makes",
            version,
            &format!(
                "period_start = toDateTime('{}', 'UTC')",
                clickhouse_time(period.start())
            ),
            "<",
        )
    }

    /// Whether any line of `period` was ever stored, current or not.
    pub fn has_lines(&self, period: Period) -> Result<bool, ClickHouseError> {
        self.counts_any(
            "check for stored lines of a period",
            &format!(
                "SELECT count() FROM {}.rated_lines WHERE period_start = toDateTime('{}', 'UTC')",
                self.database,
                clickhouse_time(period.start())
            ),
        )
    }

    /// The highest version of each of the lines `ids` name, billed in `from` or later,
    /// among the rows of `rated_lines` that usage wrote, current or not. Lines without
    /// such a row are left out. Opening (zero-usage) rows, at version 0, do not count:
    /// after a loss, one partition's replay writes them for customers no line of its
    /// own has stored yet, other partitions' customers among them, which would hide
    /// those partitions' loss.
    pub fn stored_versions_of(
        &self,
        ids: &[String],
        from: Option<Period>,
    ) -> Result<HashMap<String, u64>, ClickHouseError> {
        #[derive(Deserialize)]
        struct Stored {
            id: String,
            #[serde(deserialize_with = "uint64")]
            newest: u64,
        }
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let listed: Vec<String> = ids.iter().map(|id| string_literal(id)).collect();
        // The months first: they lead the sorting key and the partitioning, so only
        // open months' parts are read.
        let months = from.map_or_else(String::new, |period| {
            format!("{} AND ", billed_from(period))
        });
        let answer = self.post(
            "check that stored lines are there",
            &format!(
                "SELECT id, max(version) AS newest FROM {}.rated_lines \
                 WHERE {months}version > 0 AND id IN ({}) GROUP BY id FORMAT JSONEachRow",
                self.database,
                listed.join(", ")
            ),
        )?;
        let stored: Vec<Stored> = self.rows("rated_lines", &answer)?;
        Ok(stored.into_iter().map(|row| (row.id, row.newest)).collect())
    }

    /// The current lines billed in `from` or later that a price book other than the
    /// one hashed `config_hash` rated (`from: None`: of every period).
    pub fn lines_rated_with_another_book(
        &self,
        config_hash: &str,
        from: Option<Period>,
    ) -> Result<Vec<StoredLine>, ClickHouseError> {
        let db = &self.database;
        // As in `supersede`: the periods are chosen inside FINAL, whether a row is
        // current, live and stale outside it.
        let periods = from.map_or_else(String::new, |period| {
            format!("WHERE {}", billed_from(period))
        });
        let answer = self.post(
            "read the lines an earlier price book rated",
            &format!(
                "SELECT id, customer, price, version, amount, quantity, config_hash, \
                 substring(toString(period_start), 1, 7) AS period, adjusts_period \
                 FROM (SELECT * FROM {db}.rated_lines FINAL {periods}) \
                 WHERE superseded = 0 AND config_hash != {} FORMAT JSONEachRow",
                string_literal(config_hash)
            ),
        )?;
        self.rows("rated_lines", &answer)
    }

    /// The current lines billed in `period` (adjustments of closed periods included),
    /// as `invoice_lines` shows them: one customer's, or every customer's.
    pub fn lines(
        &self,
        period: Period,
        customer: Option<&str>,
    ) -> Result<Vec<InvoiceLine>, ClickHouseError> {
        let billed_in = format!(
            "period_start = toDateTime('{}', 'UTC')",
            clickhouse_time(period.start())
        );
        self.current_lines(&billed_in, customer)
    }

    /// The current adjustment lines of the closed `period` billed in the months after
    /// it: its usage that arrived late. One customer's, or every customer's.
    pub fn adjustments_of(
        &self,
        period: Period,
        customer: Option<&str>,
    ) -> Result<Vec<InvoiceLine>, ClickHouseError> {
        // A line's id names the period it adjusts, so `adjusts_period` is the same in
        // every version of a row and may filter inside FINAL.
        let adjusting = format!(
            "{} AND adjusts_period = {}",
            billed_from(period.next()),
            string_literal(&period.to_string())
        );
        self.current_lines(&adjusting, customer)
    }

    /// The current lines of the rows `filter` (columns a row's versions share) picks,
    /// as `invoice_lines` shows them.
    fn current_lines(
        &self,
        filter: &str,
        customer: Option<&str>,
    ) -> Result<Vec<InvoiceLine>, ClickHouseError> {
        let of_customer = customer
            .map(|c| format!("AND customer = {}", string_literal(c)))
            .unwrap_or_default();
        // `invoice_lines`' rows, read from its table: the sorting key's leading
        // columns filter inside FINAL (which they cannot change), so only the period's
        // (and customer's) rows are merged, not the whole table's as through the view.
        let answer = self.post(
            "read invoice lines",
            &format!(
                "SELECT {} FROM (SELECT * FROM {}.rated_lines FINAL \
                 WHERE {filter} {of_customer}) \
                 WHERE superseded = 0 FORMAT JSONEachRow",
                column_names(|name| match name {
                    "period_start" | "period_end" => format!("toUnixTimestamp({name}) AS {name}"),
                    name => name.to_owned(),
                }),
                self.database,
            ),
        )?;
        let rows: Vec<LineRow> = self.rows("invoice_lines", &answer)?;
        rows.into_iter()
            .map(|row| {
                let unreadable = |error: String| ClickHouseError::Unreadable {
                    url: self.url.clone(),
                    table: "invoice_lines",
                    row: format!("line {}", row.id),
                    error,
                };
                let time = |seconds| unix_time(seconds).map_err(unreadable);
                Ok(InvoiceLine {
                    period_start: time(row.period_start)?,
                    period_end: time(row.period_end)?,
                    tiers: serde_json::from_str(&row.tiers)
                        .map_err(|e| unreadable(format!("tiers: {e}")))?,
                    id: row.id,
                    config_hash: row.config_hash,
                    customer: row.customer,
                    plan: row.plan,
                    price: row.price,
                    meter: row.meter,
                    quantity: row.quantity,
                    subtotal: row.subtotal,
                    discount: row.discount,
                    amount: row.amount,
                    currency: row.currency,
                    adjusts_period: row.adjusts_period,
                })
            })
            .collect()
    }

    /// A customer's stored windows of usage billed in `period`, by series, each
    /// series' in time order (none unless the rater stores windows): `window_usage`'s
    /// rows, read from its table with the filter inside FINAL, as [`ClickHouse::lines`].
    pub fn windows(
        &self,
        period: Period,
        customer: &str,
    ) -> Result<Vec<SeriesWindows>, ClickHouseError> {
        let answer = self.post(
            "read a customer's windows",
            &format!(
                "SELECT meter, dimensions, adjusts_period, \
                 toUnixTimestamp(window_start) AS window_start, \
                 toUnixTimestamp(window_end) AS window_end, value, revision \
                 FROM {}.window_revisions FINAL WHERE customer = {} \
                 AND period_start = toDateTime('{}', 'UTC') \
                 ORDER BY meter, dimensions, adjusts_period, window_start FORMAT JSONEachRow",
                self.database,
                string_literal(customer),
                clickhouse_time(period.start())
            ),
        )?;
        let rows: Vec<WindowRowRead> = self.rows("window_usage", &answer)?;
        let mut series: Vec<SeriesWindows> = Vec::new();
        for row in rows {
            let unreadable = |error: String| ClickHouseError::Unreadable {
                url: self.url.clone(),
                table: "window_usage",
                row: format!(
                    "meter {}, dimensions {}, window from {}",
                    row.meter, row.dimensions, row.window_start
                ),
                error,
            };
            let time = |seconds| unix_time(seconds).map_err(unreadable);
            let window = WindowUsage {
                window_start: time(row.window_start)?,
                window_end: time(row.window_end)?,
                value: MeterValue {
                    value: row.value,
                    latest: None,
                },
                revision: row.revision,
            };
            let group: Vec<String> = serde_json::from_str(&row.dimensions)
                .map_err(|e| unreadable(format!("dimensions: {e}")))?;
            let key = SeriesKey {
                customer: customer.to_owned(),
                meter: row.meter,
                group,
                adjusts: row.adjusts_period,
            };
            match series.last_mut() {
                Some((last, windows)) if **last == key => windows.push(window),
                _ => series.push((Arc::new(key), vec![window])),
            }
        }
        Ok(series)
    }

    /// Each JSONEachRow row of `answer`, read from `table`.
    fn rows<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        answer: &str,
    ) -> Result<Vec<T>, ClickHouseError> {
        answer
            .lines()
            .map(|row| {
                serde_json::from_str(row).map_err(|e| ClickHouseError::Unreadable {
                    url: self.url.clone(),
                    table,
                    row: row.to_owned(),
                    error: e.to_string(),
                })
            })
            .collect()
    }

    /// Retires lines at `version`: each whose current row is live and not newer gets a
    /// `superseded` copy of that row, which the view leaves out.
    pub fn retire<'l>(
        &self,
        version: u64,
        lines: impl IntoIterator<Item = &'l StoredLine>,
    ) -> Result<(), ClickHouseError> {
        let lines: Vec<&StoredLine> = lines.into_iter().collect();
        // Ids are 32 characters: a chunk's query stays well inside ClickHouse's
        // max_query_size (256 KiB by default).
        for chunk in lines.chunks(RETIRE_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|line| string_literal(&line.id)).collect();
            let from = chunk.iter().map(|line| line.period).min().expect("a chunk");
            self.supersede(
                "retire lines the price book no longer makes",
                version,
                &format!(
                    "period_start >= toDateTime('{}', 'UTC') AND id IN ({})",
                    clickhouse_time(from.start()),
                    ids.join(",")
                ),
                "<=",
            )?;
        }
        Ok(())
    }

    /// Retires the lines `chosen` selects whose current row is live and has a version
    /// `compared` (`<` or `<=`) to `version`: each gets a `superseded` copy of that row
    /// at `version`, which the view leaves out. `chosen` may test only what all rows of
    /// a line share (`period_start`, `id`): it is applied inside FINAL, before the
    /// merge. Whether the merged row is current and live is judged outside, where
    /// `version` is the stored one (not the tombstone's new value, as a SELECT alias of
    /// that name would make it).
    fn supersede(
        &self,
        what: &'static str,
        version: u64,
        chosen: &str,
        compared: &str,
    ) -> Result<(), ClickHouseError> {
        let db = &self.database;
        let tombstone = column_names(|name| match name {
            "version" => format!("toUInt64({version})"),
            name => name.to_owned(),
        });
        // Columns by name: a table a DBA made with more columns (an insert time, say)
        // takes the tombstones too.
        let columns = column_names(str::to_owned);
        self.execute(
            what,
            &format!(
                "INSERT INTO {db}.rated_lines ({columns}, superseded) \
                 SELECT {tombstone}, toUInt8(1) \
                 FROM (SELECT * FROM {db}.rated_lines FINAL WHERE {chosen}) \
                 WHERE version {compared} {version} AND superseded = 0"
            ),
        )
    }

    /// Writes lines, each with its own version.
    pub fn insert_versioned(&self, lines: &[(u64, &InvoiceLine)]) -> Result<(), ClickHouseError> {
        let rows = lines.iter().map(|&(version, line)| {
            Ok(Row {
                id: &line.id,
                version,
                config_hash: &line.config_hash,
                customer: &line.customer,
                plan: &line.plan,
                price: &line.price,
                meter: &line.meter,
                period_start: clickhouse_time(line.period_start),
                period_end: clickhouse_time(line.period_end),
                quantity: line.quantity.to_string(),
                subtotal: line.subtotal.to_string(),
                discount: line.discount.to_string(),
                amount: line.amount.to_string(),
                amount_minor: amount_minor(line)?,
                currency: &line.currency,
                tiers: serde_json::to_string(&line.tiers).expect("tiers serialise"),
                adjusts_period: line
                    .adjusts_period
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                superseded: 0,
            })
        });
        // Every line checked before the first insert is sent: one that cannot be
        // stored would fail the batch again on every retry, after the inserts before.
        for (_, line) in lines {
            amount_minor(line)?;
        }
        self.insert_rows("insert rated lines", "rated_lines", rows)
    }

    /// Writes windows, each row with its version.
    pub fn insert_windows<'w>(
        &self,
        windows: impl IntoIterator<Item = &'w StoredWindow>,
    ) -> Result<(), ClickHouseError> {
        let rows = windows.into_iter().map(|stored| {
            let series = &stored.series;
            Ok(WindowRow {
                customer: &series.customer,
                meter: &series.meter,
                dimensions: serde_json::to_string(&series.group).expect("strings serialise"),
                period_start: clickhouse_time(stored.period_start),
                adjusts_period: series.adjusts.map(|p| p.to_string()).unwrap_or_default(),
                window_start: clickhouse_time(stored.window.window_start),
                window_end: clickhouse_time(stored.window.window_end),
                // No trailing zeros: as few decimals as the value has, for casts.
                value: stored.window.value.value.normalize().to_string(),
                revision: stored.window.revision,
                version: stored.version,
            })
        });
        self.insert_rows("insert windows", "window_revisions", rows)
    }

    /// Writes what new price books changed, each row at its version.
    pub fn insert_repricings<'r>(
        &self,
        repricings: impl IntoIterator<Item = &'r (u64, Repricing)>,
    ) -> Result<(), ClickHouseError> {
        let rows = (repricings.into_iter()).map(|(version, r)| {
            Ok(RepricingRow {
                id: &r.id,
                customer: &r.customer,
                price: &r.price,
                period_start: clickhouse_time(r.period.start()),
                adjusts_period: r.adjusts.map(|p| p.to_string()).unwrap_or_default(),
                repriced_at: clickhouse_time(r.repriced_at),
                book_before: &r.book_before,
                book_after: &r.book_after,
                amount_before: r.amount_before.to_string(),
                amount_after: r.amount_after.to_string(),
                version: *version,
            })
        });
        self.insert_rows("insert line repricings", "line_repricings", rows)
    }

    /// What new price books changed of `customer`'s lines billed in `period`, oldest
    /// first.
    pub fn repricings_of(
        &self,
        period: Period,
        customer: &str,
    ) -> Result<Vec<Repricing>, ClickHouseError> {
        let answer = self.post(
            "read line repricings",
            &format!(
                "SELECT id, customer, price, adjusts_period, \
                 toUnixTimestamp(repriced_at) AS repriced_at, book_before, \
                 book_after, amount_before, amount_after \
                 FROM {}.line_repricings FINAL \
                 WHERE period_start = toDateTime('{}', 'UTC') AND customer = {} \
                 ORDER BY repriced_at, id FORMAT JSONEachRow",
                self.database,
                clickhouse_time(period.start()),
                string_literal(customer),
            ),
        )?;
        let read: Vec<RepricingRead> = self.rows("line_repricings", &answer)?;
        Ok((read.into_iter())
            .map(|r| Repricing {
                id: r.id,
                customer: r.customer,
                price: r.price,
                period,
                adjusts: r.adjusts_period,
                repriced_at: DateTime::from_timestamp(r.repriced_at, 0).unwrap_or_default(),
                book_before: r.book_before,
                book_after: r.book_after,
                amount_before: r.amount_before,
                amount_after: r.amount_after,
            })
            .collect())
    }

    /// Inserts `rows` into `table` as JSON, in inserts of at most [`INSERT_ROWS`]
    /// rows. A failure may leave the earlier inserts stored: writing them again is
    /// harmless, as every row carries its id and version.
    fn insert_rows<R: Serialize>(
        &self,
        what: &'static str,
        table: &str,
        rows: impl Iterator<Item = Result<R, ClickHouseError>>,
    ) -> Result<(), ClickHouseError> {
        let query = format!("INSERT INTO {}.{table} FORMAT JSONEachRow", self.database);
        // A profile may skip fields the table lacks: a column dropped by hand would
        // then lose its values silently, where this insert is to be refused.
        let insert = [
            ("query", query.as_str()),
            ("input_format_skip_unknown_fields", "0"),
        ];
        let mut body = Vec::new();
        let mut in_body = 0;
        for row in rows {
            // Plain data: a failure is a bug, never a row written empty.
            serde_json::to_writer(&mut body, &row?).expect("a row serialises");
            body.push(b'\n');
            in_body += 1;
            if in_body == INSERT_ROWS {
                self.send(what, &insert, std::mem::take(&mut body))?;
                in_body = 0;
            }
        }
        if in_body > 0 {
            self.send(what, &insert, body)?;
        }
        Ok(())
    }

    fn execute(&self, what: &'static str, sql: &str) -> Result<(), ClickHouseError> {
        self.post(what, sql).map(drop)
    }

    /// Whether `table` of this database exists and has `column`.
    fn has_column(&self, table: &str, column: &str) -> Result<bool, ClickHouseError> {
        self.counts_any(
            "read the schema",
            &format!(
                "SELECT count() FROM system.columns \
                 WHERE database = {} AND table = {} AND name = {}",
                string_literal(&self.database),
                string_literal(table),
                string_literal(column)
            ),
        )
    }

    /// Whether `rows`, a table of this database with an optional `WHERE` condition, has
    /// a row: the query stops at the first.
    fn has_any(&self, what: &'static str, rows: &str) -> Result<bool, ClickHouseError> {
        self.counts_any(
            what,
            &format!(
                "SELECT count() FROM (SELECT 1 FROM {}.{rows} LIMIT 1)",
                self.database
            ),
        )
    }

    /// Whether the `SELECT count() ...` `sql` counts anything.
    fn counts_any(&self, what: &'static str, sql: &str) -> Result<bool, ClickHouseError> {
        Ok(self.post(what, sql)?.trim() != "0")
    }

    /// Runs one query, sent as the request body (long ones, such as a list of ids, fit
    /// there and not in a URL); returns what ClickHouse answered. It sets nothing, so
    /// a read-only user (`readonly = 1`, which refuses any setting) may run it.
    fn post(&self, what: &'static str, sql: &str) -> Result<String, ClickHouseError> {
        self.send(what, &[], sql.as_bytes().to_vec())
    }

    /// Sends `parameters` in the URL (an insert's `query`) and `body` as the request
    /// body: an insert's rows, or the whole statement.
    fn send(
        &self,
        what: &'static str,
        parameters: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<String, ClickHouseError> {
        let unreachable = |source| ClickHouseError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let mut request = self
            .agent
            .post(&format!("{}/", self.url))
            .query_pairs(parameters.iter().copied());
        let ClickHouseCredentials { user, password, .. } = &self.credentials;
        if user.is_some() || password.is_some() {
            request = request
                .header("X-ClickHouse-User", user.as_deref().unwrap_or("default"))
                .header("X-ClickHouse-Key", password.as_deref().unwrap_or_default());
        }
        let mut response = request.send(&body[..]).map_err(unreachable)?;
        let status = response.status().as_u16();
        // Current releases name the exception's code in a header; 18.16 only in the body.
        let code = (response.headers().get("X-ClickHouse-Exception-Code"))
            .and_then(|code| code.to_str().ok()?.trim().parse().ok());
        // No cap on the answer's size: ureq's default (10 MiB) would fail every check
        // of a large book's stale lines, the same way on every retry.
        let answer = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string();
        if status == 200 {
            return answer.map_err(unreachable);
        }
        let body = answer.unwrap_or_else(|e| format!("(no readable body: {e})"));
        Err(ClickHouseError::Refused {
            url: self.url.clone(),
            what,
            status,
            code,
            body: body.trim().to_owned(),
        })
    }
}

/// A line's amount in minor units, as `rated_lines` stores it.
fn amount_minor(line: &InvoiceLine) -> Result<i64, ClickHouseError> {
    line.amount_minor()
        .ok_or_else(|| ClickHouseError::AmountTooLarge {
            id: line.id.clone(),
            amount: line.amount.to_string(),
            currency: line.currency.clone(),
        })
}

/// The HTTP client: statuses are answers, not errors, and TLS goes through the system's
/// OpenSSL, trusting `roots`.
fn agent(roots: RootCerts, request_timeout: Duration) -> ureq::Agent {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::NativeTls)
        .root_certs(roots)
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(request_timeout))
        .tls_config(tls)
        .build()
        .into()
}

/// The certificates of a PEM file of certificate authorities.
fn authorities(path: &Path) -> Result<Vec<Certificate<'static>>, ClickHouseError> {
    let failed = |why: String| ClickHouseError::CaFile {
        path: path.to_owned(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let mut certificates = Vec::new();
    for item in parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(certificate)) => certificates.push(certificate),
            // Keys, or what a later ureq may read: not an authority.
            Ok(_) => {}
            Err(e) => return Err(failed(format!("it is not PEM ({e})"))),
        }
    }
    if certificates.is_empty() {
        return Err(failed("it holds no PEM certificate".to_owned()));
    }
    Ok(certificates)
}

/// A time the readers select as `toUnixTimestamp`, or why it is not one.
fn unix_time(seconds: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp(seconds, 0).ok_or_else(|| format!("{seconds} is not a time"))
}

/// A row of `invoice_lines` as [`ClickHouse::lines`] reads it.
#[derive(Deserialize)]
struct LineRow {
    id: String,
    config_hash: String,
    customer: String,
    plan: String,
    price: String,
    meter: String,
    /// Unix seconds.
    period_start: i64,
    period_end: i64,
    quantity: rust_decimal::Decimal,
    subtotal: rust_decimal::Decimal,
    discount: rust_decimal::Decimal,
    amount: rust_decimal::Decimal,
    currency: String,
    /// JSON, as written.
    tiers: String,
    #[serde(deserialize_with = "period_or_empty")]
    adjusts_period: Option<Period>,
}

/// A row of `window_usage` as [`ClickHouse::windows`] reads it.
#[derive(Deserialize)]
struct WindowRowRead {
    meter: String,
    /// The series' group values, a JSON array.
    dimensions: String,
    #[serde(deserialize_with = "period_or_empty")]
    adjusts_period: Option<Period>,
    /// Unix seconds.
    window_start: i64,
    window_end: i64,
    value: rust_decimal::Decimal,
    #[serde(deserialize_with = "uint64")]
    revision: u64,
}

/// A stored line, by what identifies it.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredLine {
    pub id: String,
    pub customer: String,
    pub price: String,
    #[serde(deserialize_with = "uint64")]
    pub version: u64,
    /// The amount the row bills.
    pub amount: rust_decimal::Decimal,
    /// The price book that rated it, and the quantity it bills (read only where they
    /// are asked for: [`ClickHouse::lines_rated_with_another_book`]).
    #[serde(default)]
    pub config_hash: String,
    #[serde(default)]
    pub quantity: Option<rust_decimal::Decimal>,
    /// The period the line is billed in.
    pub period: Period,
    /// For an adjustment line, the closed period it adjusts.
    #[serde(rename = "adjusts_period", deserialize_with = "period_or_empty")]
    pub adjusts: Option<Period>,
}

/// A `UInt64` as JSON: ClickHouse quotes 64-bit integers unless told not to (the
/// default changed in 2025), and a read-only user may not tell it.
fn uint64<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(u64),
        Quoted(String),
    }
    match Written::deserialize(deserializer)? {
        Written::Number(n) => Ok(n),
        Written::Quoted(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

/// `adjusts_period` as stored: `YYYY-MM`, or empty.
fn period_or_empty<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Period>, D::Error> {
    match <&str>::deserialize(deserializer)? {
        "" => Ok(None),
        period => period.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// The column list, each name mapped by `select` (a name, or what to select in its place).
fn column_names(select: impl Fn(&str) -> String) -> String {
    COLUMNS
        .iter()
        .map(|(name, _)| select(name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `name type, ...` of a table's columns.
fn definitions(columns: &[(&str, &str)]) -> String {
    let definitions: Vec<String> = (columns.iter())
        .map(|(name, kind)| format!("{name} {kind}"))
        .collect();
    definitions.join(", ")
}

/// ClickHouse's error codes for a request it will refuse however often it is sent: the
/// rows or the query do not fit the table (a column changed or dropped by hand, a
/// type), or the login may not do it. Other refusals (memory, too many parts or
/// queries, a timeout, a replica or keeper away) pass.
const REFUSED_FOR_GOOD: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

impl ClickHouseError {
    /// The code of ClickHouse's exception, where it refused.
    fn exception_code(&self) -> Option<u32> {
        match self {
            ClickHouseError::Refused { code, body, .. } => {
                code.or_else(|| body_exception_code(body))
            }
            _ => None,
        }
    }

    /// Whether ClickHouse answered that the database or a table does not exist
    /// (`UNKNOWN_DATABASE`, `UNKNOWN_TABLE`): dropped while Tally ran.
    pub fn is_missing_table(&self) -> bool {
        matches!(self.exception_code(), Some(60 | 81))
    }

    /// Whether the database belongs to another pipeline or to batch runs, or the url
    /// cannot show whose it is ([`ClickHouse::claim_for_pipeline`]): only an operator
    /// can mend that.
    pub fn is_unusable_for_this_pipeline(&self) -> bool {
        matches!(
            self,
            ClickHouseError::ClaimedByAnotherPipeline { .. }
                | ClickHouseError::BatchDatabase { .. }
                | ClickHouseError::ClaimNotReadBack { .. }
        )
    }

    /// Whether ClickHouse refused the request itself, which no retry changes until the
    /// table, the login or Tally is fixed ([`REFUSED_FOR_GOOD`]).
    pub fn is_refused_for_good(&self) -> bool {
        self.exception_code()
            .is_some_and(|code| REFUSED_FOR_GOOD.contains(&code))
    }
}

/// The condition of rows billed in `period` or later.
fn billed_from(period: Period) -> String {
    format!(
        "period_start >= toDateTime('{}', 'UTC')",
        clickhouse_time(period.start())
    )
}

/// `text` as a ClickHouse string literal, quoted and escaped.
fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A time as ClickHouse's `DateTime('UTC')` reads it.
fn clickhouse_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::{ClickHouse, ClickHouseError};

    #[test]
    fn a_server_that_never_answers_fails_the_request_after_the_request_timeout() {
        // Connections are taken into the listen queue and never read, let alone
        // answered: a server hung mid-query, as far as the client can tell.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client = ClickHouse::new(&url, "tally")
            .unwrap()
            .with_request_timeout(Duration::from_millis(300));
        let (done, answer) = mpsc::channel();
        std::thread::spawn(move || done.send(client.ensure_schema()));
        let error = answer
            .recv_timeout(Duration::from_secs(30))
            .expect("the request waited for an answer past its timeout")
            .unwrap_err();
        assert!(
            matches!(error, ClickHouseError::Unreachable { .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("did not answer within clickhouse.request_timeout"),
            "{error}"
        );
    }

    /// ClickHouse's refusal of an insert, its code in a header or not.
    fn refused_with(code: Option<u32>, body: &str) -> ClickHouseError {
        ClickHouseError::Refused {
            url: "http://ch:8123".to_owned(),
            what: "insert rated lines",
            status: 500,
            code,
            body: body.to_owned(),
        }
    }

    fn refused(body: &str) -> ClickHouseError {
        refused_with(None, body)
    }

    #[test]
    fn a_dropped_database_or_table_is_told_from_other_refusals() {
        // ClickHouse 18.16's words, and a current release's.
        for gone in [
            "Code: 81, e.displayText() = DB::Exception: Database tally doesn't exist, e.what() = DB::Exception",
            "Code: 60. DB::Exception: Table tally.rated_lines does not exist. (UNKNOWN_TABLE)",
            "proxy: upstream answered: Code: 60. DB::Exception: Table tally.rated_lines does not exist.",
        ] {
            assert!(refused(gone).is_missing_table(), "{gone}");
        }
        // Named in the header, whatever the body says.
        assert!(refused_with(Some(60), "{\"exception\": \"...\"}").is_missing_table());
        for other in [
            "Code: 241. DB::Exception: Memory limit exceeded",
            "Code: 605, e.displayText() = something else",
            "Code: 6",
        ] {
            assert!(!refused(other).is_missing_table(), "{other}");
        }
    }

    #[test]
    fn rows_the_table_cannot_take_are_told_from_refusals_that_pass() {
        // ClickHouse 18.16's answer to a value of the wrong type, and a current
        // release's to a column dropped by hand.
        for for_good in [
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected \" before: x\"}: (while read the value of key a): (at row 1)\n, e.what() = DB::Exception",
            "Code: 16. DB::Exception: No such column amount_minor in table tally.rated_lines. (NO_SUCH_COLUMN_IN_TABLE)",
            "Code: 516. DB::Exception: tally: Authentication failed. (AUTHENTICATION_FAILED)",
        ] {
            assert!(refused(for_good).is_refused_for_good(), "{for_good}");
        }
        assert!(refused("Code: 516. DB::Exception: tally: Authentication failed")
            .to_string()
            .ends_with("are [clickhouse] user (TALLY_CLICKHOUSE_USER) and TALLY_CLICKHOUSE_PASSWORD right?"));
        for passing in [
            "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
            "Code: 252, e.displayText() = DB::Exception: Too many parts (300)",
            "Code: 60. DB::Exception: Table tally.rated_lines does not exist. (UNKNOWN_TABLE)",
            "502 Bad Gateway",
        ] {
            assert!(!refused(passing).is_refused_for_good(), "{passing}");
        }
    }
}
