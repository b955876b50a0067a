//! The aggregator core: dedupe, then event-time windows per series.
//!
//! In: [`DecodedEvent`]s in arrival order. Out: an [`Outcome`] per event, and on
//! [`Aggregator::drain_updates`] one [`UsageUpdate`] per series and period changed
//! since the last drain, carrying the series' period-to-date value and the values of
//! the windows that changed. The Kafka aggregator calls [`Aggregator::drain`] (the
//! updates and the state changes behind them) once per transaction; `tally rate` reads
//! [`Aggregator::period_usage`] once at the end. Both see the same state.
//!
//! State changes: a streaming aggregator also hands out, with each drain, a [`Snapshot`]
//! of only what changed since the previous drain (new dedupe keys, changed windows and
//! their series' periods, the watermark; of a unique count, only the values it counted
//! since, not the period's whole set, which can run to millions). The Kafka aggregator
//! writes it to its changelog in the same transaction as the updates;
//! [`Aggregator::merge`] applied to the changes in order rebuilds the state.
//!
//! Period close (streaming, when set): a period closes once the watermark passes its
//! end plus a grace, or once [`Aggregator::close_through`] closes it (finance closing
//! a month, through a control record in the events topic, also where a partition has
//! had no newer events to move its watermark). Usage of a closed period that still arrives (within the horizon)
//! is not added to it: it is booked into the earliest open period, as a series of its
//! own whose key names the closed period ([`SeriesKey::adjusts`]), windowed at that
//! period's start. Closed periods never change; the rater prices the adjustment. A
//! unique count's adjustment leaves out values the closed period counted, so the two
//! add up to the count of their union.
//!
//! Late events: the watermark is the newest event time seen. With a horizon set, an
//! event older than `watermark - horizon` is refused as too late, and keys of events
//! that old are forgotten; the two use one number, so a retry is never accepted after
//! its original was forgotten. Without a horizon (batch runs) every key is kept. A
//! period whose end is that far behind has settled: its state and its adjustments' are
//! let go, and [`Aggregator::take_settled`] tells a store it can let go of them too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use tally_schemas::config::{AggregationKind, Config, MeterId};
use tally_schemas::event::{DecodedEvent, ReadingValue};
use tally_schemas::ids::SeriesFingerprint;
use tally_schemas::records::{
    EventOrder, MeterValue, SeriesKey, SeriesWindows, UsageUpdate, WindowUsage,
};
use tally_schemas::time::{Period, WindowSize};

use crate::dedupe::{DedupeEntry, DedupeSet, Seen};
use crate::meter::{DefinitionChange, MeterDefinition};
use crate::state::{AggState, StateError};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counted in its windows.
    Accepted,
    /// Counted, in a window before the newest one: a late event that revises a window
    /// already emitted.
    Late,
    /// Counted as an adjustment: its period had closed, so its usage was carried into
    /// the earliest open period.
    Adjusted,
    /// No meter reads its type: billed nowhere, and not remembered for dedupe (a replay
    /// under a price book with a meter for it counts it then).
    Unmetered,
    /// An identical retry of an event already counted.
    Retry,
    /// Same `(source, id)` as an event already counted, different content; dropped.
    Conflict,
    /// Older than the dedupe horizon allows, or of a day whose keys are forgotten;
    /// refused.
    TooLate,
    /// Refused: counting it would break an exact total.
    Refused(StateError),
}

/// Per reading of an event: its series if it exists, and whether the reading adds
/// anything to it. One reading is the common case.
type KnownReadings = SmallVec<[(Option<SeriesId>, bool); 1]>;

/// One tumbling window of a series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    /// Unix seconds.
    start: i64,
    state: AggState,
    /// Emissions so far.
    revision: u64,
    /// Changed since the last drain.
    #[serde(skip)]
    dirty: bool,
}

impl Window {
    /// The window as records carry it, `length` long.
    fn usage(&self, length: chrono::Duration) -> WindowUsage {
        let window_start = Utc
            .timestamp_opt(self.start, 0)
            .single()
            .unwrap_or_default();
        WindowUsage {
            window_start,
            window_end: window_start + length,
            value: self.state.value(),
            revision: self.revision,
        }
    }
}

type SeriesId = u32;

/// One customer's usage of one meter for one combination of group_by values.
#[derive(Debug, Clone)]
struct Series {
    key: Arc<SeriesKey>,
    meter: MeterId,
    kind: AggregationKind,
    /// The series' state per billing period; rarely more than one is open, and keeping
    /// it inline saves a memory access per event.
    periods: SmallVec<[(Period, AggState); 1]>,
    /// Sorted by start. Events arrive roughly in time order, so the window an event
    /// belongs to is nearly always the last one: a series-local sorted list finds it
    /// without touching a large shared hash table.
    windows: Vec<Window>,
    /// The slot [`Series::window_slot`] returned last.
    recent: usize,
}

impl Series {
    /// The index of the window starting at `start`, created if missing. In arrival
    /// order an event's window is nearly always the newest one; late usage arriving in
    /// order (a backfill, a replay) is in the window used last or the one after it.
    fn window_slot(&mut self, start: i64) -> usize {
        let newest = self.windows.len().checked_sub(1);
        let slot = match self.windows.last() {
            // A new newest window, the commonest miss: no search needed.
            None => Some(self.push_window(start)),
            Some(last) if last.start < start => Some(self.push_window(start)),
            Some(_) => [newest, Some(self.recent), Some(self.recent + 1)]
                .into_iter()
                .flatten()
                .find(|&s| self.windows.get(s).is_some_and(|w| w.start == start)),
        };
        let slot =
            slot.unwrap_or_else(
                || match self.windows.binary_search_by_key(&start, |w| w.start) {
                    Ok(slot) => slot,
                    Err(slot) => {
                        self.windows.insert(slot, Window::new(start, self.kind));
                        slot
                    }
                },
            );
        self.recent = slot;
        slot
    }

    fn push_window(&mut self, start: i64) -> usize {
        self.windows.push(Window::new(start, self.kind));
        self.windows.len() - 1
    }

    fn period_state(&self, period: Period) -> Option<&AggState> {
        self.periods
            .iter()
            .find(|(p, _)| *p == period)
            .map(|(_, state)| state)
    }

    fn period_slot(&mut self, period: Period) -> usize {
        match self.periods.iter().position(|(p, _)| *p == period) {
            Some(slot) => slot,
            None => {
                self.periods.push((period, AggState::empty(self.kind)));
                self.periods.len() - 1
            }
        }
    }
}

impl Window {
    fn new(start: i64, kind: AggregationKind) -> Self {
        Window {
            start,
            state: AggState::empty(kind),
            revision: 0,
            dirty: false,
        }
    }
}

/// Dedupe and window state of one stream (one Kafka partition, or one batch run).
#[derive(Debug, Clone)]
pub struct Aggregator {
    window: WindowSize,
    /// `None` keeps every key (batch runs over a bounded file).
    horizon: Option<Duration>,
    /// How long after its end a period closes; `None`: periods never close.
    period_close_grace: Option<chrono::Duration>,
    /// Periods ending at or before this have been closed, explicitly or by an earlier
    /// watermark, whatever the grace is now.
    closed_before: Option<DateTime<Utc>>,
    /// Per meter, by `MeterId`: its slug and what it reads, which restored state must
    /// have been built with.
    meters: Vec<(String, MeterDefinition)>,
    /// Per meter, by `MeterId`: how many series hold its usage. Asked at every commit
    /// ([`Aggregator::held_fingerprints`]), where counting the series would cost.
    held_series: Vec<usize>,
    dedupe: DedupeSet,
    series: Vec<Series>,
    /// Finds a series by the fingerprint the decoder computed.
    series_index: HashTable<(SeriesFingerprint, SeriesId)>,
    /// Windows changed since the last drain: series, window start, and the window's
    /// slot when it changed (a hint: later inserts may move it). Not kept in batch runs,
    /// which read whole periods instead.
    dirty: Vec<(SeriesId, i64, usize)>,
    /// Distinct values read since the last drain, with their series, period and window
    /// start: a drain's changes carry these of a unique count (some may have been
    /// counted before; adding them again changes nothing). Not kept in batch runs, like
    /// `dirty`.
    distinct_added: Vec<(SeriesId, Period, i64, u64)>,
    track_updates: bool,
    /// Keys first seen since the last drain, for the changes it hands out.
    new_keys: Vec<DedupeEntry>,
    watermark: Option<DateTime<Utc>>,
    /// Keys dated before this day have been forgotten.
    expired_before_day: u16,
    /// Windows starting before this (Unix seconds) have been let go.
    settled_before: i64,
    /// Every period up to this one has settled (see [`Aggregator::take_settled`]).
    settled_through: Option<Period>,
    /// `settled_through` as [`Aggregator::take_settled`] last handed it out.
    settled_taken: Option<Period>,
}

impl Aggregator {
    /// An aggregator for streaming: keys are kept for the configured dedupe horizon.
    pub fn streaming(config: &Config) -> Self {
        Self::new(config, Some(config.settings.dedupe_horizon))
    }

    /// An aggregator for a batch run over a bounded input of about `expected_events`:
    /// every key is kept, so the order of the file does not matter, and results are
    /// read with [`Aggregator::period_usage`] rather than drained as updates.
    pub fn batch(config: &Config, expected_events: usize) -> Self {
        let mut aggregator = Self::new(config, None);
        aggregator.dedupe = DedupeSet::with_capacity(expected_events);
        aggregator.track_updates = false;
        aggregator
    }

