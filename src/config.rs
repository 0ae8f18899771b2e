//! Configuration: every setting is a flag, a `CONTRAIL_*` environment variable and a key of
//! the TOML file given with `--config`. Precedence: defaults < file < environment < flags.
//!
//! The TOML keys are the flag names (with `-` or `_`). `config/contrail.example.toml`
//! documents every key and is parsed by a unit test, so the docs cannot drift from the code.
//!
//! `serve`'s settings come in groups, one per concern, each declared (with its `validate()`)
//! by the module it configures and handed to it whole: `log` (store), `log::retention`,
//! `source::relay`, `source::upstream` (replica), `hub`, `hub::limits`, and the operations
//! group below. [`load`] returns errors instead of exiting (except for clap's own help and
//! usage output).

use crate::hub::limits::LimitsConfig;
use crate::hub::HubConfig;
use crate::log::retention::RetentionConfig;
use crate::log::LogConfig;
use crate::source::relay::RelayConfig;
use crate::source::upstream::ReplicaConfig;
use crate::units::{parse_duration, parse_size, ser_duration};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "contrail",
    version,
    about = "AT Protocol firehose → Jetstream-compatible JSON, durable and resumable"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the service: relay reader, event log, /subscribe hub, metrics.
    Serve(Box<ServeConfig>),
    /// Operator tools: read frames or the log and print JSON lines.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
    /// zstd dictionaries for compressed subscribers.
    Dict {
        #[command(subcommand)]
        what: Dict,
    },
    /// Subscribe to a Contrail (or Jetstream) and print each event on its own line, exactly as
    /// the server sent it; progress and errors go to stderr. Reconnects and resumes by itself.
    Tail(TailArgs),
}

/// `contrail tail URL [URL…] [--collections …] [--dids …] [--cursor …]`.
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// Base URL(s) of the server (`wss://host`, `ws://127.0.0.1:6008`) or its /subscribe URL;
    /// more than one: fail over along the list.
    #[arg(required = true, num_args = 1..)]
    pub urls: Vec<String>,
    /// Only these collections (NSIDs or `prefix.*`); repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub collections: Vec<String>,
    /// Only these repos; repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub dids: Vec<String>,
    /// Start after this time_us (the event at it is not printed again). Default: live.
    #[arg(long)]
    pub cursor: Option<u64>,
    /// Ask for zstd-compressed messages (the dictionary comes from the server's /dictionary);
    /// the printed lines are the same.
    #[arg(long)]
    pub compress: bool,
    /// Contrail's #sync events too.
    #[arg(long)]
    pub include_sync: bool,
    /// The wire: v1 (`/subscribe`) or v2 (`subscribeEvents`; lines are v2 messages, and
    /// --cursor is a seq: on Contrail the same number as time_us).
    #[arg(long, default_value = "v1", value_parser = ["v1", "v2"])]
    pub wire: String,
    /// The servers do not share time_us (Jetstream instances): on failover, resume this far
    /// back and drop the events already printed. Default: exact cursor (Contrail replicas).
    #[arg(long, value_parser = parse_duration)]
    pub rewind: Option<std::time::Duration>,
}

