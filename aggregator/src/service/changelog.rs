//! The changelog: each partition's state changes, written in the same transaction as
//! the window updates and the input offsets they account for, so the committed
//! changelog always matches the committed offsets.
//!
//! In (writing): the changes of a drain, or a snapshot of the usage state. Out
//! (restoring): the partition's [`Aggregator`] and the input offset it has accounted
//! for.
//!
//! Records of changelog partition p describe events partition p. A transaction writes
//! its new dedupe keys under `keys/<next offset>/<owner generation>` and its usage
//! changes under `delta/<next offset>/<owner generation>`. Usage is rewritten now and
//! then as a snapshot, `snapshot/<part>`, in parts small enough for a record, after which
//! the deltas it covers (and parts of an older, larger snapshot) are tombstoned. Keys
//! are not rewritten into snapshots: once the per-transaction key records hold a
//! part's worth of keys (fewer if `changelog_snapshot_bytes` is small, or
//! [`MAX_UNGATHERED_KEY_RECORDS`] records), their keys are
//! gathered into `keyset/<next offset>/<owner generation>/<part>` records and the small
//! ones tombstoned, and any key record is tombstoned once every key in it has expired
//! past the dedupe horizon. (Keys are almost all of a partition's state; rewriting them
//! into every snapshot made a snapshot tens of megabytes and stalled its commit.) So
//! compaction keeps the topic near the size of the live keys, one usage snapshot and
//! recent deltas. Restore reads the partition from the beginning: part 0 of a snapshot
//! resets the usage, other parts and deltas are merged, key records are gathered and
//! merged at the end, and a tombstone drops the key record it names. Values are
//! MessagePack (compact, and self-describing as decimals and instants need).
//!
//! A usage record also carries, in header [`METER_DEFINITIONS_HEADER`], the
//! definitions of the meters it holds usage of (JSON, as `tally.toml` names their
//! settings). A restore refuses a state holding usage of a meter the configuration
//! reads otherwise ([`Aggregator::check_definitions`]). A header rather than a field
//! of the value, so that builds from before it read these records as they did.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tally_runtime::kafka::{send, KafkaProducer};

use crate::aggregator::{Aggregator, Snapshot};

use super::{AggregatorError, PartitionState};

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tally_runtime::kafka::{header_value, read_partition};

use crate::meter::MeterDefinition;

/// Header of a usage record: the definitions of the meters whose usage it holds, by
/// slug.
pub(super) const METER_DEFINITIONS_HEADER: &str = "tally.meters";

/// Dedupe keys, or windows, periods and unique counts' values, per snapshot part: 800 KB
/// of keys, a few MB of windows.
pub(super) const SNAPSHOT_PART_ENTRIES: usize = 50_000;

/// Per-transaction records of keys a partition may hold before they are gathered into
/// parts: a restore reads at most this many small records of keys.
pub(super) const MAX_UNGATHERED_KEY_RECORDS: usize = 1_000;

/// One changelog record's value; written from a borrowed snapshot (`C = &Snapshot`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChangelogRecord<C = Snapshot> {
    /// The next offset of the events partition to read once this record is applied.
    pub next_offset: i64,
    pub changes: C,
}

impl<C: Serialize> ChangelogRecord<C> {
    pub fn encode(&self) -> Vec<u8> {
        // Plain data into a Vec: a failure is a bug in a Serialize impl, and an empty
        // record committed in its place would corrupt the changelog for good.
        rmp_serde::to_vec(self).expect("a changelog record serialises")
    }
}

impl ChangelogRecord {
    fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// Keys written in per-transaction records and not gathered into parts yet: those
/// records' names (tombstoned once their keys are gathered) and their keys.
#[derive(Debug, Default)]
pub(super) struct KeyBacklog {
    pub records: Vec<String>,
    pub keys: Vec<Snapshot>,
}

impl KeyBacklog {
    /// Time to gather: `max_keys` keys (at most a part's worth), or many small records.
    pub fn full(&self, max_keys: usize) -> bool {
        let count: usize = self.keys.iter().map(Snapshot::dedupe_len).sum();
        count >= max_keys.min(SNAPSHOT_PART_ENTRIES)
            || self.records.len() >= MAX_UNGATHERED_KEY_RECORDS
    }
}

pub(super) fn delta_key(next_offset: i64, generation: u64) -> String {
    format!("delta/{next_offset:020}/{generation:016x}")
}

pub(super) fn keys_key(next_offset: i64, generation: u64) -> String {
    format!("keys/{next_offset:020}/{generation:016x}")
}

pub(super) fn keyset_key(next_offset: i64, generation: u64, part: usize) -> String {
    format!("keyset/{next_offset:020}/{generation:016x}/{part:06}")
}

/// What a changelog record is, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One transaction's new dedupe keys.
    Keys,
    /// A part of gathered dedupe keys.
    KeySet,
    /// A part of a usage snapshot.
    Snapshot(usize),
    /// One transaction's usage changes.
    Delta,
}

