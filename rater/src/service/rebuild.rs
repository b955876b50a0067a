//! A partition's ledger when it is assigned: rebuilt from `<prefix>.windows`.
//!
//! In: the windows partition, from the committed rebuild point up to the committed
//! offset (the lines of those records are stored already), and ClickHouse's stored lines
//! of the partition's open months. Out: the partition's ledger, the periods it opened,
//! and whether ClickHouse lost its lines (then rated again from the topic's beginning)
//! or holds them stale (then its open months are stored again).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::Message;
use serde::de::IgnoredAny;
use tally_runtime::kafka::{client_config, read_partition};
use tally_schemas::time::Period;

use crate::clickhouse::ClickHouseError;
use crate::ledger::{line_open, CrowdedLine, Ledger, CROWDED_LINE_SERIES};

use super::rebuild_point::{FirstOffsets, RebuildPoint};
use super::records::{decode, decode_with_windows, record, Change, WindowsRecord};
use super::{RaterError, Worker, LOST_LINES_SAMPLE, REBUILD_TIMEOUT};

/// A partition's ledger as of its committed offset, and the updates after it.
#[derive(Debug)]
pub(super) struct Rebuilt {
    pub(super) ledger: Ledger,
    pub(super) opened: BTreeSet<Period>,
    pub(super) after_committed: Vec<WindowsRecord<'static>>,
    /// Every customer with usage in the partition's open periods, known to the price
    /// book or not.
    pub(super) customers: HashSet<String>,
    pub(super) first_offsets: FirstOffsets,
    /// Where the partition is read from after the rebuild: the committed offset, or
    /// past the months a replay found already billed.
    pub(super) resume_at: i64,
    /// A replay counted the records up to its last settled month as stored: lines of
    /// open months among them are stored again ([`super::PartitionState::restate_open_months`]).
    pub(super) restate_open_months: bool,
}

impl Rebuilt {
    /// Adds a record whose lines are stored already to the ledger.
    pub(super) fn stored<W>(&mut self, change: Change<'_, W>, offset: i64) {
        match change {
            Change::Usage(update) => {
                self.opened.extend(update.periods());
                self.first_offsets.note(&update, offset);
                record(&mut self.ledger, &update, offset);
            }
            Change::Settled(period) => {
                // Rated and let go now: a rebuild holds open periods only. Its lines
                // were stored already, so only a failure to rate one is news.
                self.ledger.settle_through(period);
                let (_, failures) = self.ledger.flush_available();
                for error in failures {
                    tracing::warn!(%error, settled = %period, "a settled line could not be rated again while rebuilding; its stored version stands");
                }
                self.first_offsets.settle_through(period);
            }
        }
    }
}

/// A partition this rater takes: its ledger rebuilt to its committed offset, and what
/// the rebuild found of its stored lines.
#[derive(Debug)]
pub(super) struct Taken {
    pub(super) partition: i32,
    /// Where its rebuild ends: the committed offset, or 0 for a replay.
    pub(super) committed: i64,
    /// Its committed lines were stored with another price book.
    pub(super) stored_with_another_book: bool,
    /// The look-up of its stored lines ClickHouse did not answer, made again before
    /// anything of the partition is stored.
    pub(super) lines_unverified: Option<StoredSample>,
    /// Where the lines were found lost: the committed offset, which the partition is
    /// rated again from its beginning up to; else 0.
    pub(super) stored_before_loss: i64,
    pub(super) rebuilt: Rebuilt,
}

/// Lines a partition's committed offset accounts for, taken from its ledger as
/// rebuilt to that offset: what a look-up of its stored lines asks for. Some of them,
/// of which none stored is a loss; and those windows records were seen to change last,
/// each stored after that change, at a higher version than the record's offset (a
/// row's version is the offset its batch accounts for). Compaction can hide a line's
/// last change only where a record of the same series after the committed offset
/// supersedes it, and that record stores the line again.
#[derive(Debug)]
pub(super) struct StoredSample {
    held: Vec<String>,
    /// Line ids, each with the offset of the record seen to change it last.
    newest: Vec<(String, i64)>,
    /// Only lines of open months are looked up (settled ones may be archived).
    oldest_open: Option<Period>,
}

impl StoredSample {
    pub(super) fn of(ledger: &Ledger) -> Self {
        StoredSample {
            held: ledger.line_ids().take(LOST_LINES_SAMPLE).collect(),
            newest: ledger.newest_changes(LOST_LINES_SAMPLE),
            oldest_open: ledger.settled_through().map(|settled| settled.next()),
        }
    }

