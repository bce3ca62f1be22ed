use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sdgate::tools::sim::SimOptions;
use sdgate::{Config, Gateway};

/// A concurrency-aware activator and reverse proxy for Stable Diffusion pods.
#[derive(Parser)]
#[command(name = "sdgate", version)]
struct Cli {
    /// YAML config file of the gateway (and of `check`); without it, the
    /// built-in default config is used.
    // Not global: `sim` and `import-knative` read no config, so their help
    // does not list it and they refuse it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log line format (every command).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the effective config (defaults filled in).
    Check {
        /// YAML config file to check; without it, the built-in default config.
        #[arg(long = "config", value_name = "CONFIG")]
        file: Option<PathBuf>,
    },
    /// Turn a Knative Service YAML (FILE, or - for stdin) into an sdgate config, printed on stdout.
    ImportKnative {
        /// The Knative Service YAML.
        file: PathBuf,
    },
    /// List or show the async jobs in the config's store (`jobs`), as the
    /// store holds them: `sdgate --config FILE jobs` lists the newest,
    /// `sdgate --config FILE jobs ID` shows one.
    Jobs {
        /// A job id: its row as JSON.
        id: Option<String>,
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many (newest first).
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Make a new API key: prints the key (give it to the caller) and the
    /// line of the keys file that names it (only its SHA-256).
    Key {
        /// The caller's name (its identity, and the `tenant` label).
        name: String,
    },
    /// Spend per service, caller and UTC hour, from the config's jobs
    /// store: requests, GPU-seconds (pod time measured by sdgate), images
    /// and checkpoint loads.
    Usage {
        /// From this long ago ("24h", "7days").
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// csv or json.
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Run one fake Stable Diffusion WebUI worker (it reads no config file).
    Sim {
        /// Port to listen on.
        #[arg(long, default_value_t = 7860)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Time per sampling step ("50ms"); a request's `steps` defaults to 20.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        step_time: Duration,
        /// Size of the base64 image in each response.
        #[arg(long, default_value_t = 65536)]
        image_bytes: usize,
        /// Wait this long before opening the port (a model loading).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        startup_delay: Duration,
        /// Name sent in the X-Worker header (default sim-PORT).
        #[arg(long)]
        name: Option<String>,
        /// Stop a generation when its client disconnects (the real WebUI
        /// finishes it, and so does the sim by default).
        #[arg(long)]
        cancel_on_disconnect: bool,
        /// The checkpoint it holds at start (requests may name another in
        /// `override_settings.sd_model_checkpoint`).
        #[arg(long, default_value = "sim")]
        checkpoint: String,
        /// Time a checkpoint load takes ("1500ms").
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        load_time: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it writes out what is still queued.
    let _log_writer = init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sdgate: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sdgate: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let (Some(command), Some(_)) = (&cli.command, &cli.config) {
        // `sdgate --config FILE sim`: the flag was written before the command.
        if let Some(name) = command.reads_no_config() {
            anyhow::bail!("--config does not apply to `sdgate {name}`, which reads no config file");
        }
    }
    match cli.command {
        Some(Command::Sim {
            port,
            host,
            step_time,
            image_bytes,
            startup_delay,
            name,
            cancel_on_disconnect,
            checkpoint,
            load_time,
        }) => {
            let options = SimOptions {
                step_time,
                image_bytes,
                name,
                cancel_on_disconnect,
                checkpoint,
                load_time,
                available: Vec::new(),
            };
            sdgate::tools::sim::run(SocketAddr::new(host, port), startup_delay, options).await
        }
        Some(Command::ImportKnative { file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read the standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let source =
                if file.as_os_str() == "-" { "the standard input".to_string() } else { file.display().to_string() };
            let imported = sdgate::tools::knative::import(&text).with_context(|| format!("cannot import {source}"))?;
            for warning in &imported.warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", imported.to_yaml(&source)?);
            Ok(())
        }
        Some(Command::Check { file }) => {
            if file.is_some() && cli.config.is_some() {
                anyhow::bail!("--config is given twice (before and after `check`)");
            }
            let path = file.or(cli.config);
            let config = load(path.as_ref())?;
            let text = match &path {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
                }
                None => sdgate::config::DEFAULT_CONFIG.to_string(),
            };
            print!("{}", config.to_effective_yaml()?);
            for warning in config.inert_keys(&text) {
                eprintln!("warning: {warning}");
            }
            eprintln!("{}", config.verdict());
            Ok(())
        }
        Some(Command::Key { name }) => {
            let (key, line) = sdgate::proxy::tenants::new_key(&name)?;
            println!("key: {key}");
            println!("keys file line:\n{line}");
            Ok(())
        }
        Some(Command::Usage { since, format }) => {
            let config = load(cli.config.as_ref())?;
            let jobs = config.jobs.as_ref().context("the config has no `jobs` (spend is kept in its store)")?;
            let store = sdgate::jobs::store::Store::open(&jobs.store).await?;
            let from = sdgate::jobs::now_us() / 1_000_000 - since.as_secs() as i64;
            let from = from - from.rem_euclid(3600);
            let rows = store.usage_since(from).await?;
            let hour = |start: i64| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(start.max(0) as u64))
                    .to_string()
            };
            match format.as_str() {
                "csv" => {
                    println!("service,tenant,hour,requests,gpu_seconds,images,checkpoint_loads");
                    for row in rows {
                        let csv = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
                        let spend = row.spend;
                        println!(
                            "{},{},{},{},{:.3},{},{}",
                            csv(&row.service),
                            csv(&row.tenant),
                            hour(row.hour),
                            spend.requests,
                            spend.gpu_us as f64 / 1e6,
                            spend.images,
                            spend.loads
                        );
                    }
                }
                "json" => {
                    let rows: Vec<_> = rows
                        .into_iter()
                        .map(|row| {
                            let spend = row.spend;
                            serde_json::json!({ "service": row.service, "tenant": row.tenant, "hour": hour(row.hour),
                                "requests": spend.requests, "gpu_seconds": spend.gpu_us as f64 / 1e6,
                                "images": spend.images, "checkpoint_loads": spend.loads })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                other => anyhow::bail!("--format {other:?}: csv or json"),
            }
            Ok(())
        }
        Some(Command::Jobs { id, state, limit }) => {
            let config = load(cli.config.as_ref())?;
            let jobs = config.jobs.as_ref().context("the config has no `jobs` (no store to read)")?;
            let store = sdgate::jobs::store::Store::open(&jobs.store).await?;
            if let Some(id) = id {
                let row = store.get(&id).await?.with_context(|| format!("no job {id}"))?;
                println!("{}", serde_json::to_string_pretty(&job_json(&row))?);
                return Ok(());
            }
            let wanted = match state.as_deref() {
                Some(text) => Some(sdgate::jobs::State::parse(text).with_context(|| format!("no state {text:?}"))?),
                None => None,
            };
            println!("{:<32}  {:<10} {:<10} {:>8} {:>6}  error", "id", "service", "state", "age", "status");
            let now = sdgate::jobs::now_us();
            let rows = match wanted {
                Some(state) => store.list_in_state(state, limit.max(1)).await?,
                None => store.list(None, limit.max(1)).await?,
            };
            for row in rows {
                let age = format!("{:.0}s", (now - row.created_us).max(0) as f64 / 1e6);
                let status = row.result_status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<32}  {:<10} {:<10} {:>8} {:>6}  {}",
                    row.id,
                    row.service,
                    row.state.as_str(),
                    age,
                    status,
                    row.error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        None => {
            let config = load(cli.config.as_ref())?;
            // Taken before anything starts: no signal may kill the gateway
            // before it can drain.
            let hangup = sdgate::serve::reload::hangup_signal()?;
            let shutdown = sdgate::serve::shutdown_signal()?;
            sdgate::serve::raise_open_files_limit(config.services.iter().map(|s| s.queue.max_depth).sum());
            let gateway = Gateway::bind(config).await?;
            let watch = tokio::spawn(sdgate::serve::reload::watch(cli.config.clone(), hangup, gateway.reloader()));
            let ran = gateway.run_until(shutdown).await;
            watch.abort();
            ran
        }
    }
}

impl Command {
    /// The name of a command that reads no config file.
    fn reads_no_config(&self) -> Option<&'static str> {
        match self {
            Command::Check { .. } | Command::Jobs { .. } | Command::Usage { .. } => None,
            Command::Key { .. } => Some("key"),
            Command::ImportKnative { .. } => Some("import-knative"),
            Command::Sim { .. } => Some("sim"),
        }
    }
}

/// A job's row as `sdgate jobs ID` prints it.
fn job_json(row: &sdgate::jobs::store::Row) -> serde_json::Value {
    let seconds = |us: Option<i64>| us.map(|us| us as f64 / 1e6);
    serde_json::json!({
        "id": row.id,
        "service": row.service,
        "state": row.state.as_str(),
        "created_at": seconds(Some(row.created_us)),
        "started_at": seconds(row.started_us),
        "finished_at": seconds(row.finished_us),
        "expires_at": seconds(row.expires_us),
        "attempts": row.attempts,
        "pod": row.pod,
        "error": row.error,
        "webhook": row.webhook,
        "webhook_state": row.webhook_state,
        "result_status": row.result_status,
        "request_bytes": row.request_bytes,
        "result_bytes": row.result_bytes,
    })
}

fn load(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    }
    .context("config")
}

/// Logs go through a non-blocking writer: a thread of its own writes them
/// to stdout, so a slow reader of the log (a full pipe, a slow disk) never
/// stalls a serving thread; when its buffer is full, lines are dropped and
/// counted rather than waited for.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stdout().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(ansi).init(),
    }
    guard
}
