//! The aggregator core: dedupe, then event-time windows per series.
//!
//! In: [`DecodedEvent`]s in arrival order. Out: an [`Outcome`] per event, and on
//! [`Aggregator::drain_updates`] one [`WindowUsage`] per window changed since the last
//! drain, carrying the window's value and its series' period-to-date value. The Kafka
//! aggregator calls `drain_updates` once per transaction; `tally rate` reads
//! [`Aggregator::period_usage`] once at the end. Both see the same state.
//!
//! Late events: the watermark is the newest event time seen. With a horizon set, an
//! event older than `watermark - horizon` is refused as too late, and keys of events
//! that old are forgotten; the two use one number, so a retry is never accepted after
//! its original was forgotten. Without a horizon (batch runs) every key is kept.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use tally_schemas::config::{AggregationKind, Config};
use tally_schemas::event::DecodedEvent;
use tally_schemas::ids::Fingerprinter;
use tally_schemas::records::{EventOrder, MeterValue, SeriesKey, WindowUsage};
use tally_schemas::time::{Period, WindowSize};

use crate::dedupe::{DedupeEntry, DedupeSet, Seen};
use crate::state::{AggState, StateError};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counted in its windows.
    Accepted,
    /// New, but no meter reads its type: remembered for dedupe, billed nowhere.
    Unmetered,
    /// An identical retry of an event already counted.
    Retry,
    /// Same `(source, id)` as an event already counted, different content; dropped.
    Conflict,
    /// Older than the dedupe horizon allows; refused.
    TooLate,
    /// Refused: counting it would break an exact total.
    Refused(StateError),
}

#[derive(Debug, Clone, Copy)]
struct WindowState {
    revision: u64,
    dirty: bool,
}

type SeriesId = u32;

/// Dedupe and window state of one stream (one Kafka partition, or one batch run).
#[derive(Debug, Clone)]
pub struct Aggregator {
    window: WindowSize,
    /// `None` keeps every key (batch runs over a bounded file).
    horizon: Option<Duration>,
    /// Per meter: slug and aggregation, by `MeterId`.
    meters: Vec<(String, AggregationKind)>,
    dedupe: DedupeSet,
    series: Vec<(Arc<SeriesKey>, AggregationKind)>,
    series_by_fingerprint: HashMap<u128, SeriesId>,
    windows: HashMap<(SeriesId, i64), (AggState, WindowState)>,
    periods: HashMap<(SeriesId, Period), AggState>,
    /// Windows changed since the last drain, in the order they first changed.
    dirty: Vec<(SeriesId, i64)>,
    watermark: Option<DateTime<Utc>>,
    /// Keys dated before this day have been forgotten.
    expired_before_day: u16,
}

impl Aggregator {
    /// An aggregator for streaming: keys are kept for the configured dedupe horizon.
    pub fn streaming(config: &Config) -> Self {
        Self::new(config, Some(config.settings.dedupe_horizon))
    }

    /// An aggregator for a batch run over a bounded input: every key is kept, so the
    /// order of the file does not matter.
    pub fn batch(config: &Config) -> Self {
        Self::new(config, None)
    }

    fn new(config: &Config, horizon: Option<Duration>) -> Self {
        Aggregator {
            window: config.settings.window,
            horizon,
            meters: config
                .meters
                .iter()
                .map(|m| (m.slug.clone(), m.aggregation.kind()))
                .collect(),
            dedupe: DedupeSet::new(),
            series: Vec::new(),
            series_by_fingerprint: HashMap::new(),
            windows: HashMap::new(),
            periods: HashMap::new(),
            dirty: Vec::new(),
            watermark: None,
            expired_before_day: 0,
        }
    }

