//! Consumer-group membership for a service that owns partitions. In: a
//! [`PartitionOwner`] (the aggregator's or the rater's worker); out: a group consumer
//! whose rebalances call it, its polling with the consumer's health on the service's
//! readiness, consumer lag, committed offsets and the wait for a group to catch up.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::IntGaugeVec;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_schemas::config::{Group, KafkaSettings};

use super::clients::{
    client_config, configured, failed_to, log_client_error, log_librdkafka, tunable, tune_fetching,
    KafkaOpError,
};
use super::read::retry_while_unavailable;
use crate::threads::lock;

/// How often a service calls [`record_lag`]: a scrape interval's worth, so dashboards
/// see each step and the watermark requests stay few.
pub const LAG_RECORD_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `lag{topic, partition}` (a service's `*_consumer_lag_messages`) to how far
/// each assigned partition's position is behind its high watermark, and removes the
/// series of partitions no longer assigned. A partition read nothing from since it
/// was assigned (idle since a restart) has no position yet: `next_offset` gives where
/// its owner starts it (the service chose that offset at assignment), so every held
/// partition has a series. A partition whose watermark cannot be read this time keeps
/// its last value: a scrape never sees a held partition vanish and come back, which
/// would restart a lag alert's `for`. Cheap enough to call every few seconds.
pub fn record_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    lag: &IntGaugeVec,
    next_offset: impl Fn(i32) -> Option<i64>,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let Ok(positions) = consumer.position() else {
        return;
    };
    let held: HashSet<(String, String)> = (assignment.elements().iter())
        .map(|elem| (elem.topic().to_owned(), elem.partition().to_string()))
        .collect();
    let mut exported = Vec::new();
    for family in Collector::collect(lag) {
        for metric in family.get_metric() {
            let label = |name: &str| {
                (metric.get_label().iter())
                    .find(|pair| pair.name() == name)
                    .map_or_else(String::new, |pair| pair.value().to_owned())
            };
            exported.push((label("topic"), label("partition")));
        }
    }
    for gone in exported.iter().filter(|series| !held.contains(series)) {
        // Cannot fail: the labels are the series' own.
        let _ = lag.remove_label_values(&[&gone.0, &gone.1]);
    }
    for elem in assignment.elements() {
        let Ok((_, high)) =
            consumer.fetch_watermarks(elem.topic(), elem.partition(), Duration::from_secs(1))
        else {
            continue;
        };
        let (topic, partition) = (elem.topic(), elem.partition());
        let position = offset_of(&positions, topic, partition).or_else(|| next_offset(partition));
        if let Some(position) = position {
            lag.with_label_values(&[elem.topic(), &elem.partition().to_string()])
                .set((high - position).max(0));
        }
    }
}

/// A consumer-group member that owns partitions: told of each assignment and
/// revocation, inside the consumer's `poll`, on the polling thread. Implementations
/// restore state on assignment (and may choose where each partition starts, by setting
/// its offset in the list) and finish their work on revocation.
pub trait PartitionOwner: Send + Sized + 'static {
    type Error: Send + 'static;

    /// Called with the newly assigned partitions; must end by taking them with
    /// `consumer.incremental_assign(partitions)`.
    fn assign(
        &mut self,
        consumer: &BaseConsumer<GroupContext<Self>>,
        partitions: &mut TopicPartitionList,
    ) -> Result<(), Self::Error>;

    /// Called with the partitions being taken away; must end by releasing them with
    /// `consumer.incremental_unassign(partitions)` (on an error the context releases
    /// them).
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<GroupContext<Self>>,
        partitions: &TopicPartitionList,
    ) -> Result<(), Self::Error>;
}

/// The consumer context of a [`PartitionOwner`] under the cooperative protocol.
#[allow(missing_debug_implementations)] // holds the owner's whole state
pub struct GroupContext<W: PartitionOwner> {
    owner: Arc<Mutex<W>>,
    /// A rebalance step that failed; the consume loop stops with it.
    failure: Mutex<Option<W::Error>>,
    /// Set by [`leave_group`]: partitions assigned while the consumer closes go to the
    /// group's next owner without being restored here.
    leaving: AtomicBool,
}

impl<W: PartitionOwner> GroupContext<W> {
    pub fn new(owner: Arc<Mutex<W>>) -> Self {
        GroupContext {
            owner,
            failure: Mutex::new(None),
            leaving: AtomicBool::new(false),
        }
    }

    /// The error of a failed assignment or revocation, once.
    pub fn take_failure(&self) -> Option<W::Error> {
        lock(&self.failure).take()
    }
}

