//! Every default of tally.toml, in one place. The README's configuration table
//! restates them for people: a change here is a change there. (librdkafka's tunables
//! that Tally sets are the runtime's, beside the client configuration that applies
//! them.)

use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::money::RoundingMode;
use crate::time::WindowSize;

/// How a plan's lines are rounded to the minor unit: `plans.rounding`.
pub const DEFAULT_ROUNDING: RoundingMode = RoundingMode::HalfUp;

/// Length of the event-time tumbling windows usage is grouped into: `[aggregator] window`.
pub const DEFAULT_WINDOW: WindowSize = WindowSize::HOUR;

/// How long, in event time, an event's `(source, id)` is remembered for dedupe, and so
/// the oldest an event may be (relative to the newest event time seen) and still be
/// accepted: `[aggregator] dedupe_horizon`. 35 days covers a calendar month plus a few
/// days of late retries. The two are one setting so that a late retry can never outlive
/// the memory of its original.
pub const DEFAULT_DEDUPE_HORIZON: Duration = Duration::from_secs(35 * 86_400);

/// How far past the wall clock an event's `time` may be before it is rejected as a
/// clock error: `[events] max_future_skew`.
pub const DEFAULT_MAX_FUTURE_SKEW: Duration = Duration::from_secs(5 * 60);

/// `[aggregator] period_close_grace`: how long after a billing period ends (in event
/// time) its usage may still change; later usage is carried into the next period as
/// an adjustment.
pub const DEFAULT_PERIOD_CLOSE_GRACE: Duration = Duration::from_secs(3600);
/// `[aggregator] commit_interval`: how long a Kafka transaction stays open (give or
/// take the reading of one batch, at most about 0.1 s), so about the most an event
/// waits before its window update is visible downstream.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// `[aggregator] changelog_snapshot_bytes`: changelog written since a partition's last
/// snapshot before the next, or the last snapshot's own size if that is larger; bounds
/// restore time at about two snapshots (or this much and one), and snapshots never
/// cost more writing than the changes between them. Small, so that a pipeline whose
/// state is small does not replay months of changes at every restart (at 32 MiB a
/// pipeline of 300 customers wrote its first snapshot after about two years).
pub const DEFAULT_CHANGELOG_SNAPSHOT_BYTES: usize = 4 << 20;
/// `[aggregator] close_idle_after`: none, so periods close by event time (an event past
/// the grace) or by `tally close-period` only. Set, a partition that has read no event
/// for that long closes every period that ended at least the grace and that long ago
/// by writing `tally close-period`'s control record to itself.
pub const DEFAULT_CLOSE_IDLE_AFTER: Option<Duration> = None;
// `[aggregator] accept_redefined_meters`: none (an empty list), so a partition's state
// holding usage of a meter the book reads otherwise than when it was counted is refused.
/// `[aggregator] accept_lost_state`: false, so an aggregator stops rather than count a
/// partition on from part of its usage, where the partition's changelog lost records
/// (it ends before the committed offset) and retention deleted the events that would
/// rebuild them: its open months' lines, billed from all of it, would go down.
pub const DEFAULT_ACCEPT_LOST_STATE: bool = false;
/// `[aggregator] metrics_listen`.
pub const DEFAULT_AGGREGATOR_METRICS_LISTEN: &str = "127.0.0.1:9102";
/// `[rater] flush_interval`: the longest rated lines wait before they are written.
pub const DEFAULT_RATER_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// `[rater] min_insert_interval`: once it has read everything available, the rater
/// writes what it has without waiting for `flush_interval`, but no sooner than this
/// after its previous insert, so it inserts at most five times a second however many
/// aggregators commit (each insert is a part ClickHouse merges later); never more than
/// `flush_interval`, which a shorter one sets it to.
pub const DEFAULT_RATER_MIN_INSERT_INTERVAL: Duration = Duration::from_millis(200);
/// `[rater] price_book_check_interval`: how often a rater checks the stored lines of
/// every partition it holds against its price book again (one ClickHouse query over
/// the open periods' lines), besides when a partition is assigned: lines written with
/// another book by a rater running it meanwhile (a rolling restart) are re-rated within
/// this much time.
pub const DEFAULT_RATER_PRICE_BOOK_CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// `[rater] store_windows`: off, as each usage update's changed windows are several
/// rows for ClickHouse where its lines are at most one (about five times the rows,
/// inserts four to five times as long and a p99 of 2.9 s instead of 1.3 s in the
/// benchmark's month); on, finance sees when the usage behind a line happened
/// (`window_usage`), complete for the months that begin after it was turned on.
pub const DEFAULT_RATER_STORE_WINDOWS: bool = false;
/// `[rater] metrics_listen`.
pub const DEFAULT_RATER_METRICS_LISTEN: &str = "127.0.0.1:9103";
/// `[kafka] brokers`.
pub const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:9092";
/// `[kafka] topic_prefix`.
pub const DEFAULT_TOPIC_PREFIX: &str = "tally";
/// `[kafka] partitions`, for the topics Tally creates.
pub const DEFAULT_PARTITIONS: NonZeroU32 = NonZeroU32::new(6).unwrap();
/// `[kafka] replication_factor`, for the topics Tally creates; use 3 in production.
pub const DEFAULT_REPLICATION_FACTOR: NonZeroU16 = NonZeroU16::MIN;
/// `TALLY_INSTANCE_ID` when neither it nor `HOSTNAME` is set (the `tally` binary falls
/// back from `HOSTNAME` to the kernel's host name, so this is rare): fine for one
/// aggregator; each of several needs its own (two with one id fence each other's
/// transactions).
pub const DEFAULT_INSTANCE_ID: &str = "0";
/// `[clickhouse] url`.
pub const DEFAULT_CLICKHOUSE_URL: &str = "http://127.0.0.1:8123";
/// `[clickhouse] database`.
pub const DEFAULT_CLICKHOUSE_DATABASE: &str = "tally";
/// `[clickhouse] request_timeout`: one request, answer included. An insert is at most
/// 50,000 rows (seconds); the rater's price-book check reads every open line rated with
/// another book in one answer, which for millions of lines can take longer.
pub const DEFAULT_CLICKHOUSE_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// `[ingest] listen`: the HTTP API.
pub const DEFAULT_INGEST_LISTEN: &str = "127.0.0.1:9101";
/// `[ingest] max_body_bytes`: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: NonZeroUsize = NonZeroUsize::new(1 << 20).unwrap();
/// `[ingest] max_batch_events`.
pub const DEFAULT_MAX_BATCH_EVENTS: NonZeroUsize = NonZeroUsize::new(1000).unwrap();
/// `[ingest] rate_limit_per_second`, per API key.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: NonZeroU32 = NonZeroU32::new(100).unwrap();
/// `[ingest] rate_limit_burst`, per API key.
pub const DEFAULT_RATE_LIMIT_BURST: NonZeroU32 = NonZeroU32::new(200).unwrap();

/// Validated runtime settings with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub window: WindowSize,
    pub dedupe_horizon: Duration,
    pub max_future_skew: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: DEFAULT_WINDOW,
            dedupe_horizon: DEFAULT_DEDUPE_HORIZON,
            max_future_skew: DEFAULT_MAX_FUTURE_SKEW,
        }
    }
}
