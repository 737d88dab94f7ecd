//! The `tripgate` command line. Every command exits non-zero with a one-line reason on
//! bad configuration or input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::{Role, TokenKeys};
use crate::config::{Config, LogFormat, one_line};
use crate::domain::now_ms;
use crate::flags::{self, FlagSet};
use crate::storage::Storage;
use crate::storage::audit::AuditEntry;

/// tripgate: phased rollout of trip acceptance, legacy → atomic_async.
#[derive(Debug, Parser)]
#[command(name = "tripgate", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    pub config: PathBuf,
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
        /// An admin token (subject `admin`).
        #[arg(long, group = "who")]
        admin: bool,
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
    },
    /// Create demo data.
    Seed {
        /// Drivers to create.
        #[arg(long, default_value_t = 10)]
        drivers: usize,
        /// Customers to create.
        #[arg(long, default_value_t = 5)]
        customers: usize,
        /// Pending trips to create.
        #[arg(long, default_value_t = 10)]
        trips: usize,
        /// Print the created ids as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tripgate flags …`
#[derive(Debug, Subcommand)]
pub enum FlagsCommand {
    /// Show the flags in the file.
    Show {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a flag's percentage (validated, atomic write; the server picks it up).
    Set {
        /// Flag name, e.g. trip_accept_v2.
        name: String,
        /// 0..=100 in steps of 0.01.
        percent: f64,
    },
    /// Explain one driver's cohort.
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

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tripgate: {}", one_line(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(&cli.config)?;
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
                (Some(id), None, false) => (id, Role::Driver),
                (None, Some(id), false) => (id, Role::Customer),
                (None, None, true) => ("admin".to_owned(), Role::Admin),
                _ => anyhow::bail!("token: give one of --driver ID, --customer ID or --admin"),
            };
            println!("{}", keys.mint(&sub, role)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Flags { action } => flags_command(&config, action),
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
            store.migrate().await?;
            eprintln!("migrations applied ({:?})", store.kind());
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            drivers,
            customers,
            trips,
            json,
        } => {
            let store = Storage::connect(&config.database)?;
            store.migrate().await?;
            let plan = crate::seed::SeedPlan {
                drivers,
                customers,
                trips,
            };
            let bar = indicatif::ProgressBar::new((2 + drivers + customers.max(usize::from(trips > 0)) + trips) as u64);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                indicatif::ProgressStyle::with_template("seeding {bar:40} {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let seeded = crate::seed::seed(&store, plan, || bar.inc(1)).await?;
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
        } => {
            let (default_drivers, default_trips) = scenario.default_size();
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
            };
            let report = crate::drive::drive(&config, options).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", crate::drive::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { .. } | Command::Flags { .. } => unreachable!("handled without a runtime"),
    }
}

fn flags_command(config: &Config, action: FlagsCommand) -> anyhow::Result<ExitCode> {
    let path = &config.flags.path;
    match action {
        FlagsCommand::Show { json } => {
            let set = FlagSet::load(path)?;
            if json {
                let flags: serde_json::Map<String, serde_json::Value> = set
                    .flags
                    .iter()
                    .map(|(n, f)| (n.clone(), serde_json::json!({"percent": f.percent(), "salt": f.salt, "allow": f.allow, "deny": f.deny})))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"flags": flags, "path": path.display().to_string()})
                );
            } else {
                println!("{}", path.display());
                for (name, f) in &set.flags {
                    println!(
                        "{name}: percent={} salt={:?} allow={} deny={}",
                        f.percent(),
                        f.salt,
                        f.allow.len(),
                        f.deny.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Set { name, percent } => {
            let from = flags::write_percent(path, &name, percent)?;
            println!("{name}: {from} -> {percent} ({})", path.display());
            audit_cli_change(config, &name, from, percent, path);
            Ok(ExitCode::SUCCESS)
        }
        FlagsCommand::Explain { name, driver_id, json } => {
            let set = FlagSet::load(path)?;
            let flag = set
                .flags
                .get(&name)
                .ok_or_else(|| anyhow::anyhow!("flags explain: no flag {name:?} in {}", path.display()))?;
            let e = flag.explain(&name, &driver_id);
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!(
                    "{}: driver {} bucket {} threshold {} list {} -> {}",
                    e.flag,
                    e.driver_id,
                    e.bucket,
                    e.threshold,
                    e.list.unwrap_or("none"),
                    e.cohort
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Records a CLI change in the audit log; the file is already written, so a database
/// that cannot be reached only costs the audit entry (and says so).
fn audit_cli_change(config: &Config, name: &str, from: f64, to: f64, path: &Path) {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| {
            rt.block_on(async {
                let store = Storage::connect(&config.database)?;
                store
                    .migrate()
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                let entry = AuditEntry {
                    at: now_ms(),
                    actor: "cli".into(),
                    source: "cli".into(),
                    flag: name.to_owned(),
                    from: Some(from),
                    to,
                };
                store.record_flag_change(&entry).await
            })
        });
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!(
            "tripgate: warning: {} changed but not audited: {}",
            path.display(),
            one_line(&e.to_string())
        ),
        Err(e) => eprintln!("tripgate: warning: not audited: {e}"),
    }
}

fn init_tracing(config: &Config, long_running: bool) {
    use tracing_subscriber::EnvFilter;
    let level = if long_running {
        config.log.level.as_str()
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
