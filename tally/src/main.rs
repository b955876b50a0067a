//! The `tally` command.
//!
//! Layout:
//! - `validate`: lint a tally.toml ([`tally_schemas::config`]).
//! - `rate`: batch-rate one month of events for finance (`batch.rs`, `summary.rs`,
//!   `report.rs`).
//! - `explain`: one customer's invoice of a month worked through (`explain/`).
//! - `reconcile`: two sets of a month's invoice lines compared (`reconcile/`).
//! - `demo`: generate a realistic month and run it through the embedded pipeline
//!   (`demo/`, `embedded/`).
//! - `generate`: the demo's deterministic event generator on its own, for benchmarks.
//! - `serve`: the streaming services on Kafka and ClickHouse (`serve.rs`).
//! - `close-period`: close a billing month in the streaming pipeline.

mod batch;
mod demo;
mod embedded;
mod explain;
mod reconcile;
mod report;
mod serve;
mod summary;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tally_rater::clickhouse::ClickHouse;
use tally_schemas::config::{
    book_changes, ClickHouseFlags, Config, ConfigError, ConfigFile, ConfigIssue, Group,
    HumanDuration,
};
use tally_schemas::time::Period;

use crate::batch::{rate_events, read_input, BatchOptions};
use crate::report::{counted, write_lines, Format};

/// The release and the commit it was built from.
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (commit {})",
        tally_runtime::VERSION,
        tally_runtime::COMMIT
    )
});

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version = VERSION.as_str(),
    about = "Usage metering and rating for AI products"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a configuration and summarise what it defines.
    Validate {
        /// The configuration file.
        #[arg(long, default_value = "tally.toml")]
        config: PathBuf,
        /// Also fail where this service could not start in this environment (ingest
        /// without its API keys' secrets), as `tally serve` would.
        #[arg(long, value_enum)]
        service: Option<serve::Service>,
        /// The price book the pipeline runs now: list what this one changes of it, and
        /// what each change does to the pipeline's months, before it is deployed.
        #[arg(long, value_name = "TOML")]
        deployed: Option<PathBuf>,
    },
    /// Rate one calendar month (UTC) of usage events into invoice lines.
    Rate(RateArgs),
    /// Show how one customer's invoice of a month adds up: events, usage by day, each
    /// tier, rounding and discount; from an events file or the streaming pipeline's
    /// ClickHouse.
    Explain(explain::ExplainArgs),
    /// Compare two sets of a month's invoice lines (files of another biller or of
    /// `tally rate`, or ClickHouse) line by line. Exit status 0 when they agree, 1 when
    /// they differ, 2 on an error.
    Reconcile(reconcile::ReconcileArgs),
    /// Generate a month of AI usage and run it through the embedded pipeline.
    Demo(demo::DemoArgs),
    /// Write a deterministic synthetic month of events and a configuration for it.
    Generate(demo::GenerateArgs),
    /// Run a streaming service: ingest, aggregator, rater, or all three.
    Serve(serve::ServeArgs),
    /// Close a month in the streaming pipeline now, whatever the events' times: its usage
    /// read afterwards is billed as an adjustment in a later month.
    ClosePeriod {
        /// The configuration file (its `[kafka]` section).
        #[arg(long, default_value = "tally.toml")]
        config: PathBuf,
        /// The month to close, with every earlier one, e.g. 2026-10. It must have ended.
        #[arg(long)]
        period: Period,
        /// Then wait, at most this long (10m when no limit is given), until the
        /// aggregators have read the close and the raters have stored all they wrote
        /// before it: the month's invoice lines in ClickHouse then hold every event
        /// that arrived before the close. Exit status 1 if they have not by then.
        #[arg(long, value_name = "LIMIT", num_args = 0..=1, default_missing_value = "10m")]
        wait: Option<humantime::Duration>,
    },
}

/// What `tally rate` and `tally explain` rate, and how.
#[derive(Debug, Args)]
pub struct RatedMonth {
    /// The configuration file.
    #[arg(long, default_value = "tally.toml")]
    pub config: PathBuf,
    /// The month to rate, e.g. 2026-11: [first day 00:00, first day of next month 00:00) UTC.
    #[arg(long)]
    pub period: Period,
    /// The clock events may not be ahead of (RFC 3339); default: now. `tally explain`
    /// gives the lines `tally rate` gave only with the same clock.
    #[arg(long)]
    now: Option<DateTime<Utc>>,
    /// Decoding threads; default: the machine's cores.
    #[arg(long)]
    threads: Option<usize>,
}

