//! The `tripgate` command line. Every command exits non-zero with a one-line reason on
//! bad configuration or input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::{Role, TokenKeys};
use crate::config::{Config, LogFormat, one_line};
use crate::domain::now_ms;
use crate::flags::{self, FlagSet, FlagsHandle, fleet};
use crate::storage::Storage;
use crate::storage::flag_state::{ChangeBy, OverridePatch};
use crate::storage::shards::Shards;

/// tripgate: phased rollout of trip acceptance, legacy → atomic_async.
#[derive(Debug, Parser)]
#[command(name = "tripgate", version, about)]
pub struct Cli {
    /// Configuration file [default: config.toml, whose absence means the defaults and the
    /// environment; a file named here must exist].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, then the driver API, the admin listener and the job workers.
    Serve,
    /// Run job workers only.
    Worker,
    /// Apply the database migrations and exit.
    Migrate,
    /// Read, change or explain the rollout flags.
    Flags {
        /// What to do with them.
        #[command(subcommand)]
        action: FlagsCommand,
    },
    /// Print a bearer token (alone on stdout).
    Token {
        /// A driver's token.
        #[arg(long, group = "who")]
        driver: Option<String>,
        /// A customer's token.
        #[arg(long, group = "who")]
        customer: Option<String>,
        /// An admin token; its subject (the audit's actor) is NAME, `admin` without one.
        #[arg(long, group = "who", value_name = "NAME", num_args = 0..=1, default_missing_value = "admin")]
        admin: Option<String>,
    },
    /// Drive load through a running gateway like the driver app does, report per cohort.
    Drive {
        /// race | retry-storm | burst | steady | rollout
        #[arg(value_enum)]
        scenario: crate::drive::Scenario,
        /// Driver API base URL (default: server.listen).
        #[arg(long)]
        url: Option<String>,
        /// Admin API base URL (default: server.admin_listen).
        #[arg(long)]
        admin_url: Option<String>,
        /// Drivers (race: per trip, default 5; burst: total, default 1000).
        #[arg(long)]
        drivers: Option<usize>,
        /// Trips (race: rounds, default 20; retry-storm: rounds, default 10; burst: total,
        /// default 1000).
        #[arg(long)]
        trips: Option<usize>,
        /// Accepts per second (steady, rollout; default 10).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds (steady, rollout; default 60).
        #[arg(long)]
        duration: Option<f64>,
        /// Most requests in flight (burst; 0 = all at once).
        #[arg(long, default_value_t = 0)]
        concurrency: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// rollout: leave the percentage to the gateway's rollout guard (instead of moving
        /// it 10 → 50 → 100) and report what the guard did and when.
        #[arg(long)]
        guard: bool,
    },
    /// Create demo data.
    Seed {
        /// Drivers to create (at most 100000, as `POST /admin/seed`).
        #[arg(long, default_value_t = 10, value_parser = seed_count)]
        drivers: usize,
        /// Customers to create (at most 100000).
        #[arg(long, default_value_t = 5, value_parser = seed_count)]
        customers: usize,
        /// Pending trips to create (at most 100000).
        #[arg(long, default_value_t = 10, value_parser = seed_count)]
        trips: usize,
        /// Print the created ids as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tripgate flags …`
#[derive(Debug, Subcommand)]
pub enum FlagsCommand {
    /// Show the flags in force: the file's, and the fleet-wide override where one holds.
    Show {
        /// As JSON (the `flags` of `GET /admin/flags`).
        #[arg(long)]
        json: bool,
    },
    /// Set a flag's fleet-wide override in the database (or, with --file, the file).
    #[command(allow_negative_numbers = true)]
    Set {
        /// Flag name, e.g. trip_accept_v2.
        name: String,
        /// 0..=100 in steps of 0.01.
        percent: f64,
        /// Why (recorded in the audit log; at most 1000 bytes, as the API takes).
        #[arg(long, default_value = "", value_parser = reason_text)]
        reason: String,
        /// Edit the flags file instead (validated, atomic write, comments kept); the
        /// running gateways record the change.
        #[arg(long)]
        file: bool,
        /// Who (the audit's actor; default: $USER).
        #[arg(long, env = "TRIPGATE_ACTOR", value_parser = actor_text)]
        actor: Option<String>,
    },
    /// Clear a flag's override: the file's flags are in force again.
    Clear {
        /// Flag name.
        name: String,
        /// Why (recorded in the audit log; at most 1000 bytes).
        #[arg(long, default_value = "", value_parser = reason_text)]
        reason: String,
        /// Who (the audit's actor; default: $USER).
        #[arg(long, env = "TRIPGATE_ACTOR", value_parser = actor_text)]
        actor: Option<String>,
    },
    /// The guarded rollout: status, pause, resume, ack.
    Guard {
        /// What to do.
        #[command(subcommand)]
        action: GuardCommand,
    },
    /// Explain one driver's cohort under the flags in force.
    Explain {
        /// Flag name.
        name: String,
        /// Driver id.
        driver_id: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tripgate flags guard …`
#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// The guard's state and latest verdicts.
    Status {
        /// As JSON (as `GET /admin/guard`).
        #[arg(long)]
        json: bool,
    },
    /// Stop the guard judging and acting.
    Pause {
        /// Flag name.
        name: String,
        /// Who (named in the guard's reason; default: $USER).
        #[arg(long, env = "TRIPGATE_ACTOR", value_parser = actor_text)]
        actor: Option<String>,
    },
    /// Walk on from the percent in force.
    Resume {
        /// Flag name.
        name: String,
        /// Who (named in the guard's reason; default: $USER).
        #[arg(long, env = "TRIPGATE_ACTOR", value_parser = actor_text)]
        actor: Option<String>,
    },
    /// Acknowledge a rollback or hold; the guard stays paused.
    Ack {
        /// Flag name.
        name: String,
        /// Who (named in the guard's reason; default: $USER).
        #[arg(long, env = "TRIPGATE_ACTOR", value_parser = actor_text)]
        actor: Option<String>,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let reason = one_line(&with_causes(&e));
            // Unless the log filter would drop it (then it is printed as text).
            if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) && tracing::enabled!(tracing::Level::ERROR) {
                // A log pipeline reading JSON lines gets the reason as one of them too.
                tracing::error!(reason = %reason, "tripgate: cannot run");
            } else {
                eprintln!("tripgate: {reason}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = match &cli.config {
        Some(named) => Config::load_named(named)?,
        None => Config::load(std::path::Path::new("config.toml"))?,
    };
    let command = cli.command.unwrap_or(Command::Serve);
    let long_running = matches!(command, Command::Serve | Command::Worker);
    init_tracing(&config, long_running);
    match command {
        Command::Token {
            driver,
            customer,
            admin,
        } => {
            let keys = TokenKeys::new(&config.auth.hs256_secret, config.auth.token_ttl_s);
            let (sub, role) = match (driver, customer, admin) {
                (Some(id), None, None) => (id, Role::Driver),
                (None, Some(id), None) => (id, Role::Customer),
                (None, None, Some(name)) => (name, Role::Admin),
                _ => anyhow::bail!("token: give one of --driver ID, --customer ID or --admin [NAME]"),
            };
            if sub.trim().is_empty() {
                anyhow::bail!("token: the subject must not be empty");
            }
            println!("{}", keys.mint(&sub, role)?);
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(run_async(config, other))
        }
    }
}

async fn run_async(config: Config, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve | Command::Worker => {
            let role = if matches!(command, Command::Serve) {
                crate::server::Role::Serve
            } else {
                crate::server::Role::Worker
            };
            let running = crate::server::start(config, role).await?;
            tokio::spawn(crate::server::shutdown_on_signal(running.shutdown_trigger()));
            running.wait().await;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let store = Storage::connect(&config.database)?;
            let shards = Shards::connect(&config.database, &store)?;
            for (db, key) in databases(&config.database, &store, &shards) {
                migrate(db, &key).await?;
            }
            // A sharded list's places, recorded as `serve` would; one database alone may yet
            // become a shard of a list, and records nothing here.
            if !config.database.shards.is_empty() {
                claim_places(&shards).await?;
            }
            eprintln!("migrations applied ({:?}, {} shard(s))", store.kind(), shards.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            drivers,
            customers,
            trips,
            json,
        } => {
            let store = Storage::connect(&config.database)?;
            let shards = Shards::connect(&config.database, &store)?;
            for (db, key) in databases(&config.database, &store, &shards) {
                migrate(db, &key).await?;
            }
            // As `serve`: rows written through a changed shard list would be lost to it.
            claim_places(&shards).await?;
            let plan = crate::seed::SeedPlan {
                drivers,
                customers,
                trips,
            };
            // Every shard's part: each shard has its own categories and customers.
            let rows: usize = plan.split(shards.len()).iter().map(crate::seed::SeedPlan::rows).sum();
            let bar = indicatif::ProgressBar::new(rows as u64);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                indicatif::ProgressStyle::with_template("seeding {bar:40} {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let seeded = crate::seed::seed_shards(&shards, plan, || bar.inc(1)).await?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string(&seeded)?);
            } else {
                println!(
                    "seeded {} vehicle categories, {} drivers, {} customers, {} pending trips",
                    seeded.vehicle_categories.len(),
                    seeded.drivers.len(),
                    seeded.customers.len(),
                    seeded.trips.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Drive {
            scenario,
            url,
            admin_url,
            drivers,
            trips,
            rate,
            duration,
            concurrency,
            json,
            guard,
        } => {
            let (default_drivers, default_trips) = scenario.default_size();
            // A burst is drivers × trips one to one: one size given is both.
            let (drivers, trips) = match (scenario, drivers, trips) {
                (crate::drive::Scenario::Burst, Some(n), None) | (crate::drive::Scenario::Burst, None, Some(n)) => {
                    (Some(n), Some(n))
                }
                _ => (drivers, trips),
            };
            let (default_rate, default_duration) = scenario.default_pace();
            let options = crate::drive::DriveOptions {
                scenario,
                url: url.unwrap_or_else(|| format!("http://{}", config.server.listen)),
                admin_url: admin_url.unwrap_or_else(|| format!("http://{}", config.server.admin_listen)),
                drivers: drivers.unwrap_or(default_drivers),
                trips: trips.unwrap_or(default_trips),
                rate: rate.unwrap_or(default_rate),
                duration_s: duration.unwrap_or(default_duration),
                timeout: config.client_timeout(),
                concurrency,
                guard,
            };
            let report = crate::drive::drive(&config, options).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", crate::drive::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Flags { action } => flags_command(&config, action).await,
        Command::Token { .. } => unreachable!("handled without a runtime"),
    }
}

async fn flags_command(config: &Config, action: FlagsCommand) -> anyhow::Result<ExitCode> {
    let path = &config.flags.path;
    match action {
        FlagsCommand::Show { json } => {
            let snapshot = flags_in_force(config).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"flags": snapshot.flags_json(), "path": path.display().to_string()})
                );
            } else {
                println!("{}", path.display());
                for (name, f) in &snapshot.set.flags {
                    println!(
                        "{name}: percent={} source={} salt={:?} allow={} deny={}",
                        f.percent(),
                        snapshot.source(name),
                        f.salt,
                        f.allow.len(),
                        f.deny.len()
                    );
                    if let Some(why) = snapshot.why(name) {
                        println!("  {why}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Set {
            name,
            percent,
            reason,
            file: true,
            ..
        } => {
            if !reason.is_empty() {
                anyhow::bail!("flags set --file: a file edit has no --reason (say it in the commit)");
            }
            let from = flags::write_percent(path, &name, percent).map_err(|e| match e {
                flags::FlagsError::Read { .. } => anyhow::Error::from(e),
                other => anyhow::anyhow!("{}: {other}", path.display()),
            })?;
            println!("{name}: file {from} -> {percent} ({})", path.display());
            // The file is the declared default: an override of the percent stays in force
            // over it (except the kill switch), which the person editing it should know.
            let overrides = async { Storage::connect(&config.database)?.flag_overrides().await };
            if percent > 0.0
                && let Ok(Ok(rows)) = tokio::time::timeout(std::time::Duration::from_secs(2), overrides).await
                && let Some(o) = rows.iter().find(|o| o.flag == name && o.active)
                && let Some(bp) = o.percent_bp
            {
                println!(
                    "{name}: note: the override of {}% by {} ({}) stays in force over the file; `tripgate flags clear {name}` hands it back to the file",
                    f64::from(bp) / 100.0,
                    o.actor,
                    o.source
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Set {
            name,
            percent,
            reason,
            actor,
            file: false,
        } => {
            let threshold =
                flags::percent_to_threshold(percent).map_err(|r| anyhow::anyhow!("flags set: percent {r}"))?;
            let store = migrated_store(config).await?;
            let file_bp = declared_percent(path, &store, &name).await?;
            let patch = OverridePatch {
                percent_bp: Some(threshold),
                ..OverridePatch::default()
            };
            let entry = fleet::set_override(&store, file_bp, &name, &patch, &cli_change(actor, reason)).await?;
            println!(
                "{name}: {} -> {} (override by {}; every gateway within a second)",
                entry.from.unwrap_or(entry.to),
                entry.to,
                entry.actor
            );
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Clear { name, reason, actor } => {
            let store = migrated_store(config).await?;
            let file_bp = declared_percent(path, &store, &name).await?;
            match fleet::clear_override(&store, file_bp, &name, &cli_change(actor, reason)).await? {
                Some(entry) => println!(
                    "{name}: override cleared, {} -> {} (the file's)",
                    entry.from.unwrap_or(entry.to),
                    entry.to
                ),
                None => println!("{name}: no override in force; the file's flags hold"),
            }
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Guard { action } => guard_command(config, action).await,
        FlagsCommand::Explain { name, driver_id, json } => {
            if driver_id.trim().is_empty() {
                anyhow::bail!("flags explain: the driver id must not be empty");
            }
            let snapshot = flags_in_force(config).await?;
            let e = snapshot
                .explain(&name, &driver_id)
                .ok_or_else(|| anyhow::anyhow!("flags explain: no flag {name:?} in {}", path.display()))?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!(
                    "{}: driver {} bucket {} threshold {} list {} -> {} (source {})",
                    e.flag,
                    e.driver_id,
                    e.bucket,
                    e.threshold,
                    e.list.unwrap_or("none"),
                    e.cohort,
                    e.source
                );
                if let Some(why) = snapshot.why(&name) {
                    println!("  {why}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn guard_command(config: &Config, action: GuardCommand) -> anyhow::Result<ExitCode> {
    let store = migrated_store(config).await?;
    let (name, actor, action) = match action {
        GuardCommand::Status { json } => {
            let handle = FlagsHandle::new(flags_file(&config.flags.path)?, config.flags.path.clone());
            handle.set_overrides(fleet::overrides_of(&store.flag_overrides().await?));
            let status = crate::guard::status(&store, &handle).await?;
            if json {
                println!("{status}");
            } else {
                for (name, g) in status["flags"].as_object().into_iter().flatten() {
                    println!(
                        "{name}: {} at {}% (next step {}){}",
                        g["state"].as_str().unwrap_or("?"),
                        g["percent"],
                        g["next_step"],
                        g["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()
                    );
                    for v in g["verdicts"].as_array().into_iter().flatten().take(5) {
                        println!(
                            "  {} {}: {}",
                            v["at"],
                            v["verdict"].as_str().unwrap_or("?"),
                            v["reason"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        GuardCommand::Pause { name, actor } => (name, actor, crate::guard::Action::Pause),
        GuardCommand::Resume { name, actor } => (name, actor, crate::guard::Action::Resume),
        GuardCommand::Ack { name, actor } => (name, actor, crate::guard::Action::Ack),
    };
    if name != crate::domain::TRIP_ACCEPT_FLAG {
        anyhow::bail!("flags guard: only {} is guarded", crate::domain::TRIP_ACCEPT_FLAG);
    }
    let file_bp = flags_file(&config.flags.path).ok().and_then(|f| f.percent_bp(&name));
    if let Some(why) = action.kill_switch_holds(&name, file_bp) {
        anyhow::bail!("flags guard: {why}");
    }
    let who = format!("{} (cli)", cli_change(actor, String::new()).actor);
    match crate::guard::act(&store, action, &who).await? {
        Some(row) => {
            println!("{name}: guard {} ({})", row.state, row.reason);
            Ok(ExitCode::SUCCESS)
        }
        None => anyhow::bail!("flags guard: {}", action.refused(&name)),
    }
}

/// The file's flags with the overrides in the database applied. A database that cannot be
/// read leaves the file's flags, with a warning on stderr.
async fn flags_in_force(config: &Config) -> anyhow::Result<std::sync::Arc<flags::Snapshot>> {
    let handle = FlagsHandle::new(flags_file(&config.flags.path)?, config.flags.path.clone());
    let read = async { Storage::connect(&config.database)?.flag_overrides().await };
    match read.await {
        Ok(rows) => {
            handle.set_overrides(fleet::overrides_of(&rows));
        }
        Err(e) if crate::storage::is_not_migrated(&e) => eprintln!(
            "tripgate: warning: overrides not read (the database of database.url is not migrated yet: `tripgate migrate`, or start a gateway); showing the file's flags"
        ),
        Err(e) => eprintln!(
            "tripgate: warning: overrides not read ({}); showing the file's flags",
            one_line(&e.to_string())
        ),
    }
    Ok(handle.snapshot())
}

/// The flags file, its error naming it (a parse error alone does not say which file).
fn flags_file(path: &std::path::Path) -> anyhow::Result<FlagSet> {
    FlagSet::load(path).map_err(|e| match e {
        flags::FlagsError::Read { .. } => anyhow::anyhow!("flags file: {e}"),
        e => anyhow::anyhow!(
            "flags file {}: {e} (running gateways keep their last good flags; GET /admin/flags shows them)",
            path.display()
        ),
    })
}

/// The percent (basis points) the flags file declares for `flag`, for an override's set or
/// clear; `None` when the file has no such flag. A file this host cannot read, or an invalid
/// one, does not stop them — a bad file is when ops need the override most: the percent the
/// fleet last recorded from its last good file stands in (`flag_file_state`, what the
/// running gateways hold), with a warning.
async fn declared_percent(path: &std::path::Path, store: &Storage, flag: &str) -> anyhow::Result<Option<u32>> {
    let why = match flags_file(path) {
        Ok(file) => return Ok(file.percent_bp(flag)),
        Err(why) => why,
    };
    match store.recorded_file_percent(flag).await? {
        Some(bp) => {
            eprintln!(
                "tripgate: warning: {}; using the percent the gateways last recorded from it ({})",
                one_line(&why.to_string()),
                f64::from(bp) / 100.0
            );
            Ok(Some(bp))
        }
        None => Err(anyhow::anyhow!(
            "{why}; no gateway has recorded {flag} from a good flags file either"
        )),
    }
}

/// The configured database, migrated (an embedded SQLite may be new).
async fn migrated_store(config: &Config) -> anyhow::Result<Storage> {
    let store = Storage::connect(&config.database)?;
    migrate(&store, "database.url").await?;
    Ok(store)
}

/// The global database and every shard's, each with the setting that names it (the first
/// shard is the global database when no shards are configured).
fn databases<'a>(
    config: &crate::config::DatabaseConfig,
    store: &'a Storage,
    shards: &'a Shards,
) -> impl Iterator<Item = (&'a Storage, String)> {
    let named = !config.shards.is_empty();
    std::iter::once((store, "database.url".to_owned())).chain(shards.all().iter().enumerate().map(move |(i, s)| {
        (
            s,
            if named {
                format!("database.shards[{i}]")
            } else {
                "database.url".to_owned()
            },
        )
    }))
}

/// Applies `store`'s migrations. A database that cannot be reached is named as such (by
/// its setting, `key`), with the connection's own error (the pool would only say it timed out "while executing
/// migrations").
async fn migrate(store: &Storage, key: &str) -> anyhow::Result<()> {
    let Err(e) = store.migrate().await else {
        return Ok(());
    };
    Err(match store.connect_error().await {
        Some(cause) => anyhow::anyhow!(
            "cannot {} the {:?} database of {}: {}",
            if store.kind() == crate::config::DatabaseKind::Sqlite {
                "open"
            } else {
                "reach"
            },
            store.kind(),
            key,
            one_line(&cause)
        ),
        None => e.into(),
    })
}

/// A change made through the CLI: `--actor`, else `$USER`, else `cli`.
fn cli_change(actor: Option<String>, reason: String) -> ChangeBy {
    let actor = actor
        .or_else(|| std::env::var("USER").ok().filter(|u| actor_text(u).is_ok()))
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "cli".into());
    ChangeBy {
        actor,
        source: "cli".into(),
        reason,
        at: now_ms(),
    }
}

/// Each shard database's recorded place, recorded where none is; an error when the list
/// contradicts one.
async fn claim_places(shards: &Shards) -> anyhow::Result<()> {
    match shards.claim_places().await? {
        Some(reason) => anyhow::bail!("{}", reason.replace("refusing to serve", "refusing")),
        None => Ok(()),
    }
}

/// A `--reason`: one line of at most 1000 bytes, as `PUT /admin/flags/{name}` takes (it is
/// shown in every flags listing, and logged).
fn reason_text(text: &str) -> Result<String, String> {
    line_of(text, 1000)
}

/// An `--actor`: one line of at most 200 bytes (the audit shows it, the logs carry it: a
/// newline in it would forge a log line).
fn actor_text(text: &str) -> Result<String, String> {
    line_of(text, 200)
}

/// `text` if it is one line of at most `max` bytes.
fn line_of(text: &str, max: usize) -> Result<String, String> {
    if text.len() > max {
        return Err(format!("{} bytes; at most {max}", text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err("one line of text, without control characters".into());
    }
    Ok(text.to_owned())
}

/// A `seed` count: 0..=100000, as `POST /admin/seed` takes.
fn seed_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n <= 100_000 => Ok(n),
        _ => Err(format!("{text:?} is not a count in 0..=100000")),
    }
}

/// `e` and the causes it does not already say ("error sending request" alone hides the
/// "Connection refused" beneath it).
fn with_causes(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// Set once `serve` or `worker` logs JSON lines (`log.format = "json"`): then a fatal
/// error is logged as one of them instead of printed as text.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_tracing(config: &Config, long_running: bool) {
    use tracing_subscriber::EnvFilter;
    let level = if long_running {
        config.log.level.as_str()
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: a log file or pipeline gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => {
            let done = builder.json().flatten_event(true).try_init();
            JSON_LOGS.store(done.is_ok() && long_running, std::sync::atomic::Ordering::Relaxed);
            if done.is_ok() {
                // A panic's report is a JSON line too, not text between them (a handler's
                // panic is answered 500 and the process goes on).
                std::panic::set_hook(Box::new(|info| {
                    let message = info
                        .payload()
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| info.payload().downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let at = info.location().map(ToString::to_string).unwrap_or_default();
                    tracing::error!(panic = %message, at = %at, "panicked");
                }));
            }
            done
        }
        LogFormat::Text => builder.try_init(),
    };
}
