//! `tally serve`: the streaming services, one or all three in this process.
//!
//! Reads tally.toml (price book plus `[kafka]`, `[clickhouse]`, `[ingest]`,
//! `[aggregator]`, `[rater]`) with environment overrides, creates the topics if
//! missing, serves each service's `/metrics`, `/healthz` and `/readyz`, and runs until
//! SIGINT or SIGTERM, when each service finishes its in-flight work: ingest answers
//! the requests it has, the aggregator commits its transaction, the rater stores its
//! lines.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use prometheus::Registry;
use tally_aggregator::service::AggregatorMetrics;
use tally_ingest::http::KeyReloader;
use tally_rater::clickhouse::ClickHouse;
use tally_rater::service::RaterMetrics;
use tally_runtime::ops::{self, Readiness};
use tally_runtime::Shutdown;
use tally_schemas::config::{ApiKey, Config, ServiceSettings};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// HTTP API: CloudEvents in, to the events topic.
    Ingest,
    /// Dedupe and windows, exactly once, with Kafka transactions.
    Aggregator,
    /// Prices windows into invoice lines in ClickHouse.
    Rater,
    /// The three in one process, for small deployments.
    All,
}

impl Service {
    /// As `tally serve` names it.
    fn name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Aggregator => "aggregator",
            Service::Rater => "rater",
            Service::All => "all",
        }
    }

    /// Whether running `self` runs `service`.
    fn runs(self, service: Service) -> bool {
        self == service || self == Service::All
    }
}

/// What `service` needs of the settings that their validation leaves to the services
/// that need it: ingest's API keys, whose secrets only ingest's environment holds, and
/// the rater's ClickHouse CA file, which only its host has. `tally validate --service`
/// asks the same, so a deployment's check fails as the start would.
pub fn check_can_start(service: Service, settings: &ServiceSettings) -> anyhow::Result<()> {
    if service.runs(Service::Ingest) && !settings.ingest.unresolved_keys.is_empty() {
        let problems: Vec<String> = (settings.ingest.unresolved_keys.iter())
            .map(|(at, message)| format!("  - {at}: {message}"))
            .collect();
        anyhow::bail!(
            "ingest's API keys are missing (a key_env variable is read from the environment ingest started with):\n{}",
            problems.join("\n")
        );
    }
    if service.runs(Service::Rater) {
        ClickHouse::configured(&settings.clickhouse).context("the rater cannot start")?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Which service to run.
    #[arg(value_enum)]
    service: Service,
    /// The configuration file.
    #[arg(long, default_value = "tally.toml")]
    config: PathBuf,
    /// Log lines as text or as JSON objects (one per line). Levels: RUST_LOG.
    #[arg(
        long,
        value_enum,
        env = "TALLY_LOG_FORMAT",
        default_value = "text",
        ignore_case = true
    )]
    log_format: LogFormat,
}

/// Runs `tally serve` to its end. Its error is logged, as everything else the services
/// say (one JSON object per line with `--log-format json`), not printed apart.
pub fn run(args: ServeArgs) -> ExitCode {
    init_logs(args.log_format);
    abort_on_panic();
    match serve_until_stopped(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = crate::describe(&e), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn serve_until_stopped(args: ServeArgs) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(&args.config)?);
    for warning in config
        .warnings
        .iter()
        .chain(&crate::unread_variables(&config))
    {
        tracing::warn!(at = %warning.at, "{}", warning.message);
    }
    let origin = args.config.display().to_string();
    let settings = config.services(&origin, &crate::environment)?;
    tally_runtime::kafka::check_properties(&settings.kafka)
        .with_context(|| format!("{origin} is not valid"))?;
    tracing::info!(
        service = args.service.name(),
        instance = %settings.kafka.instance_id,
        version = %*crate::VERSION,
        config = %origin,
        price_book = %config.hash,
        kafka = %settings.kafka.brokers,
        topic_prefix = %settings.kafka.topic_prefix,
        "starting"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args.service, config, settings, args.config))
}

/// Reads ingest's API keys again from the configuration at `path` (with the
/// environment's key variables) at each SIGHUP, until shutdown, and puts them in use:
/// a key is rotated or revoked without a restart. A configuration that cannot be read,
/// or names a key variable that is not set, leaves the keys in use as they are. Only
/// the keys are read again; other changes take effect at the next start.
async fn reload_keys_on_hangup(
    mut hangups: Signal,
    path: PathBuf,
    keys: KeyReloader,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.requested() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        let read = || -> anyhow::Result<Vec<ApiKey>> {
            let config = Config::load(&path)?;
            let settings = config.services(&path.display().to_string(), &crate::environment)?;
            check_can_start(Service::Ingest, &settings)?;
            Ok(settings.ingest.api_keys)
        };
        match read() {
            Ok(api_keys) => {
                let tenants: std::collections::BTreeSet<&str> =
                    api_keys.iter().map(|key| key.tenant.as_str()).collect();
                let tenants = tenants.into_iter().collect::<Vec<_>>().join(", ");
                match api_keys.is_empty() {
                    true => tracing::warn!("SIGHUP: API keys read again: there are none, so every POST /v1/events is refused with 401"),
                    false => tracing::info!(keys = api_keys.len(), %tenants, "SIGHUP: API keys read again and in use (every key's rate limit starts again full)"),
                }
                keys.replace(api_keys);
            }
            Err(e) => tracing::error!(
                error = crate::describe(&e),
                "SIGHUP: API keys not read again; the ones in use stay"
            ),
        }
    }
}