fn kind_of(key: &[u8]) -> Kind {
    if key.starts_with(b"keys/") {
        Kind::Keys
    } else if key.starts_with(b"keyset/") {
        Kind::KeySet
    } else if let Some(part) = snapshot_part(key) {
        Kind::Snapshot(part)
    } else {
        Kind::Delta
    }
}

/// Refuses usage records that carry dedupe keys: a changelog written before keys got
/// records of their own (2026-12-04). Restoring it would lose its keys at the next
/// snapshot and bill retries twice.
fn check_layout(kind: Kind, changes: &Snapshot) -> Result<(), String> {
    match kind {
        Kind::Snapshot(_) | Kind::Delta if changes.dedupe_len() > 0 => Err(
            "a usage record holds dedupe keys: the changelog was written by a build before dedupe keys got records of their own (2026-12-04)".to_owned(),
        ),
        _ => Ok(()),
    }
}

pub(super) fn snapshot_key(part: usize) -> String {
    format!("snapshot/{part:06}")
}

/// The part number of a snapshot key.
fn snapshot_part(key: &[u8]) -> Option<usize> {
    std::str::from_utf8(key.strip_prefix(b"snapshot/")?)
        .ok()?
        .parse()
        .ok()
}

/// What writing a partition's next changelog records needs to know of those already
/// written: the records a snapshot makes obsolete, and the sizes that say when one is
/// due.
#[derive(Debug, Default)]
pub(super) struct ChangelogState {
    /// Keys of the deltas since the last snapshot, to tombstone after the next one.
    pub deltas: Vec<String>,
    /// Records of dedupe keys still live, with the newest event day of their keys:
    /// each is tombstoned once the aggregator has forgotten that day.
    pub key_records: Vec<(String, u16)>,
    /// The per-transaction records of keys among them, gathered into parts now and
    /// then so a partition does not collect one record per transaction for the whole
    /// dedupe horizon.
    pub backlog: KeyBacklog,
    /// Bytes of the deltas since the last snapshot (key records not included: a
    /// snapshot does not rewrite keys).
    pub delta_bytes: usize,
    /// Parts of the last snapshot, so a smaller next one can tombstone the rest.
    pub snapshot_parts: usize,
    /// Size of the last snapshot's records.
    pub last_snapshot_bytes: usize,
}

/// A partition's state as the changelog has it.
#[derive(Debug)]
pub(super) struct Restored {
    pub aggregator: Aggregator,
    /// `None` if the changelog is empty: nothing was ever committed for the partition.
    pub next_offset: Option<i64>,
    pub changelog: ChangelogState,
    pub records: u64,
}

