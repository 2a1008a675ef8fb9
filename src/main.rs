//! `outpost`: the gateway binary. A thin CLI over the workspace crates: it parses arguments,
//! loads config, installs logging and hands over to `outpost-actors`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Actor-based edge runtime for IoT gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a gateway or hub config without starting anything (a file with a `[hub]`
    /// table is a hub config).
    Check {
        /// The gateway's or the hub's TOML file.
        config: PathBuf,
        /// Treat what the machine lacks (certificate files, secret variables) as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Run a gateway until SIGINT or SIGTERM.
    Run {
        /// The gateway's TOML file.
        config: PathBuf,
    },
    /// Run a whole Outpost on loopback with nothing installed: a simulated Modbus boiler,
    /// a gateway polling and fusing it, and a hub receiving it over QUIC.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Folder for the demo's certificates, outbox and hub sink (default: a new
        /// temporary folder, kept afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Address of the metrics endpoint.
        #[arg(long, default_value = "127.0.0.1:0")]
        metrics: std::net::SocketAddr,
    },
    /// Run the hub: accept gateways, de-duplicate, write samples to the sink.
    Hub {
        /// The hub's TOML file.
        config: PathBuf,
    },
    /// Create a CA, a hub certificate and gateway certificates, for trying Outpost out.
    /// Keep `ca.key` offline in production.
    Certs {
        /// Folder to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// A name (DNS name or IP address) gateways use for the hub; repeat for several.
        #[arg(long = "hub-name", required = true)]
        hub_names: Vec<String>,
        /// A gateway id (its certificate's CN; 1-64 ASCII letters, digits, `-`, `_`, `.`,
        /// starting with a letter or digit); repeat for several.
        #[arg(long = "gateway", required = true)]
        gateways: Vec<outpost_runtime::config::GatewayId>,
    },
}

fn main() -> ExitCode {
    memory::limit_arenas();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, strict } => check(&config, strict),
        Command::Run { config } => {
            match outpost_runtime::config::load(&config).and_then(|l| l.strict()) {
                Ok(c) => report(run(c)),
                Err(errors) => config_errors(&config, &errors),
            }
        }
        Command::Hub { config } => match outpost_runtime::config::load_hub(&config) {
            Ok(c) => report(hub(c)),
            Err(errors) => config_errors(&config, &errors),
        },
        Command::Demo {
            seconds,
            dir,
            metrics,
        } => report(demo(seconds, dir, metrics)),
        Command::Certs {
            out,
            hub_names,
            gateways,
        } => report(certs(&out, &hub_names, &gateways)),
    }
}