/// A panic in a service stops the process at once, as a crash does. Unwinding would
/// drop the aggregator's Kafka consumer, whose revoke callback commits the open
/// transaction: with the panicking event's offset in it and its changes perhaps half
/// made. After a crash the transaction is aborted and the partition restored instead.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn init_logs(format: LogFormat) {
    // An empty RUST_LOG would be a filter with no directives, logging nothing.
    let directives = (std::env::var("RUST_LOG").ok()).filter(|d| !d.trim().is_empty());
    let parsed = directives
        .as_deref()
        .map(|d| (d, tracing_subscriber::EnvFilter::try_new(d)));
    let (filter, refused) = match parsed {
        Some((_, Ok(filter))) => (filter, None),
        Some((directives, Err(e))) => (
            tracing_subscriber::EnvFilter::new("info"),
            Some((directives, e)),
        ),
        None => (tracing_subscriber::EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk under a redirected stderr)
        // is lost; reporting that on stderr too would panic, and a panic aborts the
        // service: billing must not stop for want of a log line.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some((directives, error)) = refused {
        tracing::warn!(rust_log = directives, %error, "RUST_LOG cannot be read, so the services log at info; write it as e.g. \"info,tally_aggregator=debug\"");
    }
}

async fn serve(
    service: Service,
    config: Arc<Config>,
    settings: ServiceSettings,
    path: PathBuf,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    // Taken over at once: SIGHUP's default would end the process without a commit.
    let hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let runs = |s: Service| service.runs(s);
    check_can_start(service, &settings)?;
    let price_book = config.hash.to_string();
    // What each service's tally_price_book_info names.
    let pipeline = (price_book.as_str(), settings.kafka.topic_prefix.as_str());
    // Their endpoints first: a service waiting for Kafka answers probes, and says why
    // it is not ready.
    let aggregator = match runs(Service::Aggregator) {
        true => Some(
            Endpoint::open(
                settings.aggregator.metrics_listen,
                "aggregator metrics",
                pipeline,
                &shutdown,
                AggregatorMetrics::new,
            )
            .await?,
        ),
        false => None,
    };
    let rater = match runs(Service::Rater) {
        true => {
            let listen = settings.rater.metrics_listen;
            let metrics = RaterMetrics::new;
            Some(Endpoint::open(listen, "rater metrics", pipeline, &shutdown, metrics).await?)
        }
        false => None,
    };
    let waiting: Vec<&Readiness> = (aggregator.iter().map(|e| &e.readiness))
        .chain(rater.iter().map(|e| &e.readiness))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    // Ingest first: while Kafka is awaited it listens, answering 503 with Retry-After,
    // as it does when Kafka goes away later.
    if runs(Service::Ingest) {
        let (config, settings, shutdown) =
            (Arc::clone(&config), settings.clone(), shutdown.clone());
        tasks.spawn(async move {
            let running = tally_ingest::http::start(config, settings, shutdown.clone())
                .await
                .context("ingest")?;
            let reload = reload_keys_on_hangup(hangups, path, running.keys.clone(), shutdown);
            let reloading = tokio::spawn(reload);
            let stopped = running.wait().await.context("ingest");
            reloading.abort();
            stopped
        });
    } else {
        tokio::spawn(async move {
            let mut hangups = hangups;
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: only ingest reads anything again (its API keys)");
            }
        });
    }
    let mut outcome = Ok(());
    let partition_count = match waiting.is_empty() {
        true => None,
        false => tokio::select! {
            found = ensure_topics(&settings, &shutdown, &waiting) => match found {
                Ok(Some(count)) => Some(count),
                Ok(None) => {
                    tracing::info!("stopped before Kafka answered");
                    None
                }
                Err(e) => {
                    outcome = Err(e);
                    None
                }
            },
            // Ingest stopped while Kafka was awaited (it could not listen, say): the
            // others are not started.
            Some(joined) = tasks.join_next() => {
                if !shutdown.is_requested() {
                    tracing::info!("a service stopped; stopping the others");
                }
                outcome = joined.context("a service panicked").and_then(|r| r);
                shutdown.request();
                None
            }
        },
    };
    if outcome.is_err() {
        shutdown.request();
    }
    if let Some(partition_count) = partition_count {
        let stream = StreamServiceContext {
            config: &config,
            settings: &settings,
            partition_count,
            shutdown: &shutdown,
        };
        if let Some(endpoint) = aggregator {
            let run = tally_aggregator::service::run;
            stream.spawn(&mut tasks, "aggregator", endpoint, run);
        }
        if let Some(endpoint) = rater {
            stream.spawn(&mut tasks, "rater", endpoint, tally_rater::service::run);
        }
    }
    // The first service to stop, with or without an error, stops the others.
    while let Some(joined) = tasks.join_next().await {
        let result = joined.context("a service panicked").and_then(|r| r);
        if !shutdown.is_requested() {
            tracing::info!("a service stopped; stopping the others");
            shutdown.request();
        }
        if let Err(e) = result {
            // The first is the cause; the others stopped because it did.
            if outcome.is_ok() {
                outcome = Err(e);
            } else {
                tracing::warn!(error = crate::describe(&e), "another service failed too");
            }
        }
    }
    tracing::info!("stopped");
    outcome
}