impl<W: PartitionOwner> ClientContext for GroupContext<W> {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }
}

impl<W: PartitionOwner> ConsumerContext for GroupContext<W> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        // A panic, on this thread or on one that held the owner (a batch applied on a
        // thread of its own, found once its lock is ours): the owner's state may be
        // half-applied (an event counted, its offset passed, its windows not updated),
        // and a revoke, or the commit an assignment begins with, would commit it.
        let (mut owner, panicked) = match self.owner.lock() {
            Ok(owner) => (owner, std::thread::panicking()),
            Err(poisoned) => (poisoned.into_inner(), true),
        };
        let result = match err {
            // Restoring would wait for committed offsets a leaving member cannot read;
            // an owner that panicked takes nothing.
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                if panicked || self.leaving.load(Ordering::SeqCst) =>
            {
                Ok(())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                owner.assign(consumer, partitions)
            }
            // Nothing is committed; the partitions' next owner reads from the last
            // commit. (`tally serve` aborts on a panic before anything unwinds: this
            // guards the library's other users, tests among them.)
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if panicked => {
                tracing::error!("partitions released without committing, as the owner panicked");
                consumer
                    .incremental_unassign(partitions)
                    .map_err(
                        |e| tracing::debug!(error = %e, "releasing partitions while panicking"),
                    )
                    .ok();
                Ok(())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = owner.revoke(consumer, partitions);
                // The owner stops on its error, but the partitions must go all the
                // same: closing the consumer waits for them, and would wait forever.
                if revoked.is_err() {
                    if let Err(e) = consumer.incremental_unassign(partitions) {
                        tracing::debug!(error = %e, "releasing partitions after a failed revocation");
                    }
                }
                revoked
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                Ok(())
            }
        };
        if let Err(e) = result {
            *lock(&self.failure) = Some(e);
        }
    }
}

/// Leaves the consumer group once the owner has finished its work: partitions still
/// held are revoked as the consumer closes, and any assigned meanwhile are left alone.
pub fn leave_group<W: PartitionOwner>(consumer: &BaseConsumer<GroupContext<W>>) {
    consumer.context().leaving.store(true, Ordering::SeqCst);
    consumer.unsubscribe();
}

/// The offset of `partition` of `topic` in `list`, if it is a real offset.
pub fn offset_of(list: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    list.find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
}

/// For each `(partition, next_offset)` of `topic`, the consumer's position where it is
/// past `next_offset`. Called once every record the consumer delivered is processed,
/// the gap holds only what librdkafka steps over without delivering: transaction
/// markers and aborted records (a seek or a new assignment resets the position). A
/// consumer that commits its next offset rather than this position stays one short
/// of the end of a topic written in transactions, a lag monitors never see go.
pub fn positions_ahead<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    next_offsets: impl IntoIterator<Item = (i32, i64)>,
) -> Vec<(i32, i64)> {
    let Ok(positions) = consumer.position() else {
        return Vec::new();
    };
    (next_offsets.into_iter())
        .filter_map(|(partition, next)| {
            let position = offset_of(&positions, topic, partition)?;
            (position > next).then_some((partition, position))
        })
        .collect()
}

/// The group's committed offsets of `partitions`, waiting out what makes them
/// unavailable for a while: a broker restart, or a previous owner's transaction still
/// open because it died mid-commit (it keeps the offsets unstable until it is aborted,
/// after at most `transaction.timeout.ms`).
pub fn committed_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &TopicPartitionList,
) -> Result<TopicPartitionList, KafkaError> {
    retry_while_unavailable(
        "read the committed offsets",
        Duration::from_secs(120),
        || consumer.committed_offsets(partitions.clone(), Duration::from_secs(30)),
    )
}

/// `duration` to the nearest second, for people (what is left of a deadline has
/// nanoseconds).
fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs() + u64::from(duration.subsec_millis() >= 500))
}

/// Why a consumer group was not found caught up with a topic.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    Kafka(#[from] KafkaOpError),
    #[error(
        "group {group} has not read and committed all of {topic} within {}: {}; is it running?",
        humantime::format_duration(whole_seconds(*.patience)),
        short_partitions(.short)
    )]
    Behind {
        group: String,
        topic: String,
        patience: Duration,
        /// `(partition, records short)`.
        short: Vec<(i32, i64)>,
    },
}

fn short_partitions(short: &[(i32, i64)]) -> String {
    let named: Vec<String> = (short.iter())
        .map(|(partition, records)| format!("partition {partition} is {records} records short"))
        .collect();
    named.join(", ")
}