impl RatedMonth {
    /// The batch run's options; `started` is the clock when `--now` is not given.
    pub fn options(
        &self,
        started: DateTime<Utc>,
        strict: bool,
        explained_customer: Option<String>,
    ) -> BatchOptions {
        BatchOptions {
            period: self.period,
            now: self.now.unwrap_or(started),
            workers: self.threads.unwrap_or_else(default_threads),
            strict,
            explained_customer,
            keep_counted_events: false,
        }
    }
}

#[derive(Debug, Args)]
struct RateArgs {
    #[command(flatten)]
    month: RatedMonth,
    /// CloudEvents JSON lines; `-` reads stdin.
    #[arg(long)]
    events: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Where to write invoice lines; standard output if omitted.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where rejected lines go, one JSON object each with line, field, code, reason and raw.
    #[arg(long, default_value = "rejects.jsonl")]
    rejects: PathBuf,
    /// Also write the run's summary as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Stop with an error at the first bad line instead of rejecting it.
    #[arg(long)]
    strict: bool,
    /// Rate every customer as if billed in the month, whatever its `from` and
    /// `through`: what Tally would bill a cohort another biller still invoices, to
    /// compare with that biller's lines (`tally reconcile`) while both run. Not for
    /// invoicing, so not with --clickhouse.
    #[arg(long, conflicts_with = "clickhouse")]
    shadow: bool,
    /// Also store the lines in ClickHouse, e.g. http://127.0.0.1:8123 (its HTTP
    /// interface). Lines are keyed by id and versioned by the run's start, so the view
    /// `invoice_lines` always shows the latest run's lines of the period, and none it
    /// no longer makes. The user, password and CA file (for https) are tally.toml's
    /// `[clickhouse]` ones, or TALLY_CLICKHOUSE_USER, TALLY_CLICKHOUSE_PASSWORD and
    /// TALLY_CLICKHOUSE_CA_FILE.
    #[arg(long, value_name = "URL")]
    clickhouse: Option<String>,
    /// The ClickHouse database the lines go to. Not the streaming rater's (`tally`):
    /// batch rows are versioned by the run's start and would hide its updates.
    #[arg(long, default_value = "tally_batch", requires = "clickhouse")]
    clickhouse_database: String,
}

fn main() -> ExitCode {
    // Empty counts as unset for every variable Tally reads; clap would refuse this one
    // without naming it. (Nothing else runs yet to read the environment meanwhile.)
    if std::env::var_os("TALLY_LOG_FORMAT").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("TALLY_LOG_FORMAT");
    }
    let cli = Cli::parse();
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    let (result, on_error) = match cli.command {
        Command::Validate {
            config,
            service,
            deployed,
        } => (done(validate(&config, service, deployed.as_deref())), 1),
        Command::Rate(args) => (done(rate(args)), 1),
        Command::Explain(args) => (done(explain::run(args)), 1),
        // `diff`'s convention: 1 says the two differ, so an error must say 2.
        Command::Reconcile(args) => (
            reconcile::run(&args).map(|agree| ExitCode::from(u8::from(!agree))),
            2,
        ),
        Command::Demo(args) => (done(demo::run(args)), 1),
        Command::Generate(args) => (done(demo::generate_command(args)), 1),
        Command::Serve(args) => (Ok(serve::run(args)), 1),
        Command::ClosePeriod {
            config,
            period,
            wait,
        } => (done(close_period(&config, period, wait.map(Into::into))), 1),
    };
    result.unwrap_or_else(|e| {
        if is_broken_pipe(&e) {
            // The reader went away (`| head`): say nothing, and fail as a process
            // killed by SIGPIPE would, since what was left was not written.
            return ExitCode::from(141);
        }
        eprintln!("error: {}", describe(&e));
        ExitCode::from(on_error)
    })
}

/// Whether writing the output failed because whoever read it closed the pipe: an
/// I/O error returned as it was, as the commands return their stdout's. A broken pipe
/// in a cause (a ClickHouse connection, a file named in the error's context) is an
/// error like any other.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error and its causes, each cause left out when a message before it already
/// says it (many errors quote their source), so nothing is printed twice.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    }
    text
}

/// The process's environment as the configuration reads it. `HOSTNAME`, the default
/// instance id, falls back to the kernel's host name when unset: shells export it,
/// systemd and some container runtimes do not, and every host would otherwise share
/// the id `0` (and so one transactional id).
pub fn environment(name: &str) -> Option<String> {
    let set = std::env::var(name).ok().filter(|value| !value.is_empty());
    set.or_else(|| match name {
        "HOSTNAME" => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|host| host.trim().to_owned())
            .filter(|host| !host.is_empty()),
        _ => None,
    })
}