    /// Every line the look-up asks for, once.
    fn ids(&self) -> Vec<String> {
        let newest = self.newest.iter().map(|(id, _)| id);
        let ids: BTreeSet<&String> = self.held.iter().chain(newest).collect();
        ids.into_iter().cloned().collect()
    }

    /// What ClickHouse holds of the sample, given the highest version usage wrote of
    /// each of its lines that it has.
    fn judge(&self, stored: &HashMap<String, u64>) -> StoredLines {
        if stored.is_empty() {
            return StoredLines::Lost;
        }
        let behind = (self.newest.iter())
            .filter(|(id, changed_at)| {
                let changed_at = u64::try_from(*changed_at).unwrap_or_default();
                stored.get(id).is_none_or(|&version| version <= changed_at)
            })
            .count();
        match behind {
            0 => StoredLines::Current,
            behind => StoredLines::Behind(behind),
        }
    }
}

/// What ClickHouse holds of a partition's [`StoredSample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoredLines {
    /// Every sampled line, at the version that stored its last change or later.
    Current,
    /// This many of the lines changed last missing, or only in versions from before
    /// their last change: ClickHouse is behind the committed offset (a database restored from an older
    /// backup, or the rater wrote to another database meanwhile). The partition's
    /// open months are stored again.
    Behind(usize),
    /// None of the sample's lines: its database dropped or emptied. The partition is
    /// rated again from its beginning.
    Lost,
}

impl Worker {
    /// Reads a windows partition to its end, from the committed `point` if there is
    /// one (its settled periods settled in the ledger from the start), else from its
    /// beginning. Records before `committed` build the ledger the stored lines were
    /// rated from; the later ones are returned to be processed as new. (Reading past
    /// `committed` matters: compaction may have removed a record before it whose newer
    /// version lies after it.)
    pub(super) fn rebuild(
        &self,
        partition: i32,
        committed: i64,
        point: Option<RebuildPoint>,
    ) -> Result<Rebuilt, RaterError> {
        let started = Instant::now();
        let mut rebuilt = Rebuilt {
            ledger: Ledger::new(Arc::clone(&self.config)),
            opened: BTreeSet::new(),
            after_committed: Vec::new(),
            customers: HashSet::new(),
            first_offsets: FirstOffsets::default(),
            resume_at: committed,
            restate_open_months: false,
        };
        if let Some(settled) = point.as_ref().and_then(|point| point.settled_through) {
            rebuilt.ledger.settle_through(settled);
            rebuilt.first_offsets.settle_through(settled);
        }
        let from = point.map_or(0, |point| point.from.min(committed));
        let mut read = 0u64;
        read_partition(
            client_config(&self.kafka),
            &self.topic,
            partition,
            from,
            committed,
            REBUILD_TIMEOUT,
            |message| {
                // Counts a record read and notes whose usage it carries.
                let mut count_record = |customer: Option<&str>| {
                    read += 1;
                    if let Some(customer) = customer.filter(|c| !rebuilt.customers.contains(*c)) {
                        rebuilt.customers.insert(customer.to_owned());
                    }
                };
                if message.offset() >= committed {
                    // Not stored yet: its windows are, with its lines.
                    let Some(change) = decode_with_windows(message, self.store_windows) else {
                        return;
                    };
                    count_record(change.customer());
                    rebuilt.after_committed.push(WindowsRecord {
                        offset: message.offset(),
                        appended_ms: message.timestamp().to_millis(),
                        change: change.into_owned(),
                    });
                    return;
                }
                let Some(change) = decode::<IgnoredAny>(message) else {
                    return;
                };
                count_record(change.customer());
                rebuilt.stored(change, message.offset());
            },
        )?;
        if committed == 0 {
            self.skip_billed_months(partition, &mut rebuilt)?;
        }
        // Marks the lines as stored as of `committed` and lets settled periods go; one
        // that fails to rate stays pending and is retried with its next update.
        let (_, failures) = rebuilt.ledger.flush_available();
        // Lines the records before the committed offset crowded were named when those
        // records were first read, by this rater or an earlier one, maybe weeks ago and
        // out of the logs since: the held ones are summed up once, as memory that runs
        // out runs out again at every restart. Settled months' lines, let go just now,
        // are no sender's news.
        let settled = rebuilt.ledger.settled_through();
        let held: Vec<CrowdedLine> = (rebuilt.ledger.take_crowded().into_iter())
            .filter(|line| line_open(settled, line.period, line.adjusts))
            .collect();
        if let Some(largest) = held.iter().max_by_key(|line| line.series) {
            let lines: HashSet<_> = (held.iter())
                .map(|line| (&line.customer, &line.price, line.period, line.adjusts))
                .collect();
            tracing::warn!(
                partition,
                lines = lines.len(),
                customer = largest.customer,
                price = largest.price,
                period = %largest.period,
                series = largest.series,
                meter = largest.meter,
                example_group = ?largest.example_group,
                least = CROWDED_LINE_SERIES[0],
                "the partition holds lines that sum at least this many usage series each (the one of most named, with the count it reached): see the warning \"an invoice line sums this many usage series\""
            );
        }
        if !failures.is_empty() {
            tracing::warn!(
                partition,
                lines = failures.len(),
                "lines could not be rated while rebuilding; they stay pending"
            );
        }
        tracing::info!(
            partition,
            from,
            records = read,
            lines = rebuilt.ledger.lines_held(),
            after_committed = rebuilt.after_committed.len(),
            seconds = started.elapsed().as_secs_f64(),
            "ledger rebuilt from the windows topic"
        );
        Ok(rebuilt)
    }