/// Waits until consumer group `group` has committed, on each of the first `partitions`
/// partitions of `topic` (the pipeline's: partitions added to the events topic later
/// are read by no aggregator), the end the partition had when this was called (its
/// high watermark): everything written there before then is read, and what the group
/// makes of it stored (Tally's services commit only what they stored). An empty
/// partition counts as read. The group is only asked, never joined. `Behind` after
/// `patience`.
pub fn wait_until_caught_up(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
    partitions: usize,
    patience: Duration,
) -> Result<(), CatchUpError> {
    let consumer: BaseConsumer = client_config(settings)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(failed_to("create a consumer to read committed offsets"))?;
    let mut ends = Vec::new();
    let mut asked = TopicPartitionList::new();
    for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
        let (low, high) = retry_while_unavailable("read a partition's end", patience, || {
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))
        })
        .map_err(failed_to(format!(
            "read the end of {topic} partition {partition}"
        )))?;
        if high > low {
            ends.push((partition, high));
            asked.add_partition(topic, partition);
        }
    }
    let deadline = std::time::Instant::now() + patience;
    loop {
        let committed = committed_offsets(&consumer, &asked)
            .map_err(failed_to(format!("read group {group}'s committed offsets")))?;
        let short: Vec<(i32, i64)> = (ends.iter())
            .filter_map(|&(partition, end)| {
                let at = offset_of(&committed, topic, partition).unwrap_or(0);
                (at < end).then_some((partition, end - at))
            })
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(CatchUpError::Behind {
                group: group.to_owned(),
                topic: topic.to_owned(),
                patience,
                short,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One poll of a [`group_consumer`]. `Ok(Some)`: a message; `Ok(None)`: nothing within
/// `wait`, or a consumer error that passes (logged; librdkafka retries, and `health`
/// tells readiness once they have gone on too long). `Err`: what ends the consume
/// loop, a rebalance step the owner failed, or a fatal consumer error made the
/// owner's by `fatal`.
pub fn poll_group<'c, O: PartitionOwner, E: Into<O::Error>>(
    consumer: &'c BaseConsumer<GroupContext<O>>,
    wait: Duration,
    health: &mut ConsumerHealth,
    fatal: impl FnOnce(KafkaError) -> E,
) -> Result<Option<BorrowedMessage<'c>>, O::Error> {
    let polled = consumer.poll(wait);
    if let Some(failure) = consumer.context().take_failure() {
        return Err(failure);
    }
    match polled {
        Some(Ok(message)) => {
            health.succeeded();
            Ok(Some(message))
        }
        Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => Err(fatal(e).into()),
        Some(Err(e)) => {
            log_consumer_error(&e);
            health.failed(&e, Instant::now());
            Ok(None)
        }
        None => {
            health.quiet(Instant::now());
            health.settle_standby(consumer, Instant::now());
            Ok(None)
        }
    }
}

/// How often a member holding no partitions asks whether its group has settled.
const STANDBY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long a member holds none before it is a standby when its group's state cannot
/// be read: longer than the two steps of a rebalance take.
const STANDBY_WITHOUT_ANSWER: Duration = Duration::from_secs(30);

/// The partitions a group consumer holds, paused ones included.
pub fn held_partitions<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> usize {
    consumer.assignment().map_or(0, |a| a.count())
}

/// How long a group consumer's polls may keep failing before its service says it is
/// not ready: longer than a broker takes to restart, so routine restarts do not flap.
const CONSUMER_FAILING_AFTER: Duration = Duration::from_secs(30);

/// A run of consumer errors ends after this long without one, or at the next message.
/// librdkafka reports an error that repeats (a broker still refusing connections) once
/// every 30 s, so a run must outlast that to be seen as one.
const CONSUMER_QUIET_AFTER: Duration = Duration::from_secs(60);

/// Whether a group consumer keeps failing: a consumer that cannot join its group (a
/// session timeout the broker refuses, a missing ACL) or reach its brokers makes no
/// progress, and its service must not report ready while it bills nothing.
#[derive(Debug)]
pub struct ConsumerHealth {
    readiness: crate::ops::Readiness,
    /// The first and the latest error of the current run of them.
    failing: Option<(Instant, Instant)>,
    /// The consumer's group, and the partitions of the topic it reads.
    group: String,
    partitions: usize,
    /// When a member holding no partitions last asked its group whether it is a
    /// standby.
    standby_asked: Option<Instant>,
}

impl ConsumerHealth {
    pub fn new(readiness: crate::ops::Readiness, group: String, partitions: usize) -> Self {
        ConsumerHealth {
            readiness,
            failing: None,
            group,
            partitions,
            standby_asked: None,
        }
    }

    /// Makes a member holding no partitions ready once it is a standby: its group
    /// stable, with more members than partitions. With as many members or fewer, the
    /// group's cooperative assignment gives each member some, so a member holding none
    /// is between the two steps of a rebalance and becomes ready when it has restored
    /// its partitions. The group is first asked about [`STANDBY_CHECK_EVERY`] after
    /// the member was left with none (the group is stable for a moment between the
    /// two steps). If its state cannot be read (a broker of several not answering),
    /// holding none for [`STANDBY_WITHOUT_ANSWER`] makes it a standby too.
    fn settle_standby<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, now: Instant) {
        let Some(since) = self.readiness.holding_none_since() else {
            return;
        };
        let last = self
            .standby_asked
            .filter(|&asked| asked > since)
            .unwrap_or(since);
        if now.saturating_duration_since(last) < STANDBY_CHECK_EVERY {
            return;
        }
        self.standby_asked = Some(now);
        if held_partitions(consumer) > 0 {
            return;
        }
        let stable = match consumer.fetch_group_list(Some(&self.group), Duration::from_secs(1)) {
            Ok(list) => (list.groups().iter()).any(|g| {
                g.name() == self.group
                    && g.state() == "Stable"
                    && g.members().len() > self.partitions
            }),
            Err(_) => now.saturating_duration_since(since) >= STANDBY_WITHOUT_ANSWER,
        };
        if stable {
            tracing::info!(group = %self.group, partitions = self.partitions, "a standby: the group is stable with more members than partitions (or did not say for a while), and this one holds none");
            self.readiness.ready();
        }
    }

    fn failed(&mut self, error: &KafkaError, now: Instant) {
        let since = self.failing.map_or(now, |(since, _)| since);
        self.failing = Some((since, now));
        let failing_for = now - since;
        if failing_for >= CONSUMER_FAILING_AFTER {
            self.readiness.consumer_failing(format!(
                "the Kafka consumer failed for {} s, consuming nothing, up to its latest error: {error}. Ready again once it consumes, or after {} s without an error",
                failing_for.as_secs(),
                CONSUMER_QUIET_AFTER.as_secs()
            ));
        }
    }

    fn succeeded(&mut self) {
        if self.failing.take().is_some() {
            self.readiness.consumer_recovered();
        }
    }

    fn quiet(&mut self, now: Instant) {
        if (self.failing).is_some_and(|(_, last)| now - last >= CONSUMER_QUIET_AFTER) {
            self.succeeded();
        }
    }
}