    /// Dedupes one event and adds its readings to their windows and periods.
    pub fn apply(&mut self, event: &DecodedEvent<'_>) -> Outcome {
        if self.is_too_late(event.time) {
            return Outcome::TooLate;
        }
        let order = EventOrder {
            time: event.time,
            key: event.key,
        };
        let period = Period::containing(event.time);
        let window_start = self.window.start_of(event.time.timestamp());
        let mut targets = Vec::with_capacity(event.readings.len());
        for reading in &event.readings {
            let series = self.series_id(&event.subject, reading);
            if let Some(state) = self.periods.get(&(series, period)) {
                if let Err(e) = state.check(reading.value) {
                    return Outcome::Refused(e);
                }
            }
            targets.push((series, reading.value));
        }
        match self.dedupe.observe(event.key, event.payload, day_of(event.time)) {
            Seen::First => {}
            Seen::Retry => return Outcome::Retry,
            Seen::Conflict => return Outcome::Conflict,
        }
        self.advance_watermark(event.time);
        if targets.is_empty() {
            return Outcome::Unmetered;
        }
        for (series, value) in targets {
            let kind = self.series[series as usize].1;
            let (window, state) = self
                .windows
                .entry((series, window_start))
                .or_insert_with(|| {
                    (
                        AggState::empty(kind),
                        WindowState {
                            revision: 0,
                            dirty: false,
                        },
                    )
                });
            // Checked above for the period, which bounds the window; a mismatch cannot
            // happen for readings decoded with this aggregator's configuration.
            if let Err(e) = window.add(value, order) {
                return Outcome::Refused(e);
            }
            if !state.dirty {
                state.dirty = true;
                self.dirty.push((series, window_start));
            }
            let period_state = self
                .periods
                .entry((series, period))
                .or_insert_with(|| AggState::empty(kind));
            if let Err(e) = period_state.add(value, order) {
                return Outcome::Refused(e);
            }
        }
        Outcome::Accepted
    }

    fn is_too_late(&self, time: DateTime<Utc>) -> bool {
        match (self.horizon, self.watermark) {
            (Some(horizon), Some(watermark)) => {
                let horizon = chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
                watermark.checked_sub_signed(horizon).is_some_and(|oldest| time < oldest)
            }
            _ => false,
        }
    }

    fn advance_watermark(&mut self, time: DateTime<Utc>) {
        if self.watermark.is_some_and(|w| w >= time) {
            return;
        }
        self.watermark = Some(time);
        if let Some(horizon) = self.horizon {
            let horizon_days = u16::try_from(horizon.as_secs() / 86_400).unwrap_or(u16::MAX);
            // A key of day d is forgotten once all of day d is older than the horizon.
            let keep_from = day_of(time).saturating_sub(horizon_days);
            if keep_from > self.expired_before_day {
                self.dedupe.expire_before(keep_from);
                self.expired_before_day = keep_from;
            }
        }
    }

    fn series_id(&mut self, customer: &str, reading: &tally_schemas::event::Reading<'_>) -> SeriesId {
        let (slug, kind) = &self.meters[reading.meter.0 as usize];
        let fingerprint = series_fingerprint(customer, slug, reading.group.iter().map(|g| g.as_ref()));
        if let Some(&id) = self.series_by_fingerprint.get(&fingerprint) {
            return id;
        }
        let id = self.series.len() as SeriesId;
        self.series.push((
            Arc::new(SeriesKey {
                customer: customer.to_owned(),
                meter: slug.clone(),
                group: reading.group.iter().map(|g| g.to_string()).collect(),
            }),
            *kind,
        ));
        self.series_by_fingerprint.insert(fingerprint, id);
        id
    }

    /// Every window changed since the last drain, with its series' period-to-date
    /// value, each with its revision incremented.
    pub fn drain_updates(&mut self) -> Vec<WindowUsage> {
        let window_len = chrono::Duration::seconds(i64::from(self.window.seconds()));
        let mut updates = Vec::with_capacity(self.dirty.len());
        for (series, start) in self.dirty.drain(..) {
            let Some((window, state)) = self.windows.get_mut(&(series, start)) else {
                continue;
            };
            state.dirty = false;
            state.revision += 1;
            let window_start = Utc.timestamp_opt(start, 0).single().unwrap_or_default();
            let period = Period::containing(window_start);
            let period_to_date = self
                .periods
                .get(&(series, period))
                .map_or(MeterValue::ZERO, AggState::value);
            updates.push(WindowUsage {
                series: Arc::clone(&self.series[series as usize].0),
                window_start,
                window_end: window_start + window_len,
                window_value: window.value(),
                period_start: period.start(),
                period_to_date,
                revision: state.revision,
            });
        }
        updates
    }