    /// Closes each period `grace` after its end (in event time); later usage of it
    /// becomes an adjustment in the earliest open period.
    pub fn with_period_close(mut self, grace: Duration) -> Self {
        self.period_close_grace =
            Some(chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX));
        self
    }

    /// Closes `period` and every period before it now, whatever the watermark: their
    /// usage arriving from here on becomes an adjustment in the period after `period`
    /// (or a later open one).
    pub fn close_through(&mut self, period: Period) {
        self.closed_before = self.closed_before.max(Some(period.end()));
    }

    /// Every period ending at or before this is closed: the watermark less the grace,
    /// or an explicit close if that is later. `None` before the first event, or when
    /// periods never close.
    pub fn closed_before(&self) -> Option<DateTime<Utc>> {
        let by_watermark = self
            .period_close_grace
            .zip(self.watermark)
            // A grace reaching back past the calendar's start closes nothing.
            .map(|(grace, watermark)| {
                (watermark.checked_sub_signed(grace)).unwrap_or(DateTime::<Utc>::MIN_UTC)
            });
        by_watermark.max(self.closed_before)
    }

    /// The newest event time seen, if any.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        self.watermark
    }

    /// The open period usage of `period` goes to instead, if `period` has closed.
    fn carried_into(&self, period: Period) -> Option<Period> {
        let boundary = self.closed_before()?;
        (period.end() <= boundary).then(|| Period::containing(boundary))
    }

    fn new(config: &Config, horizon: Option<Duration>) -> Self {
        Aggregator {
            window: config.settings.window,
            horizon,
            period_close_grace: None,
            closed_before: None,
            meters: config
                .meters
                .iter()
                .map(|m| (m.slug.clone(), MeterDefinition::of(m)))
                .collect(),
            held_series: vec![0; config.meters.len()],
            dedupe: DedupeSet::new(),
            series: Vec::new(),
            series_index: HashTable::new(),
            dirty: Vec::new(),
            distinct_added: Vec::new(),
            track_updates: true,
            new_keys: Vec::new(),
            watermark: None,
            expired_before_day: 0,
            settled_before: i64::MIN,
            settled_through: None,
            settled_taken: None,
        }
    }

    /// Dedupes one event and adds its readings to their windows and periods. Nothing
    /// changes unless every reading can be added.
    pub fn apply(&mut self, event: &DecodedEvent<'_>) -> Outcome {
        if self.is_too_late(event.time) {
            return Outcome::TooLate;
        }
        let event_period = Period::containing(event.time);
        let carried_into = self.carried_into(event_period);
        let adjusts = carried_into.map(|_| event_period);
        let period = carried_into.unwrap_or(event_period);
        // Nothing changes until the event is known to be new and to fit: a retry or a
        // refused event leaves no trace (not even an empty series).
        let known = match self.check_readings(event, period, adjusts) {
            Ok(known) => known,
            Err(e) => return Outcome::Refused(e),
        };
        // Judged before this event moves the watermark; batch runs have no notion of it.
        let late = self.track_updates
            && self.watermark.is_some_and(|w| {
                self.window.start_of(event.time.timestamp()) < self.window.start_of(w.timestamp())
            });
        if event.readings.is_empty() {
            // Not remembered: nothing was counted, so once a meter reads its type (a
            // price book that lacked one, fixed), a replay of the events counts it.
            self.advance_watermark(event.time);
            return Outcome::Unmetered;
        }
        let day = day_of(event.time);
        match self.dedupe.observe(event.key, event.payload, day) {
            Seen::First => {
                if self.track_updates {
                    self.new_keys
                        .push(DedupeEntry::new(event.key, event.payload, day));
                }
            }
            Seen::Retry => return Outcome::Retry,
            Seen::Conflict => return Outcome::Conflict,
        }
        self.advance_watermark(event.time);
        // An adjustment is windowed at the start of the period it is billed in.
        let window_start = match carried_into {
            Some(open) => open.start().timestamp(),
            None => self.window.start_of(event.time.timestamp()),
        };
        if let Err(e) = self.add_readings(event, &known, period, adjusts, window_start) {
            return Outcome::Refused(e);
        }
        match (adjusts, late) {
            (Some(_), _) => Outcome::Adjusted,
            (None, true) => Outcome::Late,
            (None, false) => Outcome::Accepted,
        }
    }

    /// Per reading of `event`: its series if it exists, and whether the reading adds
    /// anything to it; or why a reading does not fit its series' state. Changes nothing.
    fn check_readings(
        &self,
        event: &DecodedEvent<'_>,
        period: Period,
        adjusts: Option<Period>,
    ) -> Result<KnownReadings, StateError> {
        let mut known = KnownReadings::new();
        for reading in &event.readings {
            let series = self
                .find_series(reading.series.adjusting(adjusts))
                .map(|id| (id, &self.series[id as usize]));
            if let Some(state) = series.and_then(|(_, s)| s.period_state(period)) {
                state.check(reading.value)?;
            }
            // A closed period and its adjustments must add up to the union: a distinct
            // value the closed period, or an earlier adjustment of it (billed in a
            // period since closed too), already counted adds nothing.
            let counted_before = adjusts.is_some_and(|closed| {
                let in_closed = self
                    .find_series(reading.series)
                    .and_then(|id| self.series[id as usize].period_state(closed));
                let in_adjustments = series
                    .into_iter()
                    .flat_map(|(_, s)| s.periods.iter().map(|(_, state)| state));
                in_closed
                    .into_iter()
                    .chain(in_adjustments)
                    .any(|state| state.counts(reading.value))
            });
            known.push((series.map(|(id, _)| id), !counted_before));
        }
        Ok(known)
    }

    /// Adds a new event's readings that add something to their series' `period` and
    /// the window starting at `window_start`, making the series that do not exist yet.
    fn add_readings(
        &mut self,
        event: &DecodedEvent<'_>,
        known: &KnownReadings,
        period: Period,
        adjusts: Option<Period>,
        window_start: i64,
    ) -> Result<(), StateError> {
        let order = EventOrder {
            time: event.time,
            key: event.key,
        };
        for (reading, &(known, adds)) in event.readings.iter().zip(known) {
            if !adds {
                continue;
            }
            let id = match known {
                Some(id) => id,
                None => self.new_series(
                    reading.series.adjusting(adjusts),
                    &event.subject,
                    reading.meter,
                    &reading.group,
                    adjusts,
                ),
            };
            let series = &mut self.series[id as usize];
            let slot = series.period_slot(period);
            // Checked before: a period bounds its windows, so neither add can fail
            // once the period's check passed; still, an error is returned, not ignored.
            series.periods[slot].1.add(reading.value, order)?;
            let slot = series.window_slot(window_start);
            let window = &mut series.windows[slot];
            window.state.add(reading.value, order)?;
            if self.track_updates {
                if !window.dirty {
                    window.dirty = true;
                    self.dirty.push((id, window_start, slot));
                }
                if let ReadingValue::Distinct(value) = reading.value {
                    self.distinct_added.push((id, period, window_start, value));
                }
            }
        }
        Ok(())
    }

    /// The oldest event time still accepted: the watermark less the horizon. `None`
    /// in batch runs and before the first event.
    pub fn oldest_acceptable(&self) -> Option<DateTime<Utc>> {
        let horizon = chrono::Duration::from_std(self.horizon?).unwrap_or(chrono::Duration::MAX);
        Some(
            self.watermark?
                .checked_sub_signed(horizon)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        )
    }

    /// Older than the horizon, or of a day whose keys are already forgotten: after a
    /// restore with a longer horizon than the state was built with, the horizon alone
    /// would take back retries whose keys are gone.
    fn is_too_late(&self, time: DateTime<Utc>) -> bool {
        self.oldest_acceptable().is_some_and(|oldest| time < oldest)
            || self.has_forgotten_day(day_of(time))
    }

    fn advance_watermark(&mut self, time: DateTime<Utc>) {
        if self.watermark.is_some_and(|w| w >= time) {
            return;
        }
        self.watermark = Some(time);
        // A month the watermark closes stays closed, as if closed explicitly: a longer
        // grace after a restart would otherwise reopen it, and its late usage, billed
        // as an adjustment already, would change the closed line too.
        let by_watermark =
            (self.period_close_grace).and_then(|grace| time.checked_sub_signed(grace));
        if let Some(closing) = by_watermark {
            let closed = Period::containing(closing).start();
            self.closed_before = self.closed_before.max(Some(closed));
        }
        // A key of day d is forgotten once all of day d is older than the oldest
        // acceptable time, so no event still accepted can have lost its key.
        if let Some(oldest) = self.oldest_acceptable() {
            let keep_from = day_of(oldest);
            if keep_from > self.expired_before_day {
                self.dedupe.expire_before(keep_from);
                self.expired_before_day = keep_from;
            }
        }
    }

    /// Drops what no accepted event can change any more, so a long-running aggregator's
    /// state stays bounded by the horizon: windows and period states ending before the
    /// oldest acceptable time, adjustment series of periods ending before it, and series
    /// left with nothing. Called after a drain, so nothing pending is lost.
    fn evict_settled(&mut self) {
        let Some(oldest) = self.oldest_acceptable() else {
            return;
        };
        let oldest_start = oldest.timestamp() - i64::from(self.window.seconds());
        if oldest_start < self.settled_before {
            return;
        }
        // Evict a window's worth at a time, not after every drain.
        self.settled_before = oldest_start + i64::from(self.window.seconds());
        let settled_month = Period::latest_ended_by(oldest);
        self.settled_through = self.settled_through.max(Some(settled_month));
        for series in &mut self.series {
            if series
                .key
                .adjusts
                .is_some_and(|closed| closed <= settled_month)
            {
                // Late usage of a settled period: no event can add to it any more.
                series.windows.clear();
                series.periods.clear();
                continue;
            }
            let gone = series.windows.partition_point(|w| w.start <= oldest_start);
            series.windows.drain(..gone);
            series.periods.retain(|(p, _)| p.end() > oldest);
        }
        self.drop_empty_series();
    }

    /// Removes the series holding no period and no window (a customer gone quiet, a
    /// dimension value no longer seen), renumbering the rest. Only between drains:
    /// pending changes refer to series by number.
    fn drop_empty_series(&mut self) {
        let is_empty = |s: &Series| s.periods.is_empty() && s.windows.is_empty();
        if !self.dirty.is_empty() || !self.series.iter().any(is_empty) {
            return;
        }
        let mut kept: SeriesId = 0;
        let renumbered: Vec<Option<SeriesId>> = self
            .series
            .iter()
            .map(|s| {
                (!is_empty(s)).then(|| {
                    kept += 1;
                    kept - 1
                })
            })
            .collect();
        for dropped in self.series.iter().filter(|s| is_empty(s)) {
            self.held_series[dropped.meter.0 as usize] -= 1;
        }
        self.series.retain(|s| !is_empty(s));
        self.series_index
            .retain(|(_, id)| match renumbered[*id as usize] {
                Some(new) => {
                    *id = new;
                    true
                }
                None => false,
            });
    }

    /// The latest period settled since the last call, if one did: that period and every
    /// earlier one end more than the horizon before the watermark, so every event of
    /// them, late usage (adjustments) included, is refused as too late, and their usage
    /// can no longer change. (The same period may come again after a restore.)
    pub fn take_settled(&mut self) -> Option<Period> {
        let new = self
            .settled_through
            .filter(|&p| Some(p) > self.settled_taken)?;
        self.settled_taken = Some(new);
        Some(new)
    }

    fn find_series(&self, fingerprint: SeriesFingerprint) -> Option<SeriesId> {
        self.series_index
            .find(fingerprint.0 as u64, |(fp, _)| *fp == fingerprint)
            .map(|&(_, id)| id)
    }

    /// Adds a series the index does not hold yet.
    fn new_series<S: AsRef<str>>(
        &mut self,
        fingerprint: SeriesFingerprint,
        customer: &str,
        meter: MeterId,
        group: &[S],
        adjusts: Option<Period>,
    ) -> SeriesId {
        let (slug, definition) = &self.meters[meter.0 as usize];
        let kind = definition.aggregation;
        let id = self.series.len() as SeriesId;
        self.series.push(Series {
            key: Arc::new(SeriesKey {
                customer: customer.to_owned(),
                meter: slug.clone(),
                group: group.iter().map(|g| g.as_ref().to_owned()).collect(),
                adjusts,
            }),
            meter,
            kind,
            periods: SmallVec::new(),
            windows: Vec::new(),
            recent: 0,
        });
        self.held_series[meter.0 as usize] += 1;
        // The fingerprint is uniformly distributed: its low bits are a good hash.
        self.series_index
            .insert_unique(fingerprint.0 as u64, (fingerprint, id), |(fp, _)| {
                fp.0 as u64
            });
        id
    }

    /// Every series and period with windows changed since the last drain: the period-to-
    /// date value and the changed windows, each with its revision incremented. Then
    /// state older than the horizon is let go (streaming only).
    pub fn drain_updates(&mut self) -> Vec<UsageUpdate> {
        self.drain().0
    }

    /// The updates of [`Aggregator::drain_updates`] and the state changes behind them:
    /// merging the changes of every drain, in order, into a new aggregator rebuilds
    /// this one's state.
    pub fn drain(&mut self) -> (Vec<UsageUpdate>, Snapshot) {
        let window_len = chrono::Duration::seconds(i64::from(self.window.seconds()));
        let mut updates: Vec<UsageUpdate> = Vec::new();
        let mut last_update: Option<(SeriesId, Period)> = None;
        let mut changed: Vec<SeriesSnapshot> = Vec::new();
        let mut last_series: Option<SeriesId> = None;
        let mut dirty = std::mem::take(&mut self.dirty);
        // By series, then window start: each changed series appears once in the
        // changes, and each of its periods once in the updates.
        dirty.sort_unstable();
        let mut period_added: HashMap<(SeriesId, Period), HashSet<u64>> = HashMap::new();
        let mut window_added: HashMap<(SeriesId, i64), HashSet<u64>> = HashMap::new();
        for (id, period, start, value) in std::mem::take(&mut self.distinct_added) {
            period_added.entry((id, period)).or_default().insert(value);
            window_added.entry((id, start)).or_default().insert(value);
        }
        for (id, start, hint) in dirty {
            let series = &mut self.series[id as usize];
            let slot = match series.windows.get(hint) {
                Some(w) if w.start == start => hint,
                _ => match series.windows.binary_search_by_key(&start, |w| w.start) {
                    Ok(slot) => slot,
                    Err(_) => continue,
                },
            };
            let window = &mut series.windows[slot];
            window.dirty = false;
            window.revision += 1;
            let window = window.usage(window_len);
            if last_series != Some(id) {
                last_series = Some(id);
                let periods = (series.periods.iter())
                    .map(|(period, state)| {
                        let added = || period_added.remove(&(id, *period)).unwrap_or_default();
                        (*period, state.change(added))
                    })
                    .collect();
                changed.push(SeriesSnapshot {
                    key: SeriesKey::clone(&series.key),
                    periods,
                    windows: Vec::new(),
                });
            }
            if let Some(record) = changed.last_mut() {
                let held = &series.windows[slot];
                let added = || window_added.remove(&(id, start)).unwrap_or_default();
                record.windows.push(Window {
                    state: held.state.change(added),
                    ..*held
                });
            }
            let period = Period::containing(window.window_start);
            match updates.last_mut() {
                Some(update) if last_update == Some((id, period)) => update.windows.push(window),
                _ => {
                    last_update = Some((id, period));
                    let period_to_date = series
                        .period_state(period)
                        .map_or(MeterValue::ZERO, AggState::value);
                    updates.push(UsageUpdate {
                        series: Arc::clone(&series.key),
                        period_start: period.start(),
                        period_to_date,
                        windows: vec![window],
                    });
                }
            }
        }
        let new_keys = std::mem::take(&mut self.new_keys);
        let changes = self.snapshot_of(new_keys, changed);
        self.evict_settled();
        (updates, changes)
    }

    /// Each series' value over a whole period, for batch rating, sorted by series.
    pub fn period_usage(&self, period: Period) -> Vec<(Arc<SeriesKey>, MeterValue)> {
        let mut usage: Vec<_> = self
            .series
            .iter()
            .filter_map(|s| Some((Arc::clone(&s.key), s.period_state(period)?.value())))
            .collect();
        usage.sort_by(|a, b| a.0.cmp(&b.0));
        usage
    }

    /// A customer's series with usage in `period`, each with its windows of the period,
    /// sorted by series: where its lines' quantities come from, for `tally explain`.
    pub fn windows_of(&self, customer: &str, period: Period) -> Vec<SeriesWindows> {
        let window_len = chrono::Duration::seconds(i64::from(self.window.seconds()));
        let mut found: Vec<_> = (self.series.iter())
            .filter(|s| s.key.customer == customer && s.period_state(period).is_some())
            .map(|s| {
                let windows = (s.windows.iter())
                    .map(|w| w.usage(window_len))
                    .filter(|w| period.contains(w.window_start))
                    .collect();
                (Arc::clone(&s.key), windows)
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Whether this state counted an event with `event`'s key and content (so `event` is
    /// a retry of it), without counting anything. Another content under the key is not
    /// that: it may be another customer's event, whose partition this is not.
    pub fn counted_same(&self, event: &DecodedEvent<'_>) -> bool {
        self.dedupe.holds(event.key, event.payload)
    }

    /// Number of `(source, id)` keys remembered for dedupe.
    pub fn dedupe_keys(&self) -> usize {
        self.dedupe.len()
    }

    /// Number of series held: those with a window or a period not yet let go.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The whole state, dedupe keys included, for tests that compare a rebuilt state
    /// with the original (snapshots compare equal whatever the keys' order). Pending
    /// (undrained) updates are not part of it. The service stores the keys apart from
    /// [`Aggregator::usage_snapshot`] instead.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            dedupe: self.dedupe.entries().copied().collect(),
            ..self.usage_snapshot()
        }
    }

    /// The state without its dedupe keys: the series, the watermark and what has
    /// expired. For a store that keeps the keys elsewhere (see
    /// [`Snapshot::split_off_dedupe`]).
    pub fn usage_snapshot(&self) -> Snapshot {
        let series = self
            .series
            .iter()
            .map(|s| SeriesSnapshot {
                key: SeriesKey::clone(&s.key),
                periods: s.periods.to_vec(),
                // Whether a window awaits the next drain is this aggregator's business,
                // not state: a snapshot's windows say no, as restored ones do.
                windows: (s.windows.iter())
                    .map(|w| Window {
                        dirty: false,
                        ..w.clone()
                    })
                    .collect(),
            })
            .collect();
        self.snapshot_of(Vec::new(), series)
    }

    /// `dedupe` and `series` with this aggregator's progress: watermark, expiry, close.
    fn snapshot_of(&self, dedupe: Vec<DedupeEntry>, series: Vec<SeriesSnapshot>) -> Snapshot {
        Snapshot {
            dedupe,
            series,
            watermark: self.watermark,
            expired_before_day: self.expired_before_day,
            closed_before: self.closed_before,
        }
    }

    /// Whether the keys of events on `day` (days since 1970-01-01, as
    /// [`Snapshot::newest_dedupe_day`] gives) have been let go: they are past the dedupe
    /// horizon and no event of that day is accepted any more.
    pub fn has_forgotten_day(&self, day: u16) -> bool {
        day < self.expired_before_day
    }

    /// Loads a snapshot into a new aggregator made with the same configuration:
    /// `Aggregator::streaming(&config).restore(snapshot)?`.
    pub fn restore(self, snapshot: Snapshot) -> Result<Self, RestoreError> {
        let mut aggregator = self;
        aggregator.merge(snapshot)?;
        Ok(aggregator)
    }

    /// The definitions of the meters whose usage `changes` holds, by slug: stored
    /// beside it, so that a restore can tell whether its configuration reads them
    /// alike.
    pub fn definitions_of(&self, changes: &Snapshot) -> BTreeMap<&str, &MeterDefinition> {
        let held: BTreeSet<&str> = (changes.series.iter())
            .map(|s| s.key.meter.as_str())
            .collect();
        (self.meters.iter())
            .filter(|(slug, _)| held.contains(slug.as_str()))
            .map(|(slug, definition)| (slug.as_str(), definition))
            .collect()
    }

    /// The fingerprints of the definitions of the meters this state holds usage of,
    /// by slug ([`MeterDefinition::fingerprint`]).
    pub fn held_fingerprints(&self) -> BTreeMap<String, u64> {
        (self.meters.iter().zip(&self.held_series))
            .filter(|(_, &series)| series > 0)
            .map(|((slug, definition), _)| (slug.clone(), definition.fingerprint()))
            .collect()
    }

    /// Refuses the restored state if it holds usage of a meter that `stored` says was
    /// read otherwise than this configuration reads it, unless `accepted` names that
    /// meter: those changes are returned, to be told. Meters without a stored
    /// definition (records of builds before definitions were stored) are not checked.
    pub fn check_definitions(
        &self,
        stored: &BTreeMap<String, MeterDefinition>,
        accepted: &BTreeSet<String>,
    ) -> Result<Vec<(String, DefinitionChange)>, RestoreError> {
        let mut let_through = Vec::new();
        for ((slug, configured), &series) in self.meters.iter().zip(&self.held_series) {
            let Some(before) = stored.get(slug).filter(|_| series > 0) else {
                continue;
            };
            let Some(change) = before.change_to(configured) else {
                continue;
            };
            if !accepted.contains(slug) {
                return Err(RestoreError::DefinitionChanged {
                    meter: slug.clone(),
                    change,
                });
            }
            let (stored_shape, configured_shape) = (before.shape(), configured.shape());
            if stored_shape != configured_shape {
                return Err(RestoreError::AcceptedShapeChanged {
                    meter: slug.clone(),
                    stored: stored_shape.to_string(),
                    configured: configured_shape.to_string(),
                });
            }
            let_through.push((slug.clone(), change));
        }
        Ok(let_through)
    }

    /// Applies a snapshot or the changes of a drain: keys are added, the windows and
    /// periods it holds replace their earlier versions (a unique count's values are
    /// added to those held, [`AggState::merge`]), the watermark moves forward, and
    /// whatever that puts beyond the horizon is let go. Nothing changes if the
    /// snapshot does not fit this configuration.
    pub fn merge(&mut self, snapshot: Snapshot) -> Result<(), RestoreError> {
        let mut resolved = Vec::with_capacity(snapshot.series.len());
        for s in &snapshot.series {
            let meter = self
                .meters
                .iter()
                .position(|(slug, _)| *slug == s.key.meter)
                .ok_or_else(|| RestoreError::UnknownMeter(s.key.meter.clone()))?;
            let (_, definition) = &self.meters[meter];
            let (kind, dimensions) = (definition.aggregation, definition.group_by.len());
            if s.key.group.len() != dimensions {
                return Err(RestoreError::GroupingChanged {
                    meter: s.key.meter.clone(),
                    stored: s.key.group.len(),
                    configured: dimensions,
                });
            }
            let states = s
                .periods
                .iter()
                .map(|(_, st)| st)
                .chain(s.windows.iter().map(|w| &w.state));
            if states.into_iter().any(|st| st.kind() != kind) {
                return Err(RestoreError::AggregationChanged(s.key.meter.clone()));
            }
            resolved.push(MeterId(meter as u32));
        }
        // Expiry first, and keys already expired are not taken: the result is the same
        // in whatever order the keys come (a store may hand them over last).
        if snapshot.expired_before_day > self.expired_before_day {
            self.expired_before_day = snapshot.expired_before_day;
            self.dedupe.expire_before(self.expired_before_day);
        }
        let keep_from = self.expired_before_day;
        self.dedupe
            .extend(snapshot.dedupe.into_iter().filter(|e| e.day() >= keep_from));
        for (s, meter) in snapshot.series.into_iter().zip(resolved) {
            let fingerprint = SeriesFingerprint::new(&s.key.customer, &s.key.meter, &s.key.group)
                .adjusting(s.key.adjusts);
            let id = match self.find_series(fingerprint) {
                Some(id) => id,
                None => self.new_series(
                    fingerprint,
                    &s.key.customer,
                    meter,
                    &s.key.group,
                    s.key.adjusts,
                ),
            };
            let series = &mut self.series[id as usize];
            for (period, state) in s.periods {
                let slot = series.period_slot(period);
                series.periods[slot].1.merge(state);
            }
            for window in s.windows {
                let slot = series.window_slot(window.start);
                let held = &mut series.windows[slot];
                held.revision = window.revision;
                held.state.merge(window.state);
            }
        }
        self.watermark = self.watermark.max(snapshot.watermark);
        self.closed_before = self.closed_before.max(snapshot.closed_before);
        self.evict_settled();
        Ok(())
    }
}

