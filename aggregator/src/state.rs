//! The five aggregations as mergeable states.
//!
//! In: readings of one series, in any order. Out: a [`MeterValue`]. A window holds one
//! state; its period holds another fed by the same readings, because a period's value
//! cannot always be derived from its windows' values (a month's unique count is not the
//! sum of its hours' counts). Every state is order-independent: the same readings in any
//! order give the same value, which is what makes replays and shuffles safe.

use std::collections::HashSet;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_schemas::config::AggregationKind;
use tally_schemas::decimal::add_fitting;
use tally_schemas::event::{EventError, Problem, ReadingValue};
use tally_schemas::records::{EventOrder, MeterValue};

/// Large variants are boxed so that the common ones (count, sum, max) keep a window at
/// 24 bytes of state: a month holds millions of windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggState {
    Count(u64),
    Sum(Decimal),
    Max(Option<Decimal>),
    UniqueCount(Box<HashSet<u64>>),
    Latest(Option<Box<(EventOrder, Decimal)>>),
}

/// A reading that does not fit its meter's state: a number for a count meter and so on.
/// Decoding against the same configuration never produces one; it signals a reading
/// decoded with another configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(
        "reading {0:?} does not fit a {1} meter; was the event decoded with another configuration?"
    )]
    Mismatch(ReadingValue, &'static str),
    #[error("the meter's total would exceed the largest decimal (about 7.9e28), so this event is not counted; send values in a larger unit")]
    Overflow,
}

impl StateError {
    /// The refusal as an event's error, one way for the rejects file and the rejected
    /// topic alike: field `data`, code `refused`, this error's reason.
    pub fn as_event_error(&self) -> EventError {
        EventError {
            field: "data".to_owned(),
            problem: Problem::Refused(self.to_string()),
        }
    }
}

impl AggState {
    pub fn empty(kind: AggregationKind) -> Self {
        match kind {
            AggregationKind::Count => AggState::Count(0),
            AggregationKind::Sum => AggState::Sum(Decimal::ZERO),
            AggregationKind::Max => AggState::Max(None),
            AggregationKind::UniqueCount => AggState::UniqueCount(Box::default()),
            AggregationKind::Latest => AggState::Latest(None),
        }
    }

    /// The aggregation this state belongs to.
    pub fn kind(&self) -> AggregationKind {
        match self {
            AggState::Count(_) => AggregationKind::Count,
            AggState::Sum(_) => AggregationKind::Sum,
            AggState::Max(_) => AggregationKind::Max,
            AggState::UniqueCount(_) => AggregationKind::UniqueCount,
            AggState::Latest(_) => AggregationKind::Latest,
        }
    }

    /// Checks that `add` would succeed, without changing anything, so an event with
    /// several readings is applied all or nothing.
    pub fn check(&self, value: ReadingValue) -> Result<(), StateError> {
        match (self, value) {
            (AggState::Count(_), ReadingValue::Event) => Ok(()),
            (AggState::Sum(total), ReadingValue::Number(n)) => add_fitting(*total, n)
                .map(|_| ())
                .ok_or(StateError::Overflow),
            (AggState::Max(_) | AggState::Latest(_), ReadingValue::Number(_))
            | (AggState::UniqueCount(_), ReadingValue::Distinct(_)) => Ok(()),
            (state, value) => Err(StateError::Mismatch(value, state.kind().as_str())),
        }
    }

    /// Whether the state already counts `value`, so adding it would change nothing: a
    /// distinct value a unique count has seen. Other states change with every reading.
    pub fn counts(&self, value: ReadingValue) -> bool {
        match (self, value) {
            (AggState::UniqueCount(set), ReadingValue::Distinct(fp)) => set.contains(&fp),
            _ => false,
        }
    }

    /// Adds one reading; [`AggState::check`] tells beforehand whether it will succeed.
    pub fn add(&mut self, value: ReadingValue, order: EventOrder) -> Result<(), StateError> {
        match (self, value) {
            (AggState::Count(n), ReadingValue::Event) => *n += 1,
            (AggState::Sum(total), ReadingValue::Number(v)) => {
                *total = add_fitting(*total, v).ok_or(StateError::Overflow)?;
            }
            (AggState::Max(max), ReadingValue::Number(v)) => {
                *max = Some(max.map_or(v, |m| m.max(v)));
            }
            (AggState::UniqueCount(set), ReadingValue::Distinct(fp)) => {
                set.insert(fp);
            }
            (AggState::Latest(latest), ReadingValue::Number(v)) => match latest {
                Some(held) if held.0 >= order => {}
                Some(held) => **held = (order, v),
                None => *latest = Some(Box::new((order, v))),
            },
            (state, value) => return Err(StateError::Mismatch(value, state.kind().as_str())),
        }
        Ok(())
    }

    /// What a drain's changes carry of this state: all of it, but of a unique count only
    /// `added()`, the values it read since the last drain ([`AggState::merge`] adds
    /// them to the set held). A month's set can hold millions of values; writing it
    /// whole with every change would make each commit's changes grow with the month.
    pub fn change(&self, added: impl FnOnce() -> HashSet<u64>) -> AggState {
        match self {
            AggState::UniqueCount(_) => AggState::UniqueCount(Box::new(added())),
            state => state.clone(),
        }
    }

    /// How many distinct values a unique count holds (0 for the other states).
    pub fn distinct_len(&self) -> usize {
        match self {
            AggState::UniqueCount(set) => set.len(),
            _ => 0,
        }
    }