/// Reads changelog partition `partition` to its end (committed records only) and
/// rebuilds the state on aggregators made by `fresh`. `base` carries the brokers and
/// pass-through properties; usage of the `accepted` meters may have been read with
/// another definition ([`Aggregator::check_definitions`]).
pub(super) fn restore(
    fresh: impl Fn() -> Aggregator,
    base: ClientConfig,
    topic: &str,
    partition: i32,
    timeout: Duration,
    accepted: &BTreeSet<String>,
) -> Result<Restored, AggregatorError> {
    let mut restored = Restored {
        aggregator: fresh(),
        next_offset: None,
        changelog: ChangelogState::default(),
        records: 0,
    };
    // Gathered apart from the usage, which a snapshot resets; merged at the end.
    let mut keys: BTreeMap<Vec<u8>, (Kind, Snapshot)> = BTreeMap::new();
    // Of the usage read since the last snapshot began, as its records' headers say.
    let mut definitions: BTreeMap<String, MeterDefinition> = BTreeMap::new();
    let mut corrupt = None;
    // Nothing tells where the changelog ends: `load` reads it again while the state
    // is behind the committed input offsets.
    read_partition(base, topic, partition, 0, 0, timeout, |message| {
        if corrupt.is_some() {
            return;
        }
        restored.records += 1;
        let key = message.key().unwrap_or_default();
        let Some(value) = message.payload() else {
            // A tombstone: the keys it names expired; a delta it names is inside a
            // later snapshot.
            keys.remove(key);
            return;
        };
        let kind = kind_of(key);
        let applied = ChangelogRecord::decode(value)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                check_layout(kind, &record.changes)?;
                restored.next_offset = Some(record.next_offset);
                if let Kind::Keys | Kind::KeySet = kind {
                    keys.insert(key.to_vec(), (kind, record.changes));
                    return Ok(());
                }
                // One this build cannot read (a later build's) is not checked: the
                // usage itself is read all the same.
                let stored = header_value(message, METER_DEFINITIONS_HEADER).and_then(|header| {
                    let read = serde_json::from_slice::<BTreeMap<String, MeterDefinition>>(header);
                    read.inspect_err(|e| tracing::warn!(partition, offset = message.offset(), error = %e, "a changelog record's meter definitions cannot be read; its meters are not checked")).ok()
                });
                if let Kind::Snapshot(part) = kind {
                    if part == 0 {
                        restored.aggregator = fresh();
                        definitions.clear();
                        restored.changelog.deltas.clear();
                        restored.changelog.delta_bytes = 0;
                        restored.changelog.snapshot_parts = 0;
                        restored.changelog.last_snapshot_bytes = 0;
                    }
                    restored.changelog.snapshot_parts += 1;
                    restored.changelog.last_snapshot_bytes += value.len();
                } else {
                    restored
                        .changelog
                        .deltas
                        .push(String::from_utf8_lossy(key).into_owned());
                    restored.changelog.delta_bytes += value.len();
                }
                definitions.extend(stored.into_iter().flatten());
                restored
                    .aggregator
                    .merge(record.changes)
                    .map_err(|e| e.to_string())
            });
        if let Err(problem) = applied {
            corrupt = Some(AggregatorError::CorruptChangelog {
                topic: topic.to_owned(),
                partition,
                offset: message.offset(),
                problem,
            });
        }
    })?;
    if let Some(e) = corrupt {
        return Err(e);
    }
    for (key, (kind, changes)) in keys {
        let key = String::from_utf8_lossy(&key).into_owned();
        if let Some(day) = changes.newest_dedupe_day() {
            restored.changelog.key_records.push((key.clone(), day));
        }
        if kind == Kind::Keys {
            restored.changelog.backlog.keys.push(changes.clone());
            restored.changelog.backlog.records.push(key);
        }
        // Keys only: merging them cannot fail.
        let _ = restored.aggregator.merge(changes);
    }
    let accepted = (restored
        .aggregator
        .check_definitions(&definitions, accepted))
    .map_err(|source| AggregatorError::MeterChanged {
        topic: topic.to_owned(),
        partition,
        source,
    })?;
    for (meter, change) in accepted {
        tracing::warn!(
            partition,
            meter,
            setting = change.setting,
            counted_with = change.stored,
            now = change.configured,
            "the partition holds usage of a meter read otherwise than this price book reads it, kept as counted as [aggregator] accept_redefined_meters lists the meter: its open months are billed partly each way, and tally rate of them gives other quantities with either book; events from now on are read the new way"
        );
    }
    Ok(restored)
}

/// Deletes a changelog record (compaction drops it), in the open transaction.
pub(super) fn tombstone(
    producer: &KafkaProducer,
    topic: &str,
    partition: i32,
    key: &str,
) -> Result<(), KafkaError> {
    send(
        producer,
        BaseRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .key(key.as_bytes()),
    )
}

/// Writes the partition's usage state (no dedupe keys) as the changelog's snapshot, in parts, and
/// tombstones the deltas it covers and any parts of the previous snapshot beyond this
/// one's, in the open transaction.
pub(super) fn write_snapshot(
    producer: &KafkaProducer,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    let parts = state
        .aggregator
        .usage_snapshot()
        .split(SNAPSHOT_PART_ENTRIES);
    let count = parts.len();
    let mut bytes = 0;
    for (i, changes) in parts.into_iter().enumerate() {
        bytes += state.write_changelog(producer, topic, partition, &snapshot_key(i), &changes)?;
    }
    let stale = (count..state.changelog.snapshot_parts).map(snapshot_key);
    for key in state.changelog.deltas.drain(..).chain(stale) {
        tombstone(producer, topic, partition, &key)?;
    }
    tracing::info!(
        partition,
        parts = count,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "changelog snapshot written"
    );
    state.changelog.delta_bytes = 0;
    state.changelog.snapshot_parts = count;
    state.changelog.last_snapshot_bytes = bytes;
    Ok(())
}

impl PartitionState {
    /// By how many bytes the changelog deltas since the last snapshot are past the size
    /// that calls for a new one, if they are: past the setting, and past the last
    /// snapshot's own size, so a large state is not rewritten more often than its
    /// changes would fill it again, and a restore still reads at most about two
    /// snapshots' worth.
    pub(super) fn snapshot_overdue(&self, snapshot_after_bytes: usize) -> Option<usize> {
        self.changelog
            .delta_bytes
            .checked_sub(snapshot_after_bytes.max(self.changelog.last_snapshot_bytes))
            .filter(|&over| over > 0)
    }