impl Snapshot {
    /// Takes the dedupe keys out, into a snapshot of their own (with the same watermark
    /// and expiry). Keys never change once written; they only expire. A store can so
    /// keep them in records that are dropped once they expire, instead of rewriting
    /// millions of them into every snapshot: merging both halves, in any order, gives
    /// what merging the whole did.
    pub fn split_off_dedupe(&mut self) -> Snapshot {
        let dedupe = std::mem::take(&mut self.dedupe);
        self.with_contents(dedupe, Vec::new())
    }

    /// `dedupe` and `series` with this snapshot's progress: watermark, expiry, close.
    fn with_contents(&self, dedupe: Vec<DedupeEntry>, series: Vec<SeriesSnapshot>) -> Snapshot {
        Snapshot {
            dedupe,
            series,
            ..*self
        }
    }

    /// How many dedupe keys it holds.
    pub fn dedupe_len(&self) -> usize {
        self.dedupe.len()
    }

    /// The dedupe keys of several snapshots in one (their usage is left out), with the
    /// newest watermark and expiry among them: for a store that gathers many small
    /// records of keys into a few large ones.
    pub fn gather_dedupe(snapshots: Vec<Snapshot>) -> Snapshot {
        let mut gathered = Snapshot {
            dedupe: Vec::with_capacity(snapshots.iter().map(Snapshot::dedupe_len).sum()),
            ..Snapshot::default()
        };
        for snapshot in snapshots {
            gathered.dedupe.extend(snapshot.dedupe);
            gathered.watermark = gathered.watermark.max(snapshot.watermark);
            gathered.expired_before_day =
                gathered.expired_before_day.max(snapshot.expired_before_day);
            gathered.closed_before = gathered.closed_before.max(snapshot.closed_before);
        }
        gathered
    }