    /// Whether ClickHouse holds the lines of `sample` as the committed offset accounts
    /// for them: where it lost them (its database dropped or emptied), or holds older
    /// versions, while the group's offsets stayed, nothing else would write them again
    /// before their usage changes.
    pub(super) fn stored_lines(
        &self,
        sample: &StoredSample,
    ) -> Result<StoredLines, ClickHouseError> {
        let ids = sample.ids();
        if ids.is_empty() {
            return Ok(StoredLines::Current);
        }
        let stored = self
            .clickhouse
            .stored_versions_of(&ids, sample.oldest_open)?;
        Ok(sample.judge(&stored))
    }

    /// Looks up the stored lines of the partitions whose look-up failed when they were
    /// assigned (ClickHouse not answering), by the sample taken then, before anything
    /// of theirs is stored: the first partition whose lines are lost, if any (the
    /// rater stops, and its restart rates it again from the beginning). A partition
    /// ClickHouse is behind on stores its open months again with the next batch. Not
    /// answered again, every one is looked up at the next store.
    pub(super) fn verify_stored_lines(&mut self) -> Result<Option<i32>, ClickHouseError> {
        let mut behind = Vec::new();
        for (&partition, state) in &self.partitions {
            if let Some(sample) = &state.lines_unverified {
                match self.stored_lines(sample)? {
                    StoredLines::Lost => return Ok(Some(partition)),
                    StoredLines::Behind(lines) => behind.push((partition, lines)),
                    StoredLines::Current => {}
                }
            }
        }
        for state in self.partitions.values_mut() {
            state.lines_unverified = None;
        }
        for (partition, lines) in behind {
            self.stored_lines_behind(partition, lines);
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.restate_open_months(partition, self.pending.rows(partition));
            }
        }
        Ok(None)
    }

    /// Says that ClickHouse holds `lines` of `partition`'s sampled lines in versions
    /// older than its committed offset accounts for.
    fn stored_lines_behind(&self, partition: i32, lines: usize) {
        self.metrics.stale_partitions_restated.inc();
        tracing::error!(
            partition,
            lines,
            database = self.clickhouse.database(),
            "ClickHouse holds older versions of lines than the partition's committed offset accounts for (the database restored from an older backup, or a rater wrote to another database meanwhile): the lines of its open months are stored again; lines of its settled months stay as ClickHouse holds them"
        );
    }

    /// Rebuilds `partition`'s ledger up to `committed` (from `point`), and checks that
    /// ClickHouse holds the lines that offset accounts for ([`StoredLines`]): where none
    /// is there (its database dropped or emptied), the partition is rated again from
    /// its beginning; where it holds older versions, its open months are stored again.
    /// Nothing committed, nothing stored: every line is new to this rater; with another
    /// book, stored lines may have other ids, which the price-book check sees to.
    pub(super) fn take(
        &self,
        partition: i32,
        committed: i64,
        point: Option<RebuildPoint>,
    ) -> Result<Taken, RaterError> {
        let another_book = committed > 0
            && point.as_ref().and_then(|p| p.book.as_deref()) != Some(self.book.as_str());
        let rebuilt = self.rebuild(partition, committed, point)?;
        let taken = |committed, lines_unverified, rebuilt| Taken {
            partition,
            committed,
            stored_with_another_book: another_book,
            lines_unverified,
            stored_before_loss: 0,
            rebuilt,
        };
        if committed == 0 || another_book {
            return Ok(taken(committed, None, rebuilt));
        }
        let sample = StoredSample::of(&rebuilt.ledger);
        match self.stored_lines(&sample) {
            Ok(StoredLines::Lost) => {
                self.metrics.lost_line_replays.inc();
                tracing::error!(
                    partition,
                    database = self.clickhouse.database(),
                    "none of the lines the partition's committed offset accounts for is in this ClickHouse database: it was dropped or emptied, or it is not the one they were stored in (this rater's [clickhouse] database mistyped, or not the other raters'); rating the partition again from its beginning with this rater's price book (settled months too, where ClickHouse has no lines of them)"
                );
                let replay = self.rebuild(partition, 0, None)?;
                Ok(Taken {
                    stored_before_loss: committed,
                    ..taken(0, None, replay)
                })
            }
            Ok(StoredLines::Behind(lines)) => {
                self.stored_lines_behind(partition, lines);
                let mut rebuilt = rebuilt;
                rebuilt.restate_open_months = true;
                Ok(taken(committed, None, rebuilt))
            }
            Ok(StoredLines::Current) => Ok(taken(committed, None, rebuilt)),
            Err(error) if error.is_missing_table() => Err(RaterError::TablesGone(error)),
            Err(error) => {
                tracing::warn!(partition, %error, "cannot look the partition's stored lines up in ClickHouse; looked up again before anything of the partition is stored");
                Ok(taken(committed, Some(sample), rebuilt))
            }
        }
    }

    /// A partition with nothing committed (a new group, offsets expired, or reset to
    /// the earliest) whose records settle months ClickHouse already bills: a replay.
    /// Those months stay as they were billed, whatever book this rater has, so the
    /// records through the last settled month's count as stored, as a rebuild counts
    /// them; the open months' usage among them is stored again, as rows of theirs may
    /// be what the replay is for. Into an empty database every record is rated,
    /// settled months included.
    fn skip_billed_months(&self, partition: i32, rebuilt: &mut Rebuilt) -> Result<(), RaterError> {
        let settled_at = |(i, record): (usize, &WindowsRecord<'_>)| match record.change {
            Change::Settled(period) => Some((i, period)),
            Change::Usage(_) => None,
        };
        let records = rebuilt.after_committed.iter().enumerate();
        let last_settled = records.rev().find_map(settled_at);
        let Some((last_settled, period)) = last_settled else {
            return Ok(());
        };
        if !self.clickhouse.has_lines(period)? {
            return Ok(());
        }
        let replayed: Vec<WindowsRecord<'static>> =
            rebuilt.after_committed.drain(..=last_settled).collect();
        rebuilt.resume_at = replayed.last().map_or(0, |record| record.offset + 1);
        rebuilt.restate_open_months = true;
        tracing::info!(
            partition,
            settled_through = %period,
            records = replayed.len(),
            "nothing committed, and ClickHouse bills the months this partition settled: a replay; those months stay as billed"
        );
        for record in replayed {
            rebuilt.stored(record.change, record.offset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(held: &[&str], newest: &[(&str, i64)]) -> StoredSample {
        StoredSample {
            held: held.iter().map(|id| id.to_string()).collect(),
            newest: (newest.iter())
                .map(|&(id, offset)| (id.to_owned(), offset))
                .collect(),
            oldest_open: None,
        }
    }

    fn stored(rows: &[(&str, u64)]) -> HashMap<String, u64> {
        rows.iter().map(|&(id, v)| (id.to_owned(), v)).collect()
    }

    #[test]
    fn a_sample_is_judged_by_the_versions_clickhouse_holds() {
        let sample = sample(&["a", "b"], &[("b", 40), ("c", 50)]);
        assert_eq!(sample.ids(), ["a", "b", "c"]);
        for (rows, judged) in [
            // Stored after each change, or after it again (a crash before the commit).
            (&[("a", 3), ("b", 41), ("c", 90)][..], StoredLines::Current),
            // A version from before a change, or none of a line that has one held
            // elsewhere: a restored backup, a rater on another database meanwhile.
            (
                &[("a", 3), ("b", 40), ("c", 51)][..],
                StoredLines::Behind(1),
            ),
            (&[("a", 3)][..], StoredLines::Behind(2)),
            // Lines of the new month missing where the old month's are there is stale,
            // not lost.
            (&[("a", 3), ("b", 12)][..], StoredLines::Behind(2)),
            // Nothing of the sample: the database dropped or emptied.
            (&[][..], StoredLines::Lost),
        ] {
            assert_eq!(sample.judge(&stored(rows)), judged, "{rows:?}");
        }
    }
}