/// Logs an error a consumer's `poll` returned, which librdkafka retries by itself.
/// Lost broker connections are left at debug: the client's error callback has logged
/// them already, and during an outage every poll returns them again.
fn log_consumer_error(error: &KafkaError) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            tracing::debug!(%error, "consumer error; retrying");
        }
        _ => tracing::warn!(%error, "consumer error; retrying"),
    }
}

/// The `client.id` of a service instance's group consumer (unless `[kafka] properties`
/// sets one for every client): how the group's member list tells instances apart.
fn member_client_id(settings: &KafkaSettings, service: Group) -> String {
    format!("tally-{service}-{}", settings.instance_id)
}

/// Why a service instance did not start.
#[derive(Debug, thiserror::Error)]
#[error("another {service} with TALLY_INSTANCE_ID {instance_id} is a live member of group {group} (its client {client_id} on {host}, still there after {} s): two with one id would fence each other in turn. This one does not start; give each instance its own TALLY_INSTANCE_ID (the default, the host name, is the same for two processes on one host)", .waited.as_secs())]
pub struct InstanceInUse {
    pub service: Group,
    pub instance_id: String,
    pub group: String,
    pub client_id: String,
    pub host: String,
    pub waited: Duration,
}

/// Waits until no live member of `service`'s group is this instance (the same client
/// id), for at most the group's session timeout and 5 s: a previous run that died is
/// dropped from the group once its session expires, but a member still there after
/// that, in a stable group, is another process with this instance id. A group still
/// rebalancing then (a member that died while joining stays until the join ends) is
/// given the benefit of the doubt, as are Kafka not answering, a `client.id` of the
/// operator's (shared by every instance) and a shutdown requested meanwhile.
pub fn wait_until_instance_free(
    settings: &KafkaSettings,
    service: Group,
    shutdown: &crate::Shutdown,
) -> Result<(), Box<InstanceInUse>> {
    if settings.properties.contains_key("client.id") {
        return Ok(());
    }
    let session = configured(settings, "session.timeout.ms")
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(SESSION_TIMEOUT, Duration::from_millis);
    let patience = session + Duration::from_secs(5);
    let (group, client_id) = (settings.group(service), member_client_id(settings, service));
    let Ok(consumer) = client_config(settings).create::<BaseConsumer>() else {
        return Ok(());
    };
    let started = Instant::now();
    while !shutdown.is_requested() {
        let Ok(groups) = consumer.fetch_group_list(Some(&group), Duration::from_secs(10)) else {
            return Ok(());
        };
        let found = (groups.groups().iter()).find_map(|g| {
            let member = g.members().iter().find(|m| m.client_id() == client_id)?;
            Some((g.state() == "Stable", member))
        });
        let Some((stable, member)) = found else {
            return Ok(());
        };
        if started.elapsed() >= patience {
            if !stable {
                return Ok(());
            }
            return Err(Box::new(InstanceInUse {
                service,
                instance_id: settings.instance_id.clone(),
                group,
                client_id,
                host: member.client_host().to_owned(),
                waited: started.elapsed(),
            }));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// The group consumers' `session.timeout.ms` unless `[kafka] properties` sets it: a
/// member that died is noticed within it, and its partitions move on.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer-group member for a [`PartitionOwner`]: cooperative-sticky assignment,
/// read committed, offsets committed only by the owner (never automatically), reading
/// from the beginning when the group has no offsets, and subscribed to `topic`.
pub fn group_consumer<W: PartitionOwner>(
    settings: &KafkaSettings,
    service: Group,
    topic: &str,
    owner: Arc<Mutex<W>>,
) -> Result<BaseConsumer<GroupContext<W>>, KafkaError> {
    let mut config = client_config(settings);
    // Restores and rebuilds run in the rebalance callback, after `poll` returned its
    // event, so they count against this: allow them time before the group gives up on
    // the member. `[kafka] properties` may raise it for states that take longer.
    tunable(&mut config, "max.poll.interval.ms", "900000");
    tunable(
        &mut config,
        "session.timeout.ms",
        &SESSION_TIMEOUT.as_millis().to_string(),
    );
    tunable(&mut config, "heartbeat.interval.ms", "1000");
    tunable(
        &mut config,
        "client.id",
        &member_client_id(settings, service),
    );
    let consumer: BaseConsumer<GroupContext<W>> = tune_fetching(
        config
            .set("group.id", settings.group(service))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky"),
    )
    .create_with_context(GroupContext::new(owner))?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn a_consumer_failing_for_long_makes_its_service_not_ready_until_it_recovers() {
        let readiness = crate::ops::Readiness::new("starting");
        readiness.ready();
        let mut health = ConsumerHealth::new(readiness.clone(), "group".to_owned(), 1);
        let error = KafkaError::MessageConsumption(RDKafkaErrorCode::InvalidSessionTimeout);
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // Errors every 2 s: ready for the first 30 s (a broker restart), then not.
        for seconds in (0..30).step_by(2) {
            health.failed(&error, at(seconds));
        }
        assert_eq!(readiness.reason(), None);
        health.failed(&error, at(30));
        let reason = readiness.reason().expect("not ready");
        assert!(
            reason.contains("failed for 30 s") && reason.contains("session timeout"),
            "{reason}"
        );
        // The service's own reasons do not clear it.
        readiness.ready();
        assert!(readiness.reason().is_some());
        // Quiet for less than a minute: still failing (librdkafka repeats an error
        // every 30 s); for a minute: recovered.
        health.quiet(at(89));
        assert!(readiness.reason().is_some());
        health.quiet(at(90));
        assert_eq!(readiness.reason(), None);
        // A new run of errors counts from its own start: errors 30 s apart are one.
        health.failed(&error, at(100));
        health.failed(&error, at(129));
        assert_eq!(readiness.reason(), None);
        health.failed(&error, at(130));
        assert!(readiness.reason().is_some());
        // A message ends it at once.
        health.succeeded();
        assert_eq!(readiness.reason(), None);
    }

    #[test]
    fn a_group_behind_is_told_in_whole_seconds() {
        let behind = CatchUpError::Behind {
            group: "g".to_owned(),
            topic: "t".to_owned(),
            patience: Duration::from_nanos(19_523_503_197),
            short: vec![(0, 3)],
        };
        assert!(
            behind
                .to_string()
                .starts_with("group g has not read and committed all of t within 20s: "),
            "{behind}"
        );
    }
}
