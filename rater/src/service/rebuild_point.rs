//! Where a partition's ledger is rebuilt from. In: the offsets of the usage records a
//! partition's ledger took, and the months that settled. Out: a [`RebuildPoint`],
//! committed with the partition's offset as the commit's metadata, and read back by
//! the partition's next owner.
//!
//! A windows partition keeps every month's records (compacted, never deleted), so a
//! rebuild from its beginning reads the pipeline's whole history. A settled month's
//! records can no longer change a line, though: the ledger refuses them. So a rebuild
//! needs only the records from the first one of the oldest open month on, and to know
//! which months have settled; the point says both, and the rebuild's read starts at the
//! oldest unsettled month however old the pipeline is. It also names the price book
//! the partition's lines were stored with, so a next owner with another book knows to
//! re-rate them all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tally_schemas::records::UsageRecord;
use tally_schemas::time::Period;

use crate::ledger::line_open;

/// Where a partition's ledger, as of its committed offset, can be rebuilt from.
/// Fields a later build may add are ignored, so rolling back keeps bounded rebuilds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RebuildPoint {
    /// The first offset of a usage record of a period still open (the committed offset
    /// when there is none): every record before it is of a settled period.
    pub from: i64,
    /// The latest settled period: its usage, and earlier periods', is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_through: Option<Period>,
    /// The hash of the price book the partition's lines were stored with (`None` when
    /// lines another book stored were not re-rated yet, and in a commit of a build
    /// before 2026-12-05's evening, which did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub book: Option<String>,
}

impl RebuildPoint {
    /// As a commit's metadata (well under Kafka's 4,096-byte limit).
    pub fn to_metadata(&self) -> String {
        serde_json::to_string(self).expect("a rebuild point serialises")
    }

    /// From a commit's metadata: `None` when it has none (a commit by a rater of an
    /// earlier build), an error when it cannot be read.
    pub fn from_metadata(metadata: &str) -> Result<Option<Self>, serde_json::Error> {
        if metadata.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(metadata).map(Some)
    }
}

/// The first offset of a usage record of each period, by the period its lines are
/// rated in (the closed one, for an adjustment: its lines go when that one settles).
#[derive(Debug, Default)]
pub(super) struct FirstOffsets(BTreeMap<Period, i64>);

impl FirstOffsets {
    /// Notes a usage record at `offset`; records come in offset order.
    pub fn note<W>(&mut self, update: &UsageRecord<'_, W>, offset: i64) {
        let rated_in =
            (update.series.adjusts).unwrap_or_else(|| Period::containing(update.period_start));
        self.0.entry(rated_in).or_insert(offset);
    }

    /// Forgets `period` and every earlier one: they have settled.
    pub fn settle_through(&mut self, period: Period) {
        self.0 = self.0.split_off(&period.next());
    }

    /// The point of a ledger that settled through `settled_through` and has read up to
    /// `next_offset`, its lines stored with price book `book` (`None`: not all of them).
    pub fn point(
        &self,
        settled_through: Option<Period>,
        next_offset: i64,
        book: Option<String>,
    ) -> RebuildPoint {
        let open = (self.0.iter()).filter(|(period, _)| line_open(settled_through, **period, None));
        RebuildPoint {
            from: open.map(|(_, offset)| *offset).min().unwrap_or(next_offset),
            settled_through,
            book,
        }
    }
}

#[cfg(test)]
mod tests {
    use tally_schemas::records::{MeterValue, SeriesKeyRef};

    use super::*;

    fn month(m: &str) -> Period {
        m.parse().unwrap()
    }

    /// A usage record billed in `billed`, adjusting `adjusts`.
    fn usage(billed: &str, adjusts: Option<&str>) -> UsageRecord<'static, ()> {
        UsageRecord {
            series: SeriesKeyRef {
                customer: "acme".into(),
                meter: "resolutions".into(),
                group: Vec::new(),
                adjusts: adjusts.map(month),
            },
            period_start: month(billed).start(),
            period_to_date: MeterValue {
                value: 1.into(),
                latest: None,
            },
            windows: (),
        }
    }

    #[test]
    fn the_point_moves_past_a_month_once_it_settled() {
        let mut offsets = FirstOffsets::default();
        let from = |offsets: &FirstOffsets, settled: Option<&str>, next: i64| {
            offsets
                .point(settled.map(month), next, Some("b00c".into()))
                .from
        };
        assert_eq!(from(&offsets, None, 0), 0);
        offsets.note(&usage("2026-10", None), 5);
        offsets.note(&usage("2026-10", None), 7);
        offsets.note(&usage("2026-11", None), 9);
        // Late October usage billed in November goes with October's lines.
        offsets.note(&usage("2026-11", Some("2026-10")), 12);
        assert_eq!(
            offsets.point(None, 20, Some("b00c".into())),
            RebuildPoint {
                from: 5,
                settled_through: None,
                book: Some("b00c".into()),
            }
        );
        offsets.settle_through(month("2026-10"));
        assert_eq!(from(&offsets, Some("2026-10"), 21), 9);
        // Usage of a settled month read again (an aggregator replaying) is refused by
        // the ledger, and does not hold the point back.
        offsets.note(&usage("2026-09", None), 22);
        assert_eq!(from(&offsets, Some("2026-10"), 23), 9);
        offsets.settle_through(month("2026-11"));
        assert_eq!(from(&offsets, Some("2026-11"), 30), 30);
    }

    #[test]
    fn points_travel_as_commit_metadata() {
        let point = RebuildPoint {
            from: 1234,
            settled_through: Some(month("2026-10")),
            book: Some("067eb5428611e24d".into()),
        };
        let metadata = point.to_metadata();
        assert_eq!(
            metadata,
            r#"{"from":1234,"settled_through":"2026-10","book":"067eb5428611e24d"}"#
        );
        assert_eq!(RebuildPoint::from_metadata(&metadata).unwrap(), Some(point));
        let unsettled = RebuildPoint {
            from: 0,
            settled_through: None,
            book: Some("067eb5428611e24d".into()),
        };
        assert_eq!(
            RebuildPoint::from_metadata(&unsettled.to_metadata()).unwrap(),
            Some(unsettled)
        );
        // A commit of an earlier build names no book.
        let earlier = RebuildPoint::from_metadata(r#"{"from":9}"#)
            .unwrap()
            .unwrap();
        assert_eq!((earlier.from, earlier.book), (9, None));
        assert_eq!(RebuildPoint::from_metadata("").unwrap(), None);
        assert!(RebuildPoint::from_metadata("checkpoint 7").is_err());
        assert!(RebuildPoint::from_metadata(r#"{"until":2}"#).is_err());
        let later = RebuildPoint::from_metadata(r#"{"from":7,"until":2}"#).unwrap();
        assert_eq!(later.map(|point| point.from), Some(7));
    }
}