    /// The newest event day (days since 1970-01-01) among the dedupe keys, if there
    /// are any: once the aggregator has forgotten that day
    /// ([`Aggregator::has_forgotten_day`]), every key here is forgotten too.
    pub fn newest_dedupe_day(&self) -> Option<u16> {
        self.dedupe.iter().map(DedupeEntry::day).max()
    }

    /// Cuts a snapshot into parts of at most `entries` dedupe keys and `entries` windows,
    /// periods and distinct values each, so no part outgrows a Kafka record; merging the
    /// parts, in any order, gives the whole. Each part carries the watermark.
    pub fn split(self, entries: usize) -> Vec<Snapshot> {
        let entries = entries.max(1);
        let mut progress = self;
        let dedupe = std::mem::take(&mut progress.dedupe);
        let all_series = std::mem::take(&mut progress.series);
        let part = |dedupe, series| progress.with_contents(dedupe, series);
        let mut parts: Vec<Snapshot> = dedupe
            .chunks(entries)
            .map(|keys| part(keys.to_vec(), Vec::new()))
            .collect();
        let mut series = Vec::new();
        let mut held = 0;
        for s in all_series.into_iter().flat_map(|s| s.pieces(entries)) {
            let size = s.entries();
            if held + size > entries && !series.is_empty() {
                parts.push(part(Vec::new(), std::mem::take(&mut series)));
                held = 0;
            }
            held += size;
            series.push(s);
        }
        if !series.is_empty() || parts.is_empty() {
            parts.push(part(Vec::new(), series));
        }
        parts
    }
}

/// Why a snapshot could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot has usage of meter {0:?}, which the configuration no longer has; restore with the configuration it was taken with")]
    UnknownMeter(String),
    #[error("meter {0:?} aggregates differently than when the snapshot was taken; restore with the configuration it was taken with")]
    AggregationChanged(String),
    #[error("meter {meter:?} has usage grouped by {stored} group_by dimension(s) and is now grouped by {configured}: that usage would no longer match the prices' filters and bill nothing; restore with the configuration it was taken with, and put the new grouping in a new meter (another slug) with prices from the month it starts")]
    GroupingChanged {
        meter: String,
        stored: usize,
        configured: usize,
    },
    #[error("meter {meter:?} holds usage read with {} = {}, and this configuration sets {}: the open months would be billed partly one way and partly the other, which `tally rate` of them with either price book does not bill; restore with the configuration the usage was read with, and put the new definition in a new meter (another slug) with prices from the month it starts (or, where no book restores every partition, list the meter in [aggregator] accept_redefined_meters: README, \"A new price book\")", change.setting, change.stored, change.configured)]
    DefinitionChanged {
        meter: String,
        change: DefinitionChange,
    },
    #[error("meter {meter:?} is listed in [aggregator] accept_redefined_meters, but its held usage was counted as {stored} and this configuration counts it as {configured}: held usage is kept by its aggregation and dimension names, which no entry lets change (it would be added up otherwise, or its group values read as other dimensions); restore with the configuration the usage was read with, and put the new definition in a new meter (another slug) with prices from the month it starts")]
    AcceptedShapeChanged {
        meter: String,
        stored: String,
        configured: String,
    },
}

/// Days since 1970-01-01, clamped to what a dedupe entry holds (until year 2149).
fn day_of(time: DateTime<Utc>) -> u16 {
    u16::try_from(time.timestamp().div_euclid(86_400).max(0)).unwrap_or(u16::MAX)
}

/// An aggregator's whole state, serialisable.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(with = "crate::dedupe::entries_as_bytes")]
    dedupe: Vec<DedupeEntry>,
    /// In series-id order: restoring them in this order gives them the same ids.
    series: Vec<SeriesSnapshot>,
    watermark: Option<DateTime<Utc>>,
    expired_before_day: u16,
    /// Last, left out until a period is closed (explicitly, or by the watermark since
    /// `ab76708`) and empty when missing: records of builds from before explicit closes
    /// and of this one read both ways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed_before: Option<DateTime<Utc>>,
}

/// Equal when they hold the same state: dedupe entries are a set, in any order.
impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        let sorted = |entries: &[DedupeEntry]| {
            let mut entries = entries.to_vec();
            entries.sort_unstable();
            entries
        };
        self.series == other.series
            && self.watermark == other.watermark
            && self.expired_before_day == other.expired_before_day
            && self.closed_before == other.closed_before
            && sorted(&self.dedupe) == sorted(&other.dedupe)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SeriesSnapshot {
    key: SeriesKey,
    periods: Vec<(Period, AggState)>,
    windows: Vec<Window>,
}

impl SeriesSnapshot {
    /// Its size in a snapshot part: its windows, periods and unique counts' values.
    fn entries(&self) -> usize {
        let states = (self.periods.iter().map(|(_, state)| state))
            .chain(self.windows.iter().map(|window| &window.state));
        self.windows.len() + self.periods.len() + states.map(AggState::distinct_len).sum::<usize>()
    }

    /// The series in pieces that merge back into it, in any order: the first has its
    /// windows and periods with their unique counts' sets emptied, each other one a
    /// period or window with at most `entries` of its values. A month's set of millions
    /// of values would not fit one Kafka record.
    fn pieces(mut self, entries: usize) -> Vec<SeriesSnapshot> {
        if self.entries() <= entries {
            return vec![self];
        }
        let piece = |periods, windows| SeriesSnapshot {
            key: self.key.clone(),
            periods,
            windows,
        };
        let mut pieces = Vec::new();
        for (period, state) in &mut self.periods {
            for values in state.take_distinct(entries) {
                pieces.push(piece(vec![(*period, values)], Vec::new()));
            }
        }
        for window in &mut self.windows {
            for values in window.state.take_distinct(entries) {
                let values = Window {
                    state: values,
                    ..*window
                };
                pieces.push(piece(Vec::new(), vec![values]));
            }
        }
        pieces.insert(0, self);
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::str::FromStr;

    use proptest::prelude::*;
    use rust_decimal::Decimal;
    use tally_schemas::event::{Reading, ReadingValue};
    use tally_schemas::ids::{EventKey, PayloadFingerprint};

    const CONFIG: &str = r#"
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
        event_type = "seats"
        aggregation = "latest"
        value_property = "$.seats"

        [aggregator]
        dedupe_horizon = "2d"
    "#;

    fn config() -> Config {
        Config::parse(CONFIG, "test").unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A tokens event: `tokens` for `model`, by `user`.
    fn tokens(
        id: &str,
        time: &str,
        model: &'static str,
        tokens: i64,
        user: u64,
    ) -> DecodedEvent<'static> {
        DecodedEvent {
            key: EventKey::new("gw", id),
            payload: PayloadFingerprint(tokens as u32),
            time: at(time),
            subject: Cow::Borrowed("acme"),
            subscribed: true,
            event_type: Cow::Borrowed("llm.tokens"),
            readings: smallvec::smallvec![
                Reading {
                    meter: MeterId(0),
                    series: SeriesFingerprint::new("acme", "tokens", &[model]),
                    group: smallvec::smallvec![Cow::Borrowed(model)],
                    value: ReadingValue::Number(Decimal::from(tokens)),
                },
                Reading {
                    meter: MeterId(1),
                    series: SeriesFingerprint::new::<&str>("acme", "users", &[]),
                    group: SmallVec::new(),
                    value: ReadingValue::Distinct(user),
                },
            ],
        }
    }

    fn seats(id: &str, time: &str, seats: i64) -> DecodedEvent<'static> {
        DecodedEvent {
            key: EventKey::new("admin", id),
            payload: PayloadFingerprint(0),
            time: at(time),
            subject: Cow::Borrowed("acme"),
            subscribed: true,
            event_type: Cow::Borrowed("seats"),
            readings: smallvec::smallvec![Reading {
                meter: MeterId(2),
                series: SeriesFingerprint::new::<&str>("acme", "seats", &[]),
                group: SmallVec::new(),
                value: ReadingValue::Number(Decimal::from(seats)),
            }],
        }
    }