/// [`Config::unread_variables`] of this process's environment.
pub fn unread_variables(config: &Config) -> Vec<ConfigIssue> {
    config.unread_variables(variable_names().iter().map(String::as_str))
}

/// The names of this process's environment variables.
fn variable_names() -> Vec<String> {
    (std::env::vars_os())
        .filter_map(|(name, _)| name.into_string().ok())
        .collect()
}

fn validate(
    path: &Path,
    service: Option<serve::Service>,
    deployed: Option<&Path>,
) -> anyhow::Result<()> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(ConfigError::Invalid { origin, mut issues }) => {
            let file = ConfigFile::load(path)?;
            // Said with the problems: a misspelt override may be one of their causes.
            for warning in file.unread_variables(variable_names().iter().map(String::as_str)) {
                eprintln!("warning: {warning}");
            }
            issues.extend(file.service_issues(&environment));
            return Err(ConfigError::Invalid { origin, issues }.into());
        }
        Err(error) => return Err(error.into()),
    };
    // The services' sections too, with this environment's overrides and secrets.
    let services = config.services(&path.display().to_string(), &environment)?;
    tally_runtime::kafka::check_properties(&services.kafka)
        .with_context(|| format!("{} is not valid", path.display()))?;
    if let Some(service) = service {
        serve::check_can_start(service, &services)?;
    }
    // Read before anything is said: a deployed book that cannot be read fails the
    // command before it says the new one is valid.
    let running = match deployed {
        Some(deployed) => Some((
            deployed,
            Config::load(deployed)?,
            ConfigFile::load(deployed)?,
        )),
        None => None,
    };
    let prices: usize = config.plans.iter().map(|p| p.prices.len()).sum();
    // Written, not printed: a reader gone away (`| head -1`) is an error the caller
    // turns into SIGPIPE's status, where `println!` would panic.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} is valid: {}, {} with {}, {}; price book hash {}",
        path.display(),
        counted(config.meters.len(), "meter"),
        counted(config.plans.len(), "plan"),
        counted(prices, "price"),
        counted(config.customers.len(), "customer"),
        config.hash
    )?;
    let unresolved_keys = services.ingest.unresolved_keys.len();
    writeln!(
        out,
        "services: Kafka {} (topics {}.*), ClickHouse {} database {}, ingest on {} with {}{}, instance id {}",
        services.kafka.brokers,
        services.kafka.topic_prefix,
        services.clickhouse.url,
        services.clickhouse.database,
        services.ingest.listen,
        counted(services.ingest.api_keys.len() + unresolved_keys, "API key"),
        match unresolved_keys {
            0 => String::new(),
            n => format!(" ({n} without its secret set, below)"),
        },
        services.kafka.instance_id,
    )?;
    let (book, aggregator, rater) = (&config.settings, &services.aggregator, &services.rater);
    let duration = |d: std::time::Duration| HumanDuration(d).to_string();
    writeln!(
        out,
        "aggregator: windows of {}, dedupe horizon {}, events at most {} ahead, months closed {} after they end{}, commits every {}, metrics on {}{}{}",
        duration(std::time::Duration::from_secs(book.window.seconds().into())),
        duration(book.dedupe_horizon),
        duration(book.max_future_skew),
        duration(aggregator.period_close_grace),
        aggregator.close_idle_after.map_or_else(String::new, |idle| format!(
            " (or once their partition is idle for {})",
            duration(idle)
        )),
        duration(aggregator.commit_interval),
        aggregator.metrics_listen,
        match aggregator.accept_redefined_meters.is_empty() {
            true => String::new(),
            false => format!(
                ", accepting redefined meters {}",
                (aggregator.accept_redefined_meters.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        match aggregator.accept_lost_state {
            true => ", accepting lost state",
            false => "",
        },
    )?;
    writeln!(
        out,
        "rater: lines written every {} (at least {} apart once caught up), stored lines checked against the book every {}, windows {}, metrics on {}",
        duration(rater.flush_interval),
        duration(rater.min_insert_interval),
        duration(rater.price_book_check_interval),
        match rater.store_windows {
            true => "stored",
            false => "not stored",
        },
        rater.metrics_listen,
    )?;
    for (at, message) in &services.ingest.unresolved_keys {
        writeln!(
            out,
            "warning: {at}: {message} (only `tally serve ingest` needs it)"
        )?;
    }
    for warning in config.warnings.iter().chain(&unread_variables(&config)) {
        writeln!(out, "warning: {warning}")?;
    }
    if let Some((deployed, running, running_file)) = running {
        let changes = book_changes(
            &running_file,
            &ConfigFile::load(path)?,
            Period::containing(Utc::now()),
        );
        writeln!(
            out,
            "against {} (price book hash {} -> {}):",
            deployed.display(),
            running.hash,
            config.hash
        )?;
        if changes.is_empty() {
            writeln!(out, "  no change to meters, plans or customers")?;
        }
        for change in changes {
            writeln!(out, "  {change}")?;
        }
    }
    Ok(())
}

/// Reads and validates a configuration for a command, saying on stderr what it warns
/// about (`tally validate` lists the warnings with its summary, `serve` logs them).
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    for warning in &config.warnings {
        eprintln!("warning: {}: {warning}", path.display());
    }
    for warning in unread_variables(&config) {
        eprintln!("warning: {warning}");
    }
    Ok(config)
}

fn close_period(
    path: &Path,
    period: Period,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    use tally_runtime::kafka::wait_until_caught_up;
    use tally_schemas::config::Topic;
    let config = load_config(path)?;
    let settings = config.services(&path.display().to_string(), &environment)?;
    anyhow::ensure!(
        period.end() <= Utc::now(),
        "{period} has not ended yet (it ends {}); only a month that has ended can be closed",
        period.end().to_rfc3339()
    );
    let kafka = &settings.kafka;
    let partitions = tally_aggregator::service::close_period(kafka, period)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "closed {period} and every month before it: a control record is in each of the {partitions} partitions of {}; usage of those months the aggregators read after it is billed as an adjustment in a later month (a partition that had read an event past the month's grace had closed it already, by itself)",
        kafka.topic(Topic::Events)
    )?;
    let Some(limit) = wait else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + limit;
    // The close is in the events topic: once the aggregators committed past it, what
    // they wrote for the month is in the windows topic, and once the raters committed
    // past that, stored.
    for (group, topic, done) in [
        (
            Group::Aggregator,
            Topic::Events,
            "the aggregators have read the close",
        ),
        (
            Group::Rater,
            Topic::Windows,
            "the raters have stored what the aggregators wrote before it",
        ),
    ] {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (group, topic) = (kafka.group(group), kafka.topic(topic));
        wait_until_caught_up(kafka, &group, &topic, partitions, left)?;
        writeln!(out, "{done}")?;
    }
    writeln!(
        out,
        "{period}'s invoice lines in ClickHouse database {} hold every event each partition read before it closed the month (here, or by itself earlier); what came later is billed as adjustments, which tally reconcile --with-later-adjustments adds back",
        settings.clickhouse.database
    )?;
    Ok(())
}