#[derive(Subcommand, Debug)]
pub enum Dict {
    /// Train a dictionary from a Contrail log (--from-log DIR) or a JSONL file of v1 events
    /// (--from-jsonl FILE) and write it to --out. Prints the sizes it measured on the samples.
    Train {
        #[arg(long, conflicts_with = "from_jsonl", required_unless_present = "from_jsonl")]
        from_log: Option<PathBuf>,
        #[arg(long)]
        from_jsonl: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Largest dictionary size (e.g. 32KiB).
        #[arg(long, default_value = "32KiB", value_parser = parse_size)]
        size: u64,
        /// Most events to train on.
        #[arg(long, default_value = "100000")]
        max_samples: usize,
        /// Dictionary id written into the header (default: today's date as YYYYMMDD).
        #[arg(long)]
        id: Option<u32>,
    },
    /// Measure how well a dictionary compresses a JSONL file of events, one zstd frame per
    /// event as subscribers get them. Prints one JSON line.
    Measure {
        #[arg(long)]
        jsonl: PathBuf,
        /// The dictionary (default: the one compress=true serves by default, Jetstream v1's).
        #[arg(long)]
        dict: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Inspect {
    /// Transcode a frame file (`[u32 LE length][frame]…`, raw or zstd) to v1 JSON lines on
    /// stdout; a summary of frames, events and drops by reason goes to stderr.
    Frames {
        file: PathBuf,
        /// Frames larger than this are dropped (the protocol's 5 MB limit by default).
        #[arg(long, default_value_t = crate::transcode::DEFAULT_MAX_FRAME_BYTES)]
        max_frame_bytes: usize,
        /// Transcoding threads (default: one per core). The output is the same for any number.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Print stored events as JSON lines, oldest first. Safe while `serve` runs.
    Log {
        #[arg(long, env = "CONTRAIL_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// Start at this time_us (inclusive).
        #[arg(long)]
        cursor: Option<u64>,
        /// Print at most this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Print log figures as JSON: event count, oldest/newest time_us, relay URL and seq, disk bytes.
    Stats {
        #[arg(long, env = "CONTRAIL_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Listeners, shutdown and logging.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct OperationsConfig {
    /// Public listener (/subscribe, status page, health). Port 0 picks a free port.
    #[arg(long, env = "CONTRAIL_LISTEN", default_value = "0.0.0.0:6008")]
    pub listen: SocketAddr,
    /// Metrics listener (/metrics). Port 0 picks a free port.
    #[arg(long, env = "CONTRAIL_METRICS_LISTEN", default_value = "0.0.0.0:6009")]
    pub metrics_listen: SocketAddr,
    /// At shutdown, how long subscribers get to receive what is stored (the first second of it) and their close frames.
    #[arg(long, env = "CONTRAIL_SHUTDOWN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_drain_timeout: Duration,
    /// Log format: json (one object per line) or text (coloured only on a terminal).
    #[arg(long, env = "CONTRAIL_LOG_FORMAT", default_value = "json", value_enum)]
    pub log_format: LogFormat,
    /// How often the status page's history takes a sample (it keeps 720 of them: an hour at
    /// the default).
    #[arg(long, env = "CONTRAIL_STATUS_SAMPLE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub status_sample_interval: Duration,
    /// `/ready` says 503 once the relay (or a replica's upstream) has moved nothing on for this
    /// long, so that a load balancer sends new clients to a region that still has live events
    /// (0s: never; then only "not reached yet" and a failed log make it 503). Every region
    /// would say 503 together if the relay itself stopped.
    #[arg(long, env = "CONTRAIL_READY_STALE_AFTER", default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ready_stale_after: Duration,
    /// `/ready` says 503 while the relay lag (a replica: the replication lag) is more than this,
    /// or not known yet (nothing stored since the start), so that a load balancer sends new
    /// clients to a region that is not far behind, such as a replica catching up after a
    /// restart (0s: never). The relay lag also grows while a quiet source (a PDS read directly)
    /// sends nothing: set it for a relay's firehose. A replica's must be more than two cursor
    /// intervals (--upstream-stale-timeout / 3 each).
    #[arg(long, env = "CONTRAIL_READY_MAX_LAG", default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ready_max_lag: Duration,
}

/// `contrail serve` settings.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub struct ServeConfig {
    /// TOML file with any of these settings (keys are the flag names).
    #[arg(long, env = "CONTRAIL_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration, print it, and exit (0 valid, 2 invalid).
    #[arg(long)]
    #[serde(skip)]
    pub validate_only: bool,

    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub retention: RetentionConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub relay: RelayConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub replica: ReplicaConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub verify: crate::verify::VerifyConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub hub: HubConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: LimitsConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub ops: OperationsConfig,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ServeConfig {
    /// Every group's checks; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            self.log.validate(),
            self.retention.validate(),
            self.relay.validate(),
            self.replica.validate(),
            self.verify.validate(),
            self.verify_needs_a_relay(),
            self.hub.validate(),
            self.limits.validate(),
        ];
        let ops = if self.ops.status_sample_interval < Duration::from_millis(100) {
            Err(("status-sample-interval", "must be at least 100ms".to_string()))
        } else if !self.ops.ready_stale_after.is_zero() && self.ops.ready_stale_after < Duration::from_secs(1) {
            Err(("ready-stale-after", "must be 0s (off) or at least 1s".to_string()))
        } else if !self.ops.ready_max_lag.is_zero() && self.ops.ready_max_lag < Duration::from_secs(1) {
            Err(("ready-max-lag", "must be 0s (off) or at least 1s".to_string()))
        } else if !self.ops.ready_max_lag.is_zero()
            && !self.replica.upstream_url.is_empty()
            && self.ops.ready_max_lag <= 2 * self.replica.cursor_interval()
        {
            // A caught-up replica of a quiet upstream shows a lag of up to two cursor intervals
            // (it is reset by a cursor message once no event came for one): /ready would flap.
            Err((
                "ready-max-lag",
                format!(
                    "a replica's must be more than two cursor intervals ({}s: upstream-stale-timeout / 3 each)",
                    2 * self.replica.cursor_interval().as_secs()
                ),
            ))
        } else {
            Ok(())
        };
        for check in checks.into_iter().chain([ops]) {
            if let Err((key, message)) = check {
                return Err(ConfigError { key: key.into(), message });
            }
        }
        Ok(())
    }

    /// A replica copies its primary's log: verification belongs on the primary.
    fn verify_needs_a_relay(&self) -> Result<(), (&'static str, String)> {
        if self.verify.verify != crate::verify::VerifyMode::Off && !self.replica.upstream_url.is_empty() {
            return Err((
                "verify",
                "verification runs on a primary (it reads the relay); a replica copies its log".into(),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML (for `--validate-only`); an error names what could
    /// not be written (e.g. a number beyond TOML's 64-bit signed integers).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError { key: "config".into(), message: format!("cannot render: {e}") })
    }
}

/// Why the command line could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Help, version, or a mistake on the command line: clap prints it and picks the exit
    /// code (`e.exit()` in `main`).
    #[error("{0}")]
    Usage(clap::Error),
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Parses the command line, merging `serve --config FILE` under environment and flags.
pub fn load(args: Vec<OsString>) -> Result<Cli, LoadError> {
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(&args).map_err(LoadError::Usage)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches)
            .map_err(|e| ConfigError { key: "command line".into(), message: e.to_string() }.into());
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Cli::from_arg_matches(&matches)
            .map_err(|e| ConfigError { key: "command line".into(), message: e.to_string() }.into());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError { key: "config".into(), message: format!("cannot read {}: {e}", path.display()) })?;
    let table: toml::Table =
        text.parse().map_err(|e| ConfigError { key: "config".into(), message: format!("{}: {e}", path.display()) })?;
    let serve_cmd = cmd.find_subcommand("serve").expect("serve subcommand exists").clone();
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('_', "-");
        let known =
            serve_cmd.get_arguments().any(|a| a.get_id().as_str() == id.replace('-', "_") || a.get_long() == Some(&id));
        if !known || id == "config" || id == "validate-only" {
            return Err(ConfigError { key: key.clone(), message: "unknown setting".into() }.into());
        }
        let arg_id = serve_cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(&id))
            .map(|a| a.get_id().as_str().to_string())
            .unwrap_or_else(|| id.replace('-', "_"));
        // The environment or a flag wins over the file. A setting with no default that neither
        // gave has no source at all: the file's value counts then too.
        if matches!(serve.value_source(&arg_id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let values: Vec<String> = match value {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Boolean(b) => vec![b.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Array(a) => {
                a.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect()
            }
            other => return Err(ConfigError { key: key.clone(), message: format!("unsupported value {other}") }.into()),
        };
        for v in values {
            injected.push(format!("--{id}={v}").into());
        }
    }
    // Re-parse with the file's values placed before the real arguments of `serve`.
    let pos = args.iter().position(|a| a == "serve").expect("serve was parsed");
    let mut merged: Vec<OsString> = args[..=pos].to_vec();
    merged.extend(injected);
    merged.extend(args[pos + 1..].iter().cloned());
    let m = cmd.try_get_matches_from(&merged).map_err(|e| {
        let msg = e.to_string();
        let key =
            msg.split("'--").nth(1).and_then(|s| s.split(['<', '\'', ' ', '=']).next()).unwrap_or("config").to_string();
        ConfigError { key, message: msg.lines().next().unwrap_or("invalid value").to_string() }
    })?;
    Ok(Cli::from_arg_matches(&m).map_err(|e| ConfigError { key: "config".into(), message: e.to_string() })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut all: Vec<OsString> = vec!["contrail".into(), "serve".into()];
        all.extend(args.iter().map(OsString::from));
        match load(all) {
            Ok(Cli { command: Command::Serve(c) }) => Ok(*c),
            Ok(_) => unreachable!(),
            Err(LoadError::Invalid(e)) => Err(e),
            Err(LoadError::Usage(e)) => Err(ConfigError { key: "usage".into(), message: e.to_string() }),
        }
    }

    #[test]
    fn the_example_file_parses_and_documents_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/contrail.example.toml");
        let c = serve(&["--config", path]).unwrap();
        c.validate().unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let serve_cmd = Cli::command().find_subcommand("serve").unwrap().clone();
        for arg in serve_cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // Hidden flags are test hooks, not settings.
            if ["config", "validate-only", "help"].contains(&long) || arg.is_hide_set() {
                continue;
            }
            // Settings without a default appear commented out.
            let documented = table.contains_key(long) || text.contains(&format!("# {long} ="));
            assert!(documented, "config/contrail.example.toml does not document `{long}`");
        }
    }

    #[test]
    fn file_values_lose_to_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "retention = \"36h\"\nring-capacity = 1024\n").unwrap();
        let c = serve(&["--config", path.to_str().unwrap(), "--ring-capacity", "2048"]).unwrap();
        assert_eq!(c.retention.retention, Duration::from_secs(36 * 3600));
        assert_eq!(c.hub.ring_capacity, 2048);
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert_eq!(serve(&["--config", path.to_str().unwrap()]).unwrap_err().key, "bogus");
        std::fs::write(&path, "retention = \"forever\"\n").unwrap();
        assert_eq!(serve(&["--config", path.to_str().unwrap()]).unwrap_err().key, "retention");
    }

    /// Values that parse but would misbehave are refused, naming the key: the ring taking no
    /// event (every one through the log) or allocating gigabytes of slots, a relay a little
    /// behind taken for a reset (its events stored twice), every commit resolving its DID, a
    /// replica switching upstreams at every probe, a kernel timeout silently not set, a rate
    /// that is not a number.
    #[test]
    fn values_that_would_misbehave_are_refused() {
        for (args, key) in [
            (&["--ring-max-bytes", "0"][..], "ring-max-bytes"),
            (&["--ring-max-bytes", "9223372036854775807"], "ring-max-bytes"),
            (&["--replay-cache-bytes", "2TiB"], "replay-cache-bytes"),
            (&["--ring-capacity", "1000000000"], "ring-capacity"),
            (&["--ring-capacity", "8"], "ring-capacity"),
            (&["--relay-reset-threshold", "0"], "relay-reset-threshold"),
            (&["--verify", "signature", "--did-cache-ttl", "0s"], "did-cache-ttl"),
            (&["--upstream-url", "ws://a:6008,ws://b:6008", "--upstream-switch-lag", "0s"], "upstream-switch-lag"),
            (&["--write-timeout", "25d"], "write-timeout"),
            (&["--slow-min-rate", "NaN"], "slow-min-rate"),
            (&["--slow-min-rate", "inf"], "slow-min-rate"),
            (&["--slow-min-rate=-1"], "slow-min-rate"),
            (&["--ready-stale-after", "500ms"], "ready-stale-after"),
            (&["--max-client-message-bytes", "2TiB"], "max-client-message-bytes"),
            (&["--max-client-message-bytes", "256KiB"], "max-client-message-bytes"),
        ] {
            let err = serve(args).and_then(|c| c.validate()).expect_err(&format!("{args:?} was accepted"));
            assert_eq!(err.key, key, "{args:?}: {err}");
        }
        // The edges themselves are fine.
        for args in [
            &["--ring-max-bytes", "1MiB", "--ring-capacity", "16777216", "--relay-reset-threshold", "1"][..],
            &["--write-timeout", "24d", "--slow-min-rate", "0", "--upstream-switch-lag", "1s"],
            &["--verify", "signature", "--did-cache-ttl", "1m"],
            &["--ready-stale-after", "1s", "--max-client-message-bytes", "0"],
        ] {
            serve(args).and_then(|c| c.validate()).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    /// A value TOML cannot hold is an error for `--validate-only`, not a comment in its output.
    #[test]
    fn a_configuration_toml_cannot_hold_is_refused_when_rendered() {
        let c = serve(&["--max-disk-bytes", "18446744073709551615"]).unwrap();
        assert!(c.to_toml().is_err());
        assert!(serve(&["--write-linger", "500us"]).unwrap().to_toml().unwrap().contains("write_linger = \"500us\""));
    }

    /// Settings without a default (lists, optional values) are read from the file too: a
    /// replica configured by file must not fall back to the relay.
    #[test]
    fn file_values_without_a_default_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "upstream-url = \"ws://primary.example:6008\"\n\
             trusted-proxies = [\"10.0.0.0/8\", \"192.168.1.1/32\"]\n\
             unlimited-clients = [\"10.1.2.3/32\"]\n\
             zstd-default-dictionary = 20261125\n",
        )
        .unwrap();
        let c = serve(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.replica.upstream_url.len(), 1);
        assert_eq!(c.replica.upstream_url[0].host, "primary.example");
        let ips = |v: &[crate::hub::limits::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(ips(&c.limits.trusted_proxies), ["10.0.0.0/8", "192.168.1.1/32"]);
        assert_eq!(ips(&c.limits.unlimited_clients), ["10.1.2.3/32"]);
        assert_eq!(c.hub.zstd_default_dictionary, Some(20261125));
        // A flag still wins over the file for them.
        let c = serve(&["--config", path.to_str().unwrap(), "--upstream-url", "ws://other.example:6008"]).unwrap();
        assert_eq!(c.replica.upstream_url[0].host, "other.example");
    }
}