    fn usage(agg: &Aggregator, period: &str, meter: &str) -> Vec<(Vec<String>, String)> {
        agg.period_usage(Period::from_str(period).unwrap())
            .into_iter()
            .filter(|(s, _)| s.meter == meter)
            .map(|(s, v)| (s.group.clone(), v.value.to_string()))
            .collect()
    }

    /// Each changed window with the update that carries it.
    fn windows(updates: &[UsageUpdate]) -> Vec<(&UsageUpdate, &WindowUsage)> {
        updates
            .iter()
            .flat_map(|u| u.windows.iter().map(move |w| (u, w)))
            .collect()
    }

    #[test]
    fn a_customers_windows_of_a_period_are_listed_by_series() {
        let mut agg = Aggregator::batch(&config(), 16);
        agg.apply(&tokens("1", "2026-10-31T23:10:00Z", "gpt", 1000, 1));
        agg.apply(&tokens("2", "2026-11-01T00:10:00Z", "gpt", 100, 1));
        agg.apply(&tokens("3", "2026-11-01T00:50:00Z", "gpt", 50, 2));
        agg.apply(&tokens("4", "2026-11-02T05:00:00Z", "llama", 3, 1));
        // `meter group: window start = value, ...` per series.
        let listed: Vec<String> = agg
            .windows_of("acme", Period::from_str("2026-11").unwrap())
            .into_iter()
            .map(|(series, windows)| {
                let windows: Vec<String> = (windows.iter())
                    .map(|w| {
                        assert_eq!(w.window_end - w.window_start, chrono::Duration::hours(1));
                        format!("{} = {}", w.window_start.format("%d %H:%M"), w.value.value)
                    })
                    .collect();
                format!(
                    "{} {}: {}",
                    series.meter,
                    series.group.join(","),
                    windows.join(", ")
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                "tokens gpt: 01 00:00 = 150",
                "tokens llama: 02 05:00 = 3",
                "users : 01 00:00 = 2, 02 05:00 = 1",
            ]
        );
        assert!(agg
            .windows_of("someone else", Period::from_str("2026-11").unwrap())
            .is_empty());
    }

    #[test]
    fn windows_are_hourly_per_series_and_periods_add_up() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1));
        agg.apply(&tokens("2", "2026-11-01T00:50:00Z", "gpt", 50, 2));
        agg.apply(&tokens("3", "2026-11-01T01:00:00Z", "gpt", 7, 1));
        agg.apply(&tokens("4", "2026-11-01T01:00:00Z", "llama", 3, 1));
        let updates = agg.drain_updates();
        let tokens_windows: Vec<_> = windows(&updates)
            .into_iter()
            .filter(|(u, _)| u.series.meter == "tokens")
            .map(|(u, w)| {
                (
                    u.series.group[0].as_str(),
                    w.window_start.format("%H:%M").to_string(),
                    w.value.value.to_string(),
                    u.period_to_date.value.to_string(),
                )
            })
            .collect();
        assert_eq!(
            updates
                .iter()
                .filter(|u| u.series.meter == "tokens")
                .count(),
            2,
            "one update per series and period, whatever the windows"
        );
        assert_eq!(
            tokens_windows,
            [
                ("gpt", "00:00".into(), "150".into(), "157".into()),
                ("gpt", "01:00".into(), "7".into(), "157".into()),
                ("llama", "01:00".into(), "3".into(), "3".into()),
            ]
        );
        assert_eq!(
            usage(&agg, "2026-11", "tokens"),
            [
                (vec!["gpt".to_string()], "157".to_string()),
                (vec!["llama".to_string()], "3".to_string())
            ]
        );
    }

    #[test]
    fn an_unmetered_event_is_not_remembered_so_a_replay_that_meters_it_counts_it() {
        let mut agg = Aggregator::streaming(&config());
        let mut event = tokens("u1", "2026-11-02T10:00:00Z", "gpt", 5, 1);
        // As decoded under a price book without a meter for its type.
        let readings = std::mem::take(&mut event.readings);
        assert_eq!(agg.apply(&event), Outcome::Unmetered);
        assert_eq!(agg.apply(&event), Outcome::Unmetered);
        assert_eq!(agg.dedupe_keys(), 0);
        event.readings = readings;
        assert_eq!(agg.apply(&event), Outcome::Accepted);
        assert_eq!(agg.apply(&event), Outcome::Retry);
        assert_eq!(agg.dedupe_keys(), 1);
    }

    #[test]
    fn a_window_changed_before_a_merge_is_drained_once() {
        let mut other = Aggregator::streaming(&config());
        other.apply(&tokens("o1", "2026-11-02T10:00:00Z", "gpt", 5, 1));
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("a1", "2026-11-02T10:10:00Z", "gpt", 7, 2));
        agg.merge(other.snapshot()).unwrap();
        agg.apply(&tokens("a2", "2026-11-02T10:20:00Z", "gpt", 1, 3));
        let updates = agg.drain_updates();
        let mut windows: Vec<_> = (updates.iter())
            .filter(|u| u.series.meter == "tokens")
            .flat_map(|u| u.windows.iter().map(|w| (w.window_start, w.revision)))
            .collect();
        windows.sort();
        let ten = "2026-11-02T10:00:00Z".parse().unwrap();
        assert_eq!(windows, [(ten, 1)]);
    }

    #[test]
    fn a_drains_changes_carry_only_the_distinct_values_counted_since_the_last() {
        let mut original = Aggregator::streaming(&config());
        for user in 0..1000 {
            let event = tokens(&format!("a{user}"), "2026-11-02T10:00:00Z", "gpt", 1, user);
            original.apply(&event);
        }
        let mut rebuilt = Aggregator::streaming(&config());
        rebuilt.merge(original.drain().1).unwrap();
        // One user counted before (read again, it is in the changes too), two new ones,
        // in two windows.
        original.apply(&tokens("b1", "2026-11-02T11:00:00Z", "gpt", 1, 5));
        original.apply(&tokens("b2", "2026-11-02T11:00:00Z", "gpt", 1, 1000));
        original.apply(&tokens("b3", "2026-11-03T11:00:00Z", "gpt", 1, 1001));
        let changes = original.drain().1;
        let users = (changes.series.iter())
            .find(|s| s.key.meter == "users")
            .unwrap();
        let sizes = |states: Vec<&AggState>| -> Vec<usize> {
            (states.into_iter())
                .map(|state| match state {
                    AggState::UniqueCount(set) => set.len(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(sizes(users.periods.iter().map(|(_, s)| s).collect()), [3]);
        assert_eq!(
            sizes(users.windows.iter().map(|w| &w.state).collect()),
            [2, 1]
        );
        rebuilt.merge(changes).unwrap();
        assert_eq!(rebuilt.snapshot(), original.snapshot());
        let november = Period::from_str("2026-11").unwrap();
        let counted = rebuilt.period_usage(november);
        let (_, users) = (counted.iter().find(|(key, _)| key.meter == "users")).unwrap();
        assert_eq!(users.value, Decimal::from(1002));
    }

    #[test]
    fn a_snapshot_cuts_a_large_unique_count_into_parts_that_merge_back_in_any_order() {
        let mut original = Aggregator::streaming(&config());
        for user in 0..1000 {
            let time = format!("2026-11-02T{:02}:00:00Z", user % 24);
            original.apply(&tokens(&format!("u{user}"), &time, "gpt", 1, user));
        }
        // 1000 users in the month's set, 1000 in the hours' sets, 24 windows, 1 period.
        let parts = original.snapshot().split(100);
        assert!(parts.len() >= 20, "{} parts", parts.len());
        for part in &parts {
            let entries: usize = part.series.iter().map(SeriesSnapshot::entries).sum();
            // A piece's 100 values, and the few windows and periods they belong to.
            assert!(entries <= 110, "{entries}");
        }
        let mut in_order = Aggregator::streaming(&config());
        let mut reversed = Aggregator::streaming(&config());
        for part in &parts {
            in_order.merge(part.clone()).unwrap();
        }
        for part in parts.into_iter().rev() {
            reversed.merge(part).unwrap();
        }
        assert_eq!(in_order.snapshot(), original.snapshot());
        // Merged in another order, the keys and series are held in another order.
        let november = Period::from_str("2026-11").unwrap();
        assert_eq!(
            reversed.period_usage(november),
            original.period_usage(november)
        );
        let windows = |a: &Aggregator| a.windows_of("acme", november);
        assert_eq!(windows(&reversed), windows(&original));
    }

    #[test]
    fn a_periods_unique_count_is_not_the_sum_of_its_windows() {
        let mut agg = Aggregator::streaming(&config());
        // User 1 in two different hours, user 2 once: 2 distinct users, 3 window-users.
        agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 1, 1));
        agg.apply(&tokens("2", "2026-11-01T05:10:00Z", "gpt", 1, 1));
        agg.apply(&tokens("3", "2026-11-01T05:20:00Z", "gpt", 1, 2));
        let updates = agg.drain_updates();
        let window_users: Decimal = windows(&updates)
            .into_iter()
            .filter(|(u, _)| u.series.meter == "users")
            .map(|(_, w)| w.value.value)
            .sum();
        assert_eq!(window_users, Decimal::from(3));
        assert_eq!(usage(&agg, "2026-11", "users"), [(vec![], "2".to_string())]);
    }

    #[test]
    fn counted_same_tells_a_retry_without_counting() {
        let mut agg = Aggregator::streaming(&config());
        let first = tokens("e1", "2026-11-02T10:00:00Z", "gpt", 5, 1);
        assert!(!agg.counted_same(&first));
        assert_eq!(agg.apply(&first), Outcome::Accepted);
        assert!(agg.counted_same(&first));
        let other = tokens("e1", "2026-11-02T10:00:00Z", "gpt", 6, 1);
        assert!(!agg.counted_same(&other));
        // Asking counted nothing: a new key is still new.
        let new = tokens("e2", "2026-11-02T10:00:00Z", "gpt", 5, 1);
        assert!(!agg.counted_same(&new));
        assert_eq!(agg.apply(&new), Outcome::Accepted);
    }

    #[test]
    fn latest_is_the_value_of_the_latest_event_time_not_the_last_arrival() {
        let mut agg = Aggregator::batch(&config(), 0);
        agg.apply(&seats("a", "2026-11-20T00:00:00Z", 12));
        agg.apply(&seats("b", "2026-11-03T00:00:00Z", 30)); // arrives later, happened earlier
        assert_eq!(
            usage(&agg, "2026-11", "seats"),
            [(vec![], "12".to_string())]
        );
    }

    #[test]
    fn retries_and_conflicts_are_dropped_and_told_apart() {
        let mut agg = Aggregator::batch(&config(), 0);
        assert_eq!(
            agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1)),
            Outcome::Accepted
        );
        assert_eq!(
            agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1)),
            Outcome::Retry
        );
        assert_eq!(
            agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 999, 1)),
            Outcome::Conflict
        );
        assert_eq!(
            usage(&agg, "2026-11", "tokens"),
            [(vec!["gpt".to_string()], "100".to_string())]
        );
    }

    #[test]
    fn events_span_periods_by_their_utc_time() {
        let mut agg = Aggregator::batch(&config(), 0);
        agg.apply(&tokens("1", "2026-11-30T23:59:59Z", "gpt", 1, 1));
        agg.apply(&tokens("2", "2026-12-01T00:00:00Z", "gpt", 2, 1));
        assert_eq!(usage(&agg, "2026-11", "tokens")[0].1, "1");
        assert_eq!(usage(&agg, "2026-12", "tokens")[0].1, "2");
    }

    #[test]
    fn late_events_within_the_horizon_revise_their_window() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("1", "2026-11-10T10:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("2", "2026-11-11T10:00:00Z", "gpt", 5, 1));
        assert_eq!(windows(&agg.drain_updates()).len(), 4);
        // A day late: within the 2-day horizon, so the 10th's window gets revision 2.
        assert_eq!(
            agg.apply(&tokens("3", "2026-11-10T10:30:00Z", "gpt", 1, 1)),
            Outcome::Late
        );
        let updates = agg.drain_updates();
        let (update, revised) = windows(&updates)
            .into_iter()
            .find(|(u, _)| u.series.meter == "tokens")
            .unwrap();
        assert_eq!(revised.revision, 2);
        assert_eq!(revised.value.value, Decimal::from(6));
        assert_eq!(update.period_to_date.value, Decimal::from(11));
    }

    #[test]
    fn a_grace_longer_than_the_calendar_closes_nothing() {
        // "Never close by event time", written as a huge grace: no period closes.
        let mut agg =
            Aggregator::streaming(&config()).with_period_close(Duration::from_secs(u64::MAX));
        agg.apply(&tokens("1", "2026-10-31T23:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("2", "2026-11-01T02:00:00Z", "gpt", 1, 1));
        assert_eq!(
            agg.apply(&tokens("3", "2026-10-31T23:10:00Z", "gpt", 2, 1)),
            Outcome::Late
        );
    }

    #[test]
    fn usage_of_a_closed_period_is_carried_into_the_open_one_as_an_adjustment() {
        let mut agg = Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        agg.apply(&tokens("1", "2026-10-31T23:00:00Z", "gpt", 5, 1));
        // Within the grace: October is still open, so a late October event revises it.
        agg.apply(&tokens("2", "2026-11-01T00:30:00Z", "gpt", 1, 1));
        assert_eq!(
            agg.apply(&tokens("3", "2026-10-31T23:10:00Z", "gpt", 2, 1)),
            Outcome::Late
        );
        agg.drain_updates();
        // The watermark passes November 1st 01:00: October closes.
        agg.apply(&tokens("4", "2026-11-01T02:00:00Z", "gpt", 1, 1));
        assert_eq!(
            agg.apply(&tokens("5", "2026-10-31T23:20:00Z", "gpt", 7, 2)),
            Outcome::Adjusted
        );
        let october = Period::from_str("2026-10").unwrap();
        assert_eq!(
            usage(&agg, "2026-10", "tokens"),
            vec![(vec!["gpt".to_owned()], "7".to_owned())],
            "a closed period never changes"
        );
        let updates = agg.drain_updates();
        let adjustment = updates
            .iter()
            .find(|u| u.series.meter == "tokens" && u.series.adjusts == Some(october))
            .unwrap();
        assert_eq!(adjustment.period_start, at("2026-11-01T00:00:00Z"));
        assert_eq!(
            adjustment.windows[0].window_start,
            at("2026-11-01T00:00:00Z")
        );
        assert_eq!(adjustment.period_to_date.value, Decimal::from(7));
        assert_ne!(
            adjustment.record_key(),
            updates
                .iter()
                .find(|u| u.series.meter == "tokens" && u.series.adjusts.is_none())
                .unwrap()
                .record_key()
        );
        // A retry of the adjusted event is still a retry.
        assert_eq!(
            agg.apply(&tokens("5", "2026-10-31T23:20:00Z", "gpt", 7, 2)),
            Outcome::Retry
        );
        // The adjustment survives a rebuild from the changes.
        let mut rebuilt =
            Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        rebuilt.merge(agg.snapshot()).unwrap();
        assert_eq!(
            rebuilt.apply(&tokens("6", "2026-10-31T23:30:00Z", "gpt", 1, 3)),
            Outcome::Adjusted
        );
        let updates = rebuilt.drain_updates();
        let adjustment = updates
            .iter()
            .find(|u| u.series.meter == "tokens" && u.series.adjusts == Some(october))
            .unwrap();
        assert_eq!(adjustment.period_to_date.value, Decimal::from(8));
    }

    /// The period-to-date tokens of `period`, or of the adjustment of `adjusts` in it.
    fn tokens_of(agg: &Aggregator, period: &str, adjusts: Option<Period>) -> Option<String> {
        agg.period_usage(Period::from_str(period).unwrap())
            .into_iter()
            .find(|(key, _)| key.meter == "tokens" && key.adjusts == adjusts)
            .map(|(_, usage)| usage.value.to_string())
    }

    #[test]
    fn a_month_the_watermark_closed_stays_closed_under_a_longer_grace() {
        let october = Period::from_str("2026-10").unwrap();
        let closing = |grace_days: u64| {
            Aggregator::streaming(&config())
                .with_period_close(Duration::from_secs(grace_days * 86_400))
        };
        let mut agg = closing(1);
        agg.apply(&tokens("1", "2026-10-31T10:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("2", "2026-11-02T12:00:00Z", "gpt", 1, 1));
        assert_eq!(
            agg.apply(&tokens("3", "2026-10-31T12:00:00Z", "gpt", 2, 1)),
            Outcome::Adjusted
        );
        // Restarted with a grace of 3 days: by the watermark alone October would be
        // open again (November 2 less 3 days), and its line would take late usage that
        // an adjustment already billed part of.
        let mut rebuilt = closing(3);
        rebuilt.merge(agg.drain().1).unwrap();
        let restored = closing(3).restore(agg.snapshot()).unwrap();
        for mut agg in [rebuilt, restored] {
            assert_eq!(agg.closed_before(), Some(at("2026-11-01T00:00:00Z")));
            assert_eq!(
                agg.apply(&tokens("4", "2026-10-31T14:00:00Z", "gpt", 3, 1)),
                Outcome::Adjusted
            );
            assert_eq!(tokens_of(&agg, "2026-10", None).as_deref(), Some("5"));
            assert_eq!(
                tokens_of(&agg, "2026-11", Some(october)).as_deref(),
                Some("5")
            );
        }
    }

    #[test]
    fn an_explicit_close_turns_later_usage_into_adjustments_whatever_the_watermark() {
        let october = Period::from_str("2026-10").unwrap();
        let mut agg = Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        agg.apply(&tokens("1", "2026-10-31T20:00:00Z", "gpt", 5, 1));
        // No event of November yet: by its watermark October is open.
        assert_eq!(
            agg.apply(&tokens("2", "2026-10-31T21:00:00Z", "gpt", 1, 1)),
            Outcome::Accepted
        );
        // By the watermark (21:00) less the grace, periods ending by 20:00 are closed.
        assert_eq!(agg.closed_before(), Some(at("2026-10-31T20:00:00Z")));
        agg.close_through(october);
        assert_eq!(agg.closed_before(), Some(at("2026-11-01T00:00:00Z")));
        assert_eq!(
            agg.apply(&tokens("3", "2026-10-31T22:00:00Z", "gpt", 2, 1)),
            Outcome::Adjusted
        );
        assert_eq!(tokens_of(&agg, "2026-10", None).as_deref(), Some("6"));
        assert_eq!(
            tokens_of(&agg, "2026-11", Some(october)).as_deref(),
            Some("2")
        );
        // Closing an earlier period again changes nothing; the close survives a
        // rebuild from the changes, and from a snapshot.
        agg.close_through(Period::from_str("2026-09").unwrap());
        let mut rebuilt =
            Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        rebuilt.merge(agg.drain().1).unwrap();
        let restored = Aggregator::streaming(&config())
            .with_period_close(Duration::from_secs(3600))
            .restore(agg.snapshot())
            .unwrap();
        for mut agg in [rebuilt, restored] {
            assert_eq!(
                agg.apply(&tokens("4", "2026-10-31T23:00:00Z", "gpt", 3, 1)),
                Outcome::Adjusted
            );
            assert_eq!(
                tokens_of(&agg, "2026-11", Some(october)).as_deref(),
                Some("5")
            );
            // November itself stays open.
            assert_eq!(
                agg.apply(&tokens("5", "2026-11-02T00:00:00Z", "gpt", 1, 1)),
                Outcome::Accepted
            );
        }
    }

    #[test]
    fn snapshots_without_an_explicit_close_keep_the_layout_of_earlier_builds() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("1", "2026-10-31T20:00:00Z", "gpt", 5, 1));
        agg.drain();
        let round_trip = |snapshot: &Snapshot| {
            let bytes = rmp_serde::to_vec(snapshot).unwrap();
            let read: Snapshot = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(&read, snapshot);
            bytes[0]
        };
        // A MessagePack array of the 4 members earlier builds write and read...
        assert_eq!(round_trip(&agg.snapshot()), 0x94);
        // ...and of 5 once a period was closed by hand.
        agg.close_through(Period::from_str("2026-09").unwrap());
        assert_eq!(round_trip(&agg.snapshot()), 0x95);
    }

    #[test]
    fn a_unique_count_adjustment_adds_only_values_the_closed_period_had_not_counted() {
        let october = Period::from_str("2026-10").unwrap();
        let users_adjustment_in = |agg: &Aggregator, billed_in: &str| {
            agg.period_usage(Period::from_str(billed_in).unwrap())
                .into_iter()
                .find(|(key, _)| key.meter == "users" && key.adjusts == Some(october))
                .map(|(_, usage)| usage.value.to_string())
        };
        let users_adjustment = |agg: &Aggregator| users_adjustment_in(agg, "2026-11");
        let mut agg = Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        agg.apply(&tokens("1", "2026-10-30T10:00:00Z", "gpt", 1, 1));
        agg.apply(&tokens("2", "2026-10-31T23:00:00Z", "gpt", 1, 2));
        agg.apply(&tokens("3", "2026-11-01T02:00:00Z", "gpt", 1, 9));
        // October closed with users 1 and 2. Late October usage by user 1 bills its
        // tokens, but user 1 was counted already: October's users stay 2 in total.
        assert_eq!(
            agg.apply(&tokens("4", "2026-10-31T23:30:00Z", "gpt", 5, 1)),
            Outcome::Adjusted
        );
        assert_eq!(users_adjustment(&agg), None, "no empty series either");
        // User 3 is new to October: one more, once however often it comes.
        agg.apply(&tokens("5", "2026-10-31T23:40:00Z", "gpt", 1, 3));
        agg.apply(&tokens("6", "2026-10-31T23:50:00Z", "gpt", 1, 3));
        agg.apply(&tokens("7", "2026-10-31T23:55:00Z", "gpt", 1, 2));
        assert_eq!(users_adjustment(&agg).as_deref(), Some("1"));
        // The union holds after a restore from a snapshot.
        let mut rebuilt =
            Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        rebuilt.merge(agg.snapshot()).unwrap();
        rebuilt.apply(&tokens("8", "2026-10-31T23:56:00Z", "gpt", 1, 1));
        rebuilt.apply(&tokens("9", "2026-10-31T23:57:00Z", "gpt", 1, 4));
        assert_eq!(users_adjustment(&rebuilt).as_deref(), Some("2"));
        assert_eq!(
            usage(&rebuilt, "2026-10", "users"),
            vec![(vec![], "2".to_owned())]
        );
        assert_eq!(
            usage(&rebuilt, "2026-10", "tokens"),
            vec![(vec!["gpt".to_owned()], "2".to_owned())],
            "a closed period never changes"
        );
        // November closes too, so later October usage is billed in December: a user
        // November's adjustment counted is not counted again there.
        rebuilt.close_through(Period::from_str("2026-11").unwrap());
        rebuilt.apply(&tokens("10", "2026-10-31T23:58:00Z", "gpt", 1, 3));
        assert_eq!(users_adjustment_in(&rebuilt, "2026-12"), None);
        rebuilt.apply(&tokens("11", "2026-10-31T23:59:00Z", "gpt", 1, 5));
        assert_eq!(
            users_adjustment_in(&rebuilt, "2026-12").as_deref(),
            Some("1")
        );
        assert_eq!(users_adjustment(&rebuilt).as_deref(), Some("2"));
    }

    #[test]
    fn events_older_than_the_horizon_are_too_late_and_their_keys_forgotten() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("old", "2026-11-01T10:00:00Z", "gpt", 5, 1));
        assert_eq!(agg.dedupe_keys(), 1);
        agg.apply(&tokens("new", "2026-11-05T10:00:00Z", "gpt", 5, 1));
        // The 1st is more than 2 days before the 5th: its key is gone, and a retry of it
        // is refused as too late rather than counted again.
        assert_eq!(agg.dedupe_keys(), 1);
        assert_eq!(
            agg.apply(&tokens("old", "2026-11-01T10:00:00Z", "gpt", 5, 1)),
            Outcome::TooLate
        );
        assert_eq!(usage(&agg, "2026-11", "tokens")[0].1, "10");
    }

    #[test]
    fn a_longer_horizon_after_a_restore_does_not_take_back_forgotten_retries() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("old", "2026-11-01T10:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("new", "2026-11-05T10:00:00Z", "gpt", 5, 1));
        agg.drain_updates();
        // The operator raises the horizon from 2 to 7 days and restarts: the 1st is
        // within the new horizon, but its keys went with the old one.
        let longer = Config::parse(&CONFIG.replace("\"2d\"", "\"7d\""), "test").unwrap();
        let mut restored = Aggregator::streaming(&longer)
            .restore(agg.snapshot())
            .unwrap();
        assert_eq!(
            restored.apply(&tokens("old", "2026-11-01T10:00:00Z", "gpt", 5, 1)),
            Outcome::TooLate
        );
        // Days whose keys are still held are taken with the longer horizon.
        assert_eq!(
            restored.apply(&tokens("day4", "2026-11-04T10:00:00Z", "gpt", 5, 1)),
            Outcome::Late
        );
        assert_eq!(usage(&restored, "2026-11", "tokens")[0].1, "15");
    }

    #[test]
    fn a_retry_is_never_billed_twice_with_a_horizon_of_part_days() {
        let config = Config::parse(&CONFIG.replace("\"2d\"", "\"36h\""), "test").unwrap();
        let mut agg = Aggregator::streaming(&config);
        agg.apply(&tokens("a", "2026-11-08T14:00:00Z", "gpt", 1, 1));
        agg.apply(&tokens("b", "2026-11-10T01:00:00Z", "gpt", 1, 1));
        // 35 hours before the newest event: still acceptable, so still remembered.
        assert_eq!(
            agg.apply(&tokens("a", "2026-11-08T14:00:00Z", "gpt", 1, 1)),
            Outcome::Retry
        );
        assert_eq!(usage(&agg, "2026-11", "tokens")[0].1, "2");
    }

    #[test]
    fn retries_and_conflicts_leave_no_empty_series_behind() {
        let mut agg = Aggregator::batch(&config(), 0);
        agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1));
        assert_eq!(
            agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "other", 101, 1)),
            Outcome::Conflict
        );
        assert_eq!(
            usage(&agg, "2026-11", "tokens"),
            [(vec!["gpt".to_string()], "100".to_string())]
        );
    }

    #[test]
    fn settled_windows_and_periods_are_let_go_after_a_drain() {
        let mut agg = Aggregator::streaming(&config());
        agg.apply(&tokens("1", "2026-10-31T10:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("2", "2026-11-01T10:00:00Z", "gpt", 5, 1));
        agg.drain_updates();
        let held_windows = |agg: &Aggregator| {
            agg.snapshot()
                .series
                .iter()
                .map(|s| s.windows.len())
                .sum::<usize>()
        };
        assert_eq!(held_windows(&agg), 4);
        // Three days on (horizon 2 days): October and its windows can no longer change.
        agg.apply(&tokens("3", "2026-11-04T10:00:00Z", "gpt", 5, 1));
        let updates = agg.drain_updates();
        assert_eq!(windows(&updates).len(), 2);
        assert_eq!(held_windows(&agg), 2);
        assert!(usage(&agg, "2026-10", "tokens").is_empty());
        assert_eq!(usage(&agg, "2026-11", "tokens")[0].1, "10");
        assert_eq!(
            agg.apply(&tokens("4", "2026-10-31T11:00:00Z", "gpt", 5, 1)),
            Outcome::TooLate
        );
    }

    #[test]
    fn a_settled_month_is_reported_once_and_let_go_with_its_adjustments_and_empty_series() {
        let october = Period::from_str("2026-10").unwrap();
        let mut agg = Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        agg.apply(&tokens("1", "2026-10-31T10:00:00Z", "claude", 5, 1));
        agg.apply(&tokens("2", "2026-10-31T11:00:00Z", "gpt", 5, 1));
        agg.apply(&tokens("3", "2026-11-01T10:00:00Z", "gpt", 5, 2));
        // October has closed: late usage of it is billed in November, in series of their
        // own (tokens for gpt, and users).
        assert_eq!(
            agg.apply(&tokens("late", "2026-10-31T12:00:00Z", "gpt", 4, 3)),
            Outcome::Adjusted
        );
        agg.drain_updates();
        // Only September, which had no usage here, has settled.
        let september = Period::from_str("2026-09").unwrap();
        assert_eq!(agg.take_settled(), Some(september));
        assert_eq!(agg.series_count(), 5);
        // Three days on (horizon 2 days): October can no longer change, nor can its
        // adjustments.
        agg.apply(&tokens("4", "2026-11-04T10:00:00Z", "gpt", 5, 2));
        agg.drain_updates();
        assert_eq!(agg.take_settled(), Some(october));
        assert_eq!(agg.take_settled(), None);
        // claude's series held only October and the adjustment series only October's
        // late usage: gone. The others are still found by their fingerprints, and
        // claude's comes back with new usage.
        assert_eq!(agg.series_count(), 2);
        agg.apply(&tokens("5", "2026-11-04T11:00:00Z", "gpt", 5, 3));
        agg.apply(&tokens("6", "2026-11-04T12:00:00Z", "claude", 7, 3));
        agg.drain_updates();
        assert_eq!(agg.series_count(), 3);
        let owned = |group: &str, value: &str| (vec![group.to_owned()], value.to_owned());
        assert_eq!(
            usage(&agg, "2026-11", "tokens"),
            [owned("claude", "7"), owned("gpt", "15")]
        );
        assert_eq!(usage(&agg, "2026-11", "users")[0].1, "2");
    }

    #[test]
    fn a_batch_aggregator_keeps_every_key_whatever_the_order() {
        let mut agg = Aggregator::batch(&config(), 0);
        agg.apply(&tokens("new", "2026-12-20T10:00:00Z", "gpt", 5, 1));
        assert_eq!(
            agg.apply(&tokens("old", "2026-10-01T10:00:00Z", "gpt", 5, 1)),
            Outcome::Accepted
        );
        assert_eq!(
            agg.apply(&tokens("old", "2026-10-01T10:00:00Z", "gpt", 5, 1)),
            Outcome::Retry
        );
    }

    #[test]
    fn a_restored_snapshot_continues_exactly_where_the_original_was() {
        let config = config();
        let mut original = Aggregator::streaming(&config);
        original.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1));
        original.apply(&seats("s", "2026-11-01T00:10:00Z", 4));
        original.drain_updates();
        let json = serde_json::to_string(&original.snapshot()).unwrap();
        let mut restored = Aggregator::streaming(&config)
            .restore(serde_json::from_str(&json).unwrap())
            .unwrap();
        for agg in [&mut original, &mut restored] {
            assert_eq!(
                agg.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1)),
                Outcome::Retry
            );
            assert_eq!(
                agg.apply(&tokens("2", "2026-11-01T00:20:00Z", "gpt", 1, 2)),
                Outcome::Accepted
            );
        }
        assert_eq!(original.drain_updates(), restored.drain_updates());
        assert_eq!(original.snapshot(), restored.snapshot());

        // A configuration whose meter aggregates differently cannot take the snapshot.
        let changed = Config::parse(
            &CONFIG.replace("aggregation = \"latest\"", "aggregation = \"max\""),
            "test",
        )
        .unwrap();
        let snapshot = original.snapshot();
        assert_eq!(
            Aggregator::streaming(&changed)
                .restore(snapshot)
                .unwrap_err(),
            RestoreError::AggregationChanged("seats".into())
        );
        // Nor one that no longer has a meter the snapshot has usage of.
        let seats = CONFIG.find("[[meters]]\n        slug = \"seats\"").unwrap();
        let aggregator = CONFIG.find("[aggregator]").unwrap();
        let removed = format!("{}{}", &CONFIG[..seats], &CONFIG[aggregator..]);
        let removed = Config::parse(&removed, "test").unwrap();
        assert_eq!(
            Aggregator::streaming(&removed)
                .restore(original.snapshot())
                .unwrap_err(),
            RestoreError::UnknownMeter("seats".into())
        );
        // Nor one that groups a meter by other dimensions: the usage held would match
        // no price's filter any more.
        let regrouped = CONFIG.replace(
            "group_by = { model = \"$.model\" }",
            "group_by = { model = \"$.model\", region = \"$.region\" }",
        );
        let regrouped = Config::parse(&regrouped, "test").unwrap();
        assert_eq!(
            Aggregator::streaming(&regrouped)
                .restore(original.snapshot())
                .unwrap_err(),
            RestoreError::GroupingChanged {
                meter: "tokens".into(),
                stored: 1,
                configured: 2
            }
        );
    }

    #[test]
    fn the_meters_held_are_those_whose_series_are_not_let_go() {
        let mut agg = Aggregator::streaming(&config()).with_period_close(Duration::from_secs(3600));
        agg.apply(&seats("s", "2026-10-31T10:00:00Z", 4));
        agg.apply(&tokens("1", "2026-11-01T10:00:00Z", "gpt", 5, 1));
        agg.drain_updates();
        let held = |agg: &Aggregator| agg.held_fingerprints().into_keys().collect::<Vec<_>>();
        assert_eq!(held(&agg), ["seats", "tokens", "users"]);
        // October settles (horizon 2 days): seats held only October's usage.
        agg.apply(&tokens("2", "2026-11-04T10:00:00Z", "gpt", 5, 2));
        agg.drain_updates();
        assert_eq!(held(&agg), ["tokens", "users"]);
        let restored = Aggregator::streaming(&config())
            .restore(agg.snapshot())
            .unwrap();
        assert_eq!(held(&restored), ["tokens", "users"]);
    }

    #[test]
    fn a_state_is_refused_by_a_configuration_that_reads_a_meter_it_holds_usage_of_otherwise() {
        let config = config();
        let mut original = Aggregator::streaming(&config);
        original.apply(&tokens("1", "2026-11-01T00:10:00Z", "gpt", 100, 1));
        original.drain_updates();
        let snapshot = original.snapshot();
        // A tokens event is read by both meters of its type; seats holds nothing.
        let stored: BTreeMap<String, MeterDefinition> = (original.definitions_of(&snapshot))
            .into_iter()
            .map(|(slug, definition)| (slug.to_owned(), definition.clone()))
            .collect();
        assert_eq!(
            stored.keys().map(String::as_str).collect::<Vec<_>>(),
            ["tokens", "users"]
        );
        let restored_accepting = |book: &str, accepted: &[&str]| {
            let config = Config::parse(book, "test").unwrap();
            let restored = Aggregator::streaming(&config).restore(snapshot.clone());
            let accepted = accepted.iter().map(|&slug| slug.to_owned()).collect();
            restored.unwrap().check_definitions(&stored, &accepted)
        };
        let restored_with = |book: &str| restored_accepting(book, &[]);
        assert_eq!(restored_with(CONFIG), Ok(vec![]));
        let moved = CONFIG.replace("\"$.tokens\"", "\"$.usage.tokens\"");
        let moved_tokens = DefinitionChange {
            setting: "value_property".into(),
            stored: "\"$.tokens\"".into(),
            configured: "\"$.usage.tokens\"".into(),
        };
        assert_eq!(
            restored_with(&moved),
            Err(RestoreError::DefinitionChanged {
                meter: "tokens".into(),
                change: moved_tokens.clone(),
            })
        );
        // Listed in accept_redefined_meters, the change is let through and told.
        assert_eq!(
            restored_accepting(&moved, &["tokens"]),
            Ok(vec![("tokens".to_owned(), moved_tokens)])
        );
        assert!(matches!(
            restored_accepting(&moved, &["users"]),
            Err(RestoreError::DefinitionChanged { meter, .. }) if meter == "tokens"
        ));
        // A renamed dimension would read the held group values as another one's.
        assert_eq!(
            restored_accepting(&CONFIG.replace("{ model = ", "{ engine = "), &["tokens"]),
            Err(RestoreError::AcceptedShapeChanged {
                meter: "tokens".into(),
                stored: "sum by model".into(),
                configured: "sum by engine".into(),
            })
        );
        // Renamed: the same number of dimensions, which the restore alone lets through.
        assert!(matches!(
            restored_with(&CONFIG.replace("{ model = ", "{ engine = ")),
            Err(RestoreError::DefinitionChanged { meter, .. }) if meter == "tokens"
        ));
        // Both meters of the type read it; the first in the book is named.
        assert!(matches!(
            restored_with(&CONFIG.replace("\"llm.tokens\"", "\"llm.tokens.v2\"")),
            Err(RestoreError::DefinitionChanged { meter, .. }) if meter == "tokens"
        ));
        // A meter with no usage held may read otherwise from now on.
        assert_eq!(
            restored_with(&CONFIG.replace("\"$.seats\"", "\"$.seat_count\"")),
            Ok(vec![])
        );
    }

    /// Hours in October to December 2026 (92 days).
    const QUARTER_HOURS: u32 = 92 * 24;

    /// Events of October to December 2026 from generated (id, hour of the quarter,
    /// model, tokens, user, _) tuples.
    fn quarter_of_events(events: &[(u32, u32, u64, i64, u64, bool)]) -> Vec<DecodedEvent<'static>> {
        let models = ["gpt", "claude", "llama"];
        let start: DateTime<Utc> = "2026-10-01T00:00:00Z".parse().unwrap();
        events
            .iter()
            .map(|&(id, hour, model, n, user, _)| {
                let time = start + chrono::Duration::hours(i64::from(hour));
                let time = time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                tokens(&id.to_string(), &time, models[model as usize], n, user)
            })
            .collect()
    }

    proptest! {
        /// Replaying a stream, in any order, with any retries, gives the same period
        /// totals as the stream once.
        #[test]
        fn totals_survive_replays_and_shuffles(
            events in proptest::collection::vec((0u32..500, 0u32..720, 0u64..3, 1i64..1000, 0u64..5), 1..80),
            seed in any::<u64>(),
        ) {
            let models = ["gpt", "claude", "llama"];
            // Distinct ids: a stream's retries are then identical resends, the case whose
            // outcome must not depend on order (for conflicts, arrival order decides).
            let mut seen = std::collections::HashSet::new();
            let stream: Vec<DecodedEvent<'static>> = events
                .iter()
                .filter(|e| seen.insert(e.0))
                .map(|&(id, hour, model, n, user)| {
                    let time = format!("2026-11-{:02}T{:02}:00:00Z", 1 + hour / 24, hour % 24);
                    tokens(&id.to_string(), &time, models[model as usize], n + i64::from(id) * 1000, user)
                })
                .collect();
            let mut once = Aggregator::batch(&config(), 0);
            for e in &stream {
                once.apply(e);
            }
            let mut replayed = stream.clone();
            replayed.extend(stream.iter().cloned());
            let mut s = seed;
            for i in (1..replayed.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                replayed.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut twice = Aggregator::batch(&config(), 0);
            for e in &replayed {
                twice.apply(e);
            }
            let period = Period::from_str("2026-11").unwrap();
            prop_assert_eq!(once.period_usage(period), twice.period_usage(period));
        }

        /// Merging the changes of every drain, in order, into a new aggregator rebuilds
        /// the original's state: the same keys, windows and periods, so the rebuilt one
        /// treats the rest of the stream exactly as the original does.
        #[test]
        fn merged_changes_rebuild_the_state(
            events in proptest::collection::vec((0u32..60, 0u32..QUARTER_HOURS, 0u64..3, 1i64..1000, 0u64..5, any::<bool>()), 1..120),
            split in 0usize..120,
        ) {
            let stream = quarter_of_events(&events);
            let split = split.min(stream.len());
            let mut original = Aggregator::streaming(&config());
            let mut rebuilt = Aggregator::streaming(&config());
            for (e, &(.., drain_after)) in stream[..split].iter().zip(&events) {
                original.apply(e);
                if drain_after {
                    rebuilt.merge(original.drain().1).unwrap();
                }
            }
            rebuilt.merge(original.drain().1).unwrap();
            for e in &stream[split..] {
                prop_assert_eq!(original.apply(e), rebuilt.apply(e));
            }
            prop_assert_eq!(original.drain_updates(), rebuilt.drain_updates());
            let mut from_parts = Aggregator::streaming(&config());
            for part in original.snapshot().split(7) {
                from_parts.merge(part).unwrap();
            }
            prop_assert_eq!(from_parts.snapshot(), original.snapshot());
            for period in ["2026-10", "2026-11", "2026-12"] {
                let period = Period::from_str(period).unwrap();
                prop_assert_eq!(original.period_usage(period), rebuilt.period_usage(period));
            }
        }

        /// The changelog's layout: each drain's keys kept apart from its usage changes,
        /// the usage rewritten now and then as a snapshot that replaces the changes
        /// before it, records of keys gathered into one now and then, and a record of
        /// keys dropped once its newest day is forgotten.
        /// Merging what is left, the keys last, treats the rest of the stream exactly
        /// as the original does.
        #[test]
        fn usage_snapshots_with_keys_kept_apart_rebuild_the_state(
            events in proptest::collection::vec((0u32..60, 0u32..QUARTER_HOURS, 0u64..3, 1i64..1000, 0u64..5, any::<bool>()), 1..120),
            split in 0usize..120,
            snapshot_every in 1usize..6,
            gather_every in 1usize..6,
        ) {
            let stream = quarter_of_events(&events);
            let split = split.min(stream.len());
            let mut original = Aggregator::streaming(&config());
            let mut usage: Vec<Snapshot> = Vec::new();
            let mut keys: Vec<Snapshot> = Vec::new();
            let mut drains = 0;
            let mut commit = |original: &mut Aggregator| {
                let mut changes = original.drain().1;
                keys.push(changes.split_off_dedupe());
                keys.retain(|k| k.newest_dedupe_day().is_some_and(|d| !original.has_forgotten_day(d)));
                if keys.len() >= gather_every {
                    keys = vec![Snapshot::gather_dedupe(std::mem::take(&mut keys))];
                }
                usage.push(changes);
                drains += 1;
                if drains % snapshot_every == 0 {
                    usage = vec![original.usage_snapshot()];
                }
            };
            for (e, &(.., drain_after)) in stream[..split].iter().zip(&events) {
                original.apply(e);
                if drain_after {
                    commit(&mut original);
                }
            }
            commit(&mut original);
            let mut rebuilt = Aggregator::streaming(&config());
            for record in usage.into_iter().chain(keys) {
                rebuilt.merge(record).unwrap();
            }
            prop_assert_eq!(rebuilt.snapshot(), original.snapshot());
            for e in &stream[split..] {
                prop_assert_eq!(original.apply(e), rebuilt.apply(e));
            }
            prop_assert_eq!(original.drain_updates(), rebuilt.drain_updates());
        }
    }
}