/// Prints a config's errors, one `error: ` line each, and their count.
fn config_errors(
    path: &std::path::Path,
    errors: &outpost_runtime::config::ConfigErrors,
) -> ExitCode {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    eprintln!("{}: {} error(s)", path.display(), errors.0.len());
    ExitCode::FAILURE
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: library errors often show their
/// source in their own message *and* return it as `source()`, which `{:#}` would print
/// again (an engine error came out three times over).
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn demo(
    seconds: Option<u64>,
    dir: Option<PathBuf>,
    metrics: std::net::SocketAddr,
) -> anyhow::Result<()> {
    outpost_runtime::logging::init(outpost_runtime::logging::LogFormat::Text, "warn");
    let dir = match dir {
        Some(d) => d,
        None => tempfile::Builder::new()
            .prefix("outpost-demo-")
            .tempdir()
            .context("cannot create a temporary folder")?
            .keep(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let report = rt
        .block_on(outpost_actors::demo::run::run(&dir, seconds, metrics))
        .context("demo failed")?;
    println!("demo data kept in {}", dir.display());
    println!("{}", serde_json::to_string(&report).context("report")?);
    Ok(())
}

fn hub(config: outpost_runtime::config::HubConfig) -> anyhow::Result<()> {
    outpost_runtime::logging::init(config.log.format, &config.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let _trim = rt.spawn(memory::trim_periodically());
    rt.block_on(async {
        let mut signals = outpost_actors::gateway::ShutdownSignals::install()?;
        let metrics = outpost_runtime::metrics::Metrics::new();
        let metrics_task = if config.metrics.enabled {
            let (addr, task) =
                outpost_runtime::metrics::serve(metrics.clone(), config.metrics.listen)
                    .await
                    .with_context(|| {
                        format!("cannot serve metrics on {}", config.metrics.listen)
                    })?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(task)
        } else {
            None
        };
        let hub = outpost_actors::hub::Hub::start(&config, metrics)
            .await
            .context("cannot start the hub")?;
        let sig = signals.recv().await;
        tracing::info!(signal = sig, "hub shutting down");
        hub.stop().await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        anyhow::Ok(())
    })
}

fn certs(
    out: &std::path::Path,
    hub_names: &[String],
    gateways: &[outpost_runtime::config::GatewayId],
) -> anyhow::Result<()> {
    let b = outpost_protocols::uplink::certs::generate_bundle(out, hub_names, gateways)
        .with_context(|| format!("cannot create certificates in {}", out.display()))?;
    println!(
        "CA:  {} (key {}: keep it offline)",
        b.ca_cert.display(),
        b.ca_key.display()
    );
    println!("hub: {} {}", b.hub_cert.display(), b.hub_key.display());
    for g in &b.gateways {
        println!("gateway {}: {} {}", g.id, g.cert.display(), g.key.display());
    }
    Ok(())
}

/// What the machine lacks (files, secrets): warnings, or with `--strict` errors.
/// Returns whether the check failed.
fn environment(
    path: &std::path::Path,
    strict: bool,
    problems: &[outpost_runtime::config::ConfigError],
) -> bool {
    for e in problems {
        eprintln!("{}: {e}", if strict { "error" } else { "warning" });
    }
    if strict && !problems.is_empty() {
        eprintln!("{}: {} error(s)", path.display(), problems.len());
        return true;
    }
    false
}

fn check(path: &std::path::Path, strict: bool) -> ExitCode {
    use outpost_runtime::config::{self, ConfigKind};
    if config::kind_of(path) == ConfigKind::Hub {
        return match config::load_hub_checked(path) {
            Ok(loaded) => {
                if environment(path, strict, &loaded.environment) {
                    return ExitCode::FAILURE;
                }
                let c = &loaded.config;
                println!(
                    "{}: ok (hub on {}, sink {}, MQTT ingress {}, republish {})",
                    path.display(),
                    c.hub.listen,
                    c.sink_dir().display(),
                    c.mqtt_ingress.as_ref().map_or("off", |m| m.broker.as_str()),
                    c.republish.as_ref().map_or("off", |r| r.broker.as_str()),
                );
                ExitCode::SUCCESS
            }
            Err(errors) => config_errors(path, &errors),
        };
    }
    match config::load(path) {
        Ok(loaded) => {
            if environment(path, strict, &loaded.environment) {
                return ExitCode::FAILURE;
            }
            let c = &loaded.config;
            println!(
                "{}: ok (gateway {:?}, {} device(s), {} fusion group(s), uplink {})",
                path.display(),
                c.gateway.id,
                c.devices.len(),
                c.fusion.len(),
                c.uplink.as_ref().map_or("none".to_owned(), |u| u.target())
            );
            ExitCode::SUCCESS
        }
        Err(errors) => config_errors(path, &errors),
    }
}

fn run(config: outpost_runtime::config::Config) -> anyhow::Result<()> {
    outpost_runtime::logging::init(config.log.format, &config.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let _trim = rt.spawn(memory::trim_periodically());
    rt.block_on(outpost_actors::gateway::run_until_signal(config))
        .context("gateway failed")
}

/// The C allocator's habits, for a process that must stay small on a gateway: glibc makes up
/// to 8 malloc arenas per core (13 were seen on 2 cores, each keeping freed memory), and
/// keeps the memory of a burst after it is freed. One arena per core, and memory handed
/// back to the system every few seconds, keep the resident size near what is in use.
mod memory {
    /// How often freed memory is handed back to the system.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    /// At most one malloc arena per core (at least 2). Call before any thread starts.
    pub fn limit_arenas() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(2);
            // SAFETY: mallopt only changes allocator parameters; called before other threads
            // exist.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, arenas);
            }
        }
    }

    /// Hands freed heap memory back to the system every few seconds (after a burst, glibc
    /// would otherwise keep the peak resident for ever).
    pub async fn trim_periodically() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            // SAFETY: malloc_trim is thread-safe and only releases free memory.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chain_text;
    use std::fmt;

    /// An error that shows its source in its message and also returns it as `source()`.
    #[derive(Debug)]
    struct Wraps(&'static str, Box<dyn std::error::Error + Send + Sync>);

    impl fmt::Display for Wraps {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}: {}", self.0, self.1)
        }
    }

    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("could not acquire lock");
        let engine = Wraps("storage engine error", Box::new(io));
        let outbox = Wraps("cannot open the outbox in /x", Box::new(engine));
        let e = anyhow::Error::new(outbox).context("gateway failed");
        assert_eq!(
            chain_text(&e),
            "gateway failed: cannot open the outbox in /x: storage engine error: could not \
             acquire lock"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(chain_text(&plain), "outer: inner");
    }
}