    /// Takes a unique count's values out, in states of at most `most` values each, which
    /// [`AggState::merge`] adds back; the other states give none and keep theirs.
    pub fn take_distinct(&mut self, most: usize) -> Vec<AggState> {
        let AggState::UniqueCount(set) = self else {
            return Vec::new();
        };
        let values: Vec<u64> = std::mem::take(&mut **set).into_iter().collect();
        (values.chunks(most.max(1)))
            .map(|chunk| AggState::UniqueCount(Box::new(chunk.iter().copied().collect())))
            .collect()
    }

    /// Takes in `later`, a later state of the same readings or a drain's change of it:
    /// it replaces this one, but a unique count's values are added to the set held (a
    /// change carries only the new ones; a set only grows, so adding a whole set, as
    /// a snapshot holds it, is the same as taking it).
    pub fn merge(&mut self, later: AggState) {
        if let (AggState::UniqueCount(held), AggState::UniqueCount(added)) = (&mut *self, &later) {
            held.extend(added.iter());
            return;
        }
        *self = later;
    }

    pub fn value(&self) -> MeterValue {
        let (value, latest) = match self {
            AggState::Count(n) => (Decimal::from(*n), None),
            AggState::Sum(total) => (*total, None),
            AggState::Max(max) => (max.unwrap_or_default(), None),
            AggState::UniqueCount(set) => (Decimal::from(set.len()), None),
            AggState::Latest(latest) => (
                latest.as_ref().map(|held| held.1).unwrap_or_default(),
                latest.as_ref().map(|held| held.0),
            ),
        };
        MeterValue {
            value: value.normalize(),
            latest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use tally_schemas::ids::EventKey;

    fn order(secs: i64, id: u64) -> EventOrder {
        EventOrder {
            time: Utc.timestamp_opt(secs, 0).unwrap(),
            key: EventKey::new("s", &id.to_string()),
        }
    }

    fn fold(kind: AggregationKind, readings: &[(ReadingValue, EventOrder)]) -> MeterValue {
        let mut state = AggState::empty(kind);
        for (v, o) in readings {
            state.add(*v, *o).unwrap();
        }
        state.value()
    }

    #[test]
    fn each_aggregation_gives_its_value() {
        let n = |s: &str| ReadingValue::Number(s.parse().unwrap());
        let readings = [
            (n("5.001"), order(10, 1)),
            (n("2"), order(30, 2)),
            (n("7"), order(20, 3)),
        ];
        assert_eq!(
            fold(AggregationKind::Sum, &readings).value.to_string(),
            "14.001"
        );
        assert_eq!(fold(AggregationKind::Max, &readings).value.to_string(), "7");
        let latest = fold(AggregationKind::Latest, &readings);
        assert_eq!(latest.value.to_string(), "2");
        assert_eq!(latest.latest, Some(order(30, 2)));
        let distinct = [
            (ReadingValue::Distinct(1), order(1, 1)),
            (ReadingValue::Distinct(2), order(1, 2)),
            (ReadingValue::Distinct(1), order(1, 3)),
        ];
        assert_eq!(
            fold(AggregationKind::UniqueCount, &distinct)
                .value
                .to_string(),
            "2"
        );
        let events = [
            (ReadingValue::Event, order(1, 1)),
            (ReadingValue::Event, order(1, 2)),
        ];
        assert_eq!(fold(AggregationKind::Count, &events).value.to_string(), "2");
        assert_eq!(
            AggState::empty(AggregationKind::Max).value(),
            MeterValue::ZERO
        );
    }

    #[test]
    fn common_states_stay_small() {
        assert!(std::mem::size_of::<AggState>() <= 24);
    }

    #[test]
    fn a_reading_of_the_wrong_kind_is_refused() {
        let mut state = AggState::empty(AggregationKind::Count);
        assert!(state
            .add(ReadingValue::Number(Decimal::ONE), order(0, 0))
            .is_err());
        assert_eq!(state, AggState::Count(0));
    }

    #[test]
    fn sum_past_the_largest_decimal_is_refused_and_a_long_one_rounded() {
        let mut state = AggState::Sum(Decimal::MAX);
        assert_eq!(
            state.check(ReadingValue::Number(Decimal::ONE)),
            Err(StateError::Overflow)
        );
        assert_eq!(
            state.add(ReadingValue::Number(Decimal::ONE), order(0, 0)),
            Err(StateError::Overflow)
        );
        assert_eq!(state, AggState::Sum(Decimal::MAX));

        // Within range, a sum that needs more digits than a decimal holds is counted,
        // rounded at its last digit: the event is billed, not refused.
        let mut big = AggState::Sum(Decimal::from(5000));
        let precise = ReadingValue::Number("0.1234567890123456789012345678".parse().unwrap());
        assert_eq!(big.check(precise), Ok(()));
        assert_eq!(big.add(precise, order(0, 0)), Ok(()));
        let rounded = "5000.1234567890123456789012346".parse().unwrap();
        assert_eq!(big, AggState::Sum(rounded));
    }

    proptest! {
        /// Every aggregation gives the same value whatever the order of its readings,
        /// including `latest` when several readings share a time.
        #[test]
        fn aggregation_is_order_independent(
            raw in proptest::collection::vec((0u32..1000, 0i64..5), 1..60),
            seed in any::<u64>(),
        ) {
            let readings: Vec<(ReadingValue, EventOrder)> = raw
                .iter()
                .enumerate()
                .map(|(id, &(v, t))| {
                    (ReadingValue::Number(Decimal::new(i64::from(v), 2)), order(t, id as u64))
                })
                .collect();
            let mut shuffled = readings.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            for kind in [AggregationKind::Sum, AggregationKind::Max, AggregationKind::Latest] {
                prop_assert_eq!(fold(kind, &readings), fold(kind, &shuffled));
            }
        }
    }
}