/// The ClickHouse a configuration's `[clickhouse]` section names, with this
/// environment's overrides and credentials, for the commands that read what the
/// pipeline (or `tally rate --clickhouse`) stored.
#[derive(Debug)]
pub struct ConfiguredClickHouse {
    pub client: ClickHouse,
    pub url: String,
    pub database: String,
}

impl ConfiguredClickHouse {
    /// `config`, loaded from `path`; `database` (`tally reconcile`'s
    /// `clickhouse:<database>`) instead of the section's, if given.
    pub fn of(config: &Config, path: &Path, database: Option<&str>) -> anyhow::Result<Self> {
        let given = database.map(|database| format!("clickhouse:{database}"));
        let flags = ClickHouseFlags {
            database: given.as_deref().zip(database),
            ..ClickHouseFlags::default()
        };
        let store = config.clickhouse(&path.display().to_string(), flags, &environment)?;
        let client = ClickHouse::configured(&store)?;
        Ok(ConfiguredClickHouse {
            client,
            database: store.database,
            url: store.url,
        })
    }
}

/// Refuses outputs that are the events file (by any name or link): it is read
/// (mapped) while they are written, so writing one would destroy the input mid-run.
/// Only a regular file can be: `/dev/null` or a terminal may serve both.
fn refuse_to_overwrite(events: &str, outputs: &[(&str, Option<&Path>)]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identity = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| (m.dev(), m.ino()))
    };
    let Some(events_file) = identity(Path::new(events)) else {
        return Ok(());
    };
    for (flag, path) in outputs {
        if let Some(path) = path {
            if identity(path) == Some(events_file) {
                anyhow::bail!(
                    "{flag} {} is the events file, which would be overwritten while it is read; write it elsewhere",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Decoding threads to use when not told.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn rate(args: RateArgs) -> anyhow::Result<()> {
    let started = Utc::now();
    let config = load_config(&args.month.config)?;
    let config = Arc::new(match args.shadow {
        true => config.shadow(),
        false => config,
    });
    let clickhouse = match args.clickhouse.as_deref() {
        Some(url) => {
            // The URL and database are the flags'; the user, password, CA file and
            // request timeout the [clickhouse] section's or the environment's.
            let origin = args.month.config.display().to_string();
            let flags = ClickHouseFlags {
                url: Some(("--clickhouse", url)),
                database: Some(("--clickhouse-database", &args.clickhouse_database)),
            };
            let settings = config.clickhouse(&origin, flags, &environment)?;
            let store = ClickHouse::configured(&settings)?;
            // Before rating: a wrong URL or password should not cost a month's run.
            store.ensure_schema()?;
            Some(store)
        }
        None => None,
    };
    refuse_to_overwrite(
        &args.events,
        &[
            ("--rejects", Some(args.rejects.as_path())),
            ("--output", args.output.as_deref()),
            ("--summary", args.summary.as_deref()),
        ],
    )?;
    let input = read_input(&args.events)?;
    let options = args.month.options(started, args.strict, None);
    let rejects_path = args.rejects.display().to_string();
    let mut rejects = BufWriter::new(
        File::create(&args.rejects)
            .with_context(|| format!("cannot create rejects file {rejects_path}"))?,
    );
    let result = rate_events(&config, &input, &options, |reject| {
        writeln!(rejects, "{}", reject.to_json())
            .with_context(|| format!("cannot write {rejects_path}"))
    })?;
    rejects
        .flush()
        .with_context(|| format!("cannot write {rejects_path}"))?;

    match &args.output {
        Some(path) => {
            let mut out = BufWriter::new(
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
            );
            write_lines(args.format, &result.lines, &mut out)?;
            out.flush()?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            write_lines(args.format, &result.lines, &mut out)?;
            out.flush()?;
        }
    }
    let not_rated = result.summary.lines_not_rated.len();
    match &clickhouse {
        // The run's lines replace the period's: an incomplete set would hide a line
        // an earlier run stored.
        Some(_) if not_rated > 0 => eprintln!(
            "not stored in ClickHouse database {}: {not_rated} of the month's lines could not be rated",
            args.clickhouse_database
        ),
        Some(store) => {
            // Later runs must win: the run's start in milliseconds orders them.
            let version = u64::try_from(started.timestamp_millis()).unwrap_or_default();
            store.replace_period(version, options.period, &result.lines)?;
            eprintln!(
                "stored {} lines in ClickHouse database {} (version {version})",
                result.lines.len(),
                args.clickhouse_database
            );
        }
        None => {}
    }
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_string_pretty(&result.summary)?)
            .with_context(|| format!("cannot write summary {}", path.display()))?;
    }
    eprint!("{}", result.summary.render());
    let summary = &result.summary;
    let kept = summary.rejected + summary.refused + summary.conflicts;
    let valid: Vec<String> = [
        (summary.refused, "valid but refused: see their reasons"),
        (summary.conflicts, "conflicting resends of counted events"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} of them {what}"))
    .collect();
    eprintln!(
        "{} invoice lines, price book {}; {kept} rejected lines in {rejects_path}{}",
        result.lines.len(),
        config.hash,
        match valid.is_empty() {
            true => String::new(),
            false => format!(" ({})", valid.join("; ")),
        }
    );
    if args.shadow {
        eprintln!("shadow run (--shadow): every customer rated as if billed in {}, whatever its from and through; for comparing with another biller, not for invoicing", options.period);
    }
    anyhow::ensure!(
        not_rated == 0,
        "{not_rated} line(s) could not be rated (listed above as \"not rated\"), so their customers' invoices are incomplete; the other lines were written. Check the usage that made them so large, and the prices"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io;

    #[test]
    fn a_cause_its_error_already_quotes_is_printed_once() {
        let read = io::Error::other("disk gone");
        let quoting = QuotingError(format!("cannot read events.jsonl: {read}"), read);
        let error = anyhow::Error::new(quoting).context("rating failed");
        assert_eq!(
            super::describe(&error),
            "rating failed: cannot read events.jsonl: disk gone"
        );
        let plain = anyhow::anyhow!("disk gone").context("cannot rate");
        assert_eq!(super::describe(&plain), "cannot rate: disk gone");
    }

    /// An error whose message quotes its source, the common thiserror shape.
    #[derive(Debug)]
    struct QuotingError(String, io::Error);

    impl std::fmt::Display for QuotingError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for QuotingError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }
}