    /// Each series' value over a whole period, for batch rating.
    pub fn period_usage(&self, period: Period) -> Vec<(Arc<SeriesKey>, MeterValue)> {
        let mut usage: Vec<_> = self
            .periods
            .iter()
            .filter(|((_, p), _)| *p == period)
            .map(|((series, _), state)| (Arc::clone(&self.series[*series as usize].0), state.value()))
            .collect();
        usage.sort_by(|a, b| a.0.cmp(&b.0));
        usage
    }

    /// Number of `(source, id)` keys remembered for dedupe.
    pub fn dedupe_keys(&self) -> usize {
        self.dedupe.len()
    }

    /// Heap bytes of the dedupe table.
    pub fn dedupe_bytes(&self) -> usize {
        self.dedupe.allocated_bytes()
    }

    /// Number of windows held.
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        self.watermark
    }

    /// The whole state, for a snapshot. Pending (undrained) updates are not part of it:
    /// take a snapshot right after a drain, as the transaction that carries the updates
    /// commits.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            dedupe: self.dedupe.entries().copied().collect(),
            series: self
                .series
                .iter()
                .map(|(key, kind)| (SeriesKey::clone(key), *kind))
                .collect(),
            windows: self
                .windows
                .iter()
                .map(|(&(series, start), (state, w))| (series, start, state.clone(), w.revision))
                .collect(),
            periods: self
                .periods
                .iter()
                .map(|(&(series, period), state)| (series, period, state.clone()))
                .collect(),
            watermark: self.watermark,
            expired_before_day: self.expired_before_day,
        }
    }

    /// Loads a snapshot into a new aggregator made with the same configuration:
    /// `Aggregator::streaming(&config).restore(snapshot)`.
    pub fn restore(self, snapshot: Snapshot) -> Self {
        let mut aggregator = self;
        aggregator.dedupe = DedupeSet::from_entries(snapshot.dedupe);
        for (key, kind) in snapshot.series {
            let fingerprint =
                series_fingerprint(&key.customer, &key.meter, key.group.iter().map(String::as_str));
            let id = aggregator.series.len() as SeriesId;
            aggregator.series_by_fingerprint.insert(fingerprint, id);
            aggregator.series.push((Arc::new(key), kind));
        }
        for (series, start, state, revision) in snapshot.windows {
            aggregator.windows.insert(
                (series, start),
                (state, WindowState { revision, dirty: false }),
            );
        }
        for (series, period, state) in snapshot.periods {
            aggregator.periods.insert((series, period), state);
        }
        aggregator.watermark = snapshot.watermark;
        aggregator.expired_before_day = snapshot.expired_before_day;
        aggregator
    }
}

fn series_fingerprint<'g>(customer: &str, meter: &str, group: impl Iterator<Item = &'g str>) -> u128 {
    let mut fp = Fingerprinter::new(b"series")
        .part(customer.as_bytes())
        .part(meter.as_bytes());
    for g in group {
        fp = fp.part(g.as_bytes());
    }
    fp.finish()
}

/// Days since 1970-01-01, clamped to what a dedupe entry holds (until year 2149).
fn day_of(time: DateTime<Utc>) -> u16 {
    u16::try_from(time.timestamp().div_euclid(86_400).max(0)).unwrap_or(u16::MAX)
}

/// An aggregator's whole state, serialisable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    dedupe: Vec<DedupeEntry>,
    series: Vec<(SeriesKey, AggregationKind)>,
    windows: Vec<(SeriesId, i64, AggState, u64)>,
    periods: Vec<(SeriesId, Period, AggState)>,
    watermark: Option<DateTime<Utc>>,
    expired_before_day: u16,
}