/// What the Kafka services (the aggregator and the rater) start from.
struct StreamServiceContext<'a> {
    config: &'a Arc<Config>,
    settings: &'a ServiceSettings,
    /// The topics' partitions, from [`ensure_topics`].
    partition_count: NonZeroUsize,
    shutdown: &'a Shutdown,
}

/// A Kafka service's entry point: runs it on the calling thread until shutdown.
type RunService<M, E> =
    fn(Arc<Config>, &ServiceSettings, NonZeroUsize, M, Readiness, Shutdown) -> Result<(), E>;

/// A Kafka service's `/metrics`, `/healthz` and `/readyz`, served from before it
/// starts: its metrics (exported from the start, the counters at 0, so alerts and
/// dashboards see them while it waits for Kafka) and its readiness.
struct Endpoint<M> {
    metrics: M,
    readiness: Readiness,
}

impl<M> Endpoint<M> {
    /// Serves them on `listen` (`what` names them in the log) until shutdown.
    async fn open(
        listen: SocketAddr,
        what: &'static str,
        (price_book, topic_prefix): (&str, &str),
        shutdown: &Shutdown,
        new_metrics: fn(Registry) -> M,
    ) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let readiness = Readiness::new("starting: preparing Kafka's topics");
        let router = ops::router(
            registry.clone(),
            readiness.clone(),
            price_book,
            topic_prefix,
        );
        ops::serve(listen, what, router, shutdown.clone()).await?;
        Ok(Endpoint {
            metrics: new_metrics(registry),
            readiness,
        })
    }
}

impl StreamServiceContext<'_> {
    /// Runs the service on a blocking thread of `tasks`, its metrics in `endpoint`.
    fn spawn<M, E>(
        &self,
        tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
        name: &'static str,
        endpoint: Endpoint<M>,
        run: RunService<M, E>,
    ) where
        M: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let Endpoint { metrics, readiness } = endpoint;
        let (config, settings, partition_count, shutdown) = (
            Arc::clone(self.config),
            self.settings.clone(),
            self.partition_count,
            self.shutdown.clone(),
        );
        tasks.spawn_blocking(move || {
            run(
                config,
                &settings,
                partition_count,
                metrics,
                readiness,
                shutdown,
            )
            .context(name)
        });
    }
}

/// Creates the topics, waiting for Kafka for up to two minutes (it may be starting
/// alongside), each service in `waiting` not ready meanwhile, saying why; returns
/// their partition count, or `None` when asked to stop meanwhile.
async fn ensure_topics(
    settings: &ServiceSettings,
    shutdown: &Shutdown,
    waiting: &[&Readiness],
) -> anyhow::Result<Option<NonZeroUsize>> {
    let mut wait = Duration::from_millis(250);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let brokers = &settings.kafka.brokers;
    let probe = Arc::new(tally_runtime::kafka::BrokerProbe::new(&settings.kafka)?);
    loop {
        let asking = Arc::clone(&probe);
        let answered = tokio::task::spawn_blocking(move || asking.answers(Duration::from_secs(5)))
            .await
            .context("the Kafka probe panicked")?;
        let prepared = match answered {
            Ok(()) => tally_runtime::kafka::ensure_topics(&settings.kafka).await,
            Err(e) => Err(e),
        };
        let error = match prepared {
            Ok(partitions) => return Ok(Some(partitions)),
            Err(e) if !e.is_unavailable() => return Err(e.into()),
            Err(e) => e,
        };
        if shutdown.is_requested() {
            return Ok(None);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(error).with_context(|| {
                format!("Kafka at {brokers} did not answer within 2 minutes; is it running, and are [kafka] brokers and properties right?")
            });
        }
        tracing::warn!(error = %error, "waiting for Kafka; retrying");
        for readiness in waiting {
            readiness.not_ready(format!("waiting for Kafka: {error}"));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