    /// Writes the keys of the backlog's small records as parts of up to
    /// [`SNAPSHOT_PART_ENTRIES`] keys and tombstones those records, in the open
    /// transaction. Each key is so written twice at most, not once per snapshot.
    pub(super) fn gather_keys(
        &mut self,
        producer: &KafkaProducer,
        topic: &str,
        partition: i32,
    ) -> Result<(), KafkaError> {
        let backlog = std::mem::take(&mut self.changelog.backlog);
        let gathered = Snapshot::gather_dedupe(backlog.keys);
        for (i, part) in gathered
            .split(SNAPSHOT_PART_ENTRIES)
            .into_iter()
            .enumerate()
        {
            let Some(newest_day) = part.newest_dedupe_day() else {
                continue;
            };
            let key = keyset_key(self.next_offset, self.generation, i);
            self.write_changelog(producer, topic, partition, &key, &part)?;
            self.changelog.key_records.push((key, newest_day));
        }
        let small: BTreeSet<&String> = backlog.records.iter().collect();
        self.changelog
            .key_records
            .retain(|(key, _)| !small.contains(key));
        for key in &backlog.records {
            tombstone(producer, topic, partition, key)?;
        }
        Ok(())
    }

    /// Writes one changelog record for the partition's next offset; returns its size.
    pub(super) fn write_changelog(
        &self,
        producer: &KafkaProducer,
        topic: &str,
        partition: i32,
        key: &str,
        changes: &Snapshot,
    ) -> Result<usize, KafkaError> {
        let record = ChangelogRecord {
            next_offset: self.next_offset,
            changes,
        }
        .encode();
        let mut message = BaseRecord::to(topic)
            .partition(partition)
            .key(key.as_bytes())
            .payload(&record);
        let definitions = self.aggregator.definitions_of(changes);
        let header;
        if !definitions.is_empty() {
            // Plain data with string keys: a failure is a bug.
            header = serde_json::to_vec(&definitions).expect("meter definitions serialise");
            message = message.headers(OwnedHeaders::new().insert(Header {
                key: METER_DEFINITIONS_HEADER,
                value: Some(&header),
            }));
        }
        send(producer, message)?;
        Ok(record.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::config::Config;
    use tally_schemas::event::EventDecoder;

    #[test]
    fn a_record_survives_encoding_with_every_kind_of_state() {
        let config = Config::parse(
            r#"
            [[meters]]
            slug = "tokens"
            event_type = "llm.tokens"
            aggregation = "sum"
            value_property = "$.tokens"
            group_by = { model = "$.model" }
            [[meters]]
            slug = "users"
            event_type = "llm.tokens"
            aggregation = "unique_count"
            value_property = "$.user"
            [[meters]]
            slug = "seats"
            event_type = "llm.tokens"
            aggregation = "latest"
            value_property = "$.tokens"
            "#,
            "test",
        )
        .unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T00:00:00Z")
            .unwrap()
            .to_utc();
        let decoder = EventDecoder::new(&config, now);
        let mut aggregator = Aggregator::streaming(&config);
        for (i, tokens) in ["1.5", "2", "0.25"].iter().enumerate() {
            let line = format!(
                r#"{{"specversion":"1.0","id":"{i}","source":"gw","type":"llm.tokens","subject":"acme","time":"2026-11-0{}T10:00:00Z","data":{{"tokens":{tokens},"model":"m","user":"u{i}"}}}}"#,
                i + 1
            );
            aggregator.apply(&decoder.decode(line.as_bytes()).unwrap());
        }
        let (_, changes) = aggregator.drain();
        let record = ChangelogRecord {
            next_offset: 42,
            changes: changes.clone(),
        };
        let decoded = ChangelogRecord::decode(&record.encode()).unwrap();
        assert_eq!(decoded.next_offset, 42);
        assert_eq!(decoded.changes, changes);
        let mut rebuilt = Aggregator::streaming(&config);
        rebuilt.merge(decoded.changes).unwrap();
        assert_eq!(rebuilt.snapshot(), aggregator.snapshot());

        // Keys go to key records only: a usage record with keys is an older layout.
        let mut usage = aggregator.snapshot();
        let keys = usage.split_off_dedupe();
        assert_eq!(keys.dedupe_len(), 3);
        for key in [keys_key(42, 7), keyset_key(42, 7, 0)] {
            let kind = kind_of(key.as_bytes());
            assert!(check_layout(kind, &keys).is_ok(), "{key}");
        }
        for key in [delta_key(42, 7), snapshot_key(0)] {
            let kind = kind_of(key.as_bytes());
            assert!(check_layout(kind, &usage).is_ok(), "{key}");
            let problem = check_layout(kind, &aggregator.snapshot()).unwrap_err();
            assert!(
                problem.contains("before dedupe keys got records of their own"),
                "{key}: {problem}"
            );
        }
    }
}
