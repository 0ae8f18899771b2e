//! Configuration: every setting is a flag, a `CONTRAIL_*` environment variable and a key of
//! the TOML file given with `--config`. Precedence: defaults < file < environment < flags.
//!
//! The TOML keys are the flag names (with `-` or `_`). `config/contrail.example.toml`
//! documents every key and is parsed by a unit test, so the docs cannot drift from the code.

use crate::util::{format_duration, parse_duration, parse_size};
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
        /// The dictionary (default: the one shipped with Contrail).
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

/// Where the event log lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// RocksDB in --data-dir: durable, replayable for --retention.
    Rocksdb,
    /// A bounded in-memory window (live-only fan-out nodes): nothing survives a restart.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
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

    /// Where the log lives: rocksdb (durable) or memory (a bounded live-only window).
    #[arg(long, env = "CONTRAIL_STORE", default_value = "rocksdb", value_enum)]
    pub store: StoreKind,
    /// With --store memory: most bytes the window holds (the oldest events go first).
    #[arg(long, env = "CONTRAIL_MEMORY_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub memory_bytes: u64,
    /// Directory of the embedded RocksDB event log.
    #[arg(long, env = "CONTRAIL_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Relay to read: a base URL (wss://bsky.network) or the full subscribeRepos URL.
    #[arg(long, env = "CONTRAIL_RELAY_URL", default_value = "wss://bsky.network")]
    pub relay_url: String,
    /// Replica mode: follow these upstream Contrails' /subscribe (in order, failing over)
    /// instead of a relay, keeping their time_us. Repeat the flag, or comma-separate.
    #[arg(long = "upstream-url", env = "CONTRAIL_UPSTREAM_URL", value_delimiter = ',')]
    pub upstream_url: Vec<String>,
    /// Replica mode: switch to the next upstream after this long with no event and no
    /// cursor message.
    #[arg(long, env = "CONTRAIL_UPSTREAM_STALE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub upstream_stale_timeout: Duration,
    /// Replica mode: subscribe compressed, with the dictionary the upstream serves.
    #[arg(long, env = "CONTRAIL_UPSTREAM_COMPRESS", default_value = "true", action = clap::ArgAction::Set)]
    pub upstream_compress: bool,
    /// Public listener (/subscribe, status page, health). Port 0 picks a free port.
    #[arg(long, env = "CONTRAIL_LISTEN", default_value = "0.0.0.0:6008")]
    pub listen: SocketAddr,
    /// Metrics listener (/metrics). Port 0 picks a free port.
    #[arg(long, env = "CONTRAIL_METRICS_LISTEN", default_value = "0.0.0.0:6009")]
    pub metrics_listen: SocketAddr,

    /// Keep events this long (e.g. 24h, 36h, 7d).
    #[arg(long, env = "CONTRAIL_RETENTION", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub retention: Duration,
    /// Also trim the oldest events while the log is larger than this (e.g. 50GiB). 0: no limit.
    #[arg(long, env = "CONTRAIL_MAX_DISK_BYTES", default_value = "0", value_parser = parse_size)]
    pub max_disk_bytes: u64,
    /// How often retention runs.
    #[arg(long, env = "CONTRAIL_TRIM_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub trim_interval: Duration,
    /// fsync every write batch (a power loss then loses nothing a subscriber has seen).
    #[arg(long, env = "CONTRAIL_SYNC_WRITES", default_value = "true", action = clap::ArgAction::Set)]
    pub sync_writes: bool,

    /// Relay frames larger than this are counted and skipped (the protocol's limit is 5 MB).
    #[arg(long, env = "CONTRAIL_MAX_FRAME_BYTES", default_value = "5000000", value_parser = parse_size)]
    pub max_frame_bytes: u64,
    /// Reconnect to the relay when it sends nothing for this long.
    #[arg(long, env = "CONTRAIL_RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_idle_timeout: Duration,
    /// First reconnect delay; doubles up to --relay-backoff-max.
    #[arg(long, env = "CONTRAIL_RELAY_BACKOFF_MIN", default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_backoff_min: Duration,
    /// Longest reconnect delay.
    #[arg(long, env = "CONTRAIL_RELAY_BACKOFF_MAX", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_backoff_max: Duration,

    /// Live events kept in memory for subscribers (each ~0.5–1 KiB); a subscriber further
    /// behind reads the log instead.
    #[arg(long, env = "CONTRAIL_RING_CAPACITY", default_value = "65536")]
    pub ring_capacity: usize,

    /// zstd dictionary for compressed subscribers (default: the one shipped with Contrail;
    /// give Jetstream's to serve its existing clients).
    #[arg(long, env = "CONTRAIL_ZSTD_DICTIONARY")]
    pub zstd_dictionary: Option<PathBuf>,
    /// Most subscribers at once.
    #[arg(long, env = "CONTRAIL_MAX_SUBSCRIBERS", default_value = "10000")]
    pub max_subscribers: usize,
    /// Most subscribers from one client IP.
    #[arg(long, env = "CONTRAIL_MAX_CONNECTIONS_PER_IP", default_value = "64")]
    pub max_connections_per_ip: usize,
    /// Events per second per client IP, shared by its connections (0: unlimited).
    #[arg(long, env = "CONTRAIL_MAX_EVENTS_PER_SECOND_PER_IP", default_value = "5000")]
    pub max_events_per_second_per_ip: u64,
    /// Proxies whose X-Forwarded-For is believed (addresses or CIDR blocks, comma-separated).
    #[arg(long, env = "CONTRAIL_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::hub::limits::IpNet>,
    /// Ping subscribers this often.
    #[arg(long, env = "CONTRAIL_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// Close a subscriber that has sent nothing (not even a pong) for this long.
    #[arg(long, env = "CONTRAIL_PONG_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub pong_timeout: Duration,
    /// Close a subscriber when one frame cannot be written for this long.
    #[arg(long, env = "CONTRAIL_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub write_timeout: Duration,
    /// Slow-client rule: a subscriber reading the log, more than --slow-behind behind the
    /// newest event and passing fewer than --slow-min-rate events/s over this window, is closed.
    #[arg(long, env = "CONTRAIL_SLOW_WINDOW", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub slow_window: Duration,
    /// See --slow-window.
    #[arg(long, env = "CONTRAIL_SLOW_MIN_RATE", default_value = "5")]
    pub slow_min_rate: f64,
    /// See --slow-window.
    #[arg(long, env = "CONTRAIL_SLOW_BEHIND", default_value = "10m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub slow_behind: Duration,
    /// At shutdown, how long subscribers get to receive their close frames.
    #[arg(long, env = "CONTRAIL_SHUTDOWN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_drain_timeout: Duration,

    /// Log format: json (one object per line) or text.
    #[arg(long, env = "CONTRAIL_LOG_FORMAT", default_value = "json", value_enum)]
    pub log_format: LogFormat,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ServeConfig {
    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, message: &str| Err(ConfigError { key: key.into(), message: message.into() });
        if self.retention.is_zero() {
            return err("retention", "must be more than 0");
        }
        if self.trim_interval.is_zero() {
            return err("trim-interval", "must be more than 0");
        }
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > 32 << 20 {
            return err("max-frame-bytes", "must be between 1 KiB and 32 MiB");
        }
        if self.relay_idle_timeout < Duration::from_secs(1) {
            return err("relay-idle-timeout", "must be at least 1s");
        }
        if self.relay_backoff_min.is_zero() || self.relay_backoff_max < self.relay_backoff_min {
            return err("relay-backoff-max", "must be at least relay-backoff-min, which must be more than 0");
        }
        if self.store == StoreKind::Memory && self.memory_bytes < 1 << 20 {
            return err("memory-bytes", "must be at least 1MiB");
        }
        if self.ring_capacity < 16 {
            return err("ring-capacity", "must be at least 16");
        }
        if self.max_subscribers == 0 || self.max_connections_per_ip == 0 {
            return err("max-subscribers", "max-subscribers and max-connections-per-ip must be more than 0");
        }
        if self.ping_interval.is_zero() || self.pong_timeout <= self.ping_interval {
            return err("pong-timeout", "must be longer than ping-interval, which must be more than 0");
        }
        if self.write_timeout.is_zero() || self.slow_window.is_zero() {
            return err("write-timeout", "write-timeout and slow-window must be more than 0");
        }
        if let Some(p) = &self.zstd_dictionary {
            if !p.is_file() {
                return err("zstd-dictionary", &format!("{} is not a file", p.display()));
            }
        }
        for u in &self.upstream_url {
            if let Err(e) = crate::relay::RelayUrl::parse_with_path(u, "/subscribe") {
                return err("upstream-url", &e.to_string());
            }
        }
        if self.upstream_stale_timeout < Duration::from_secs(3) {
            return err("upstream-stale-timeout", "must be at least 3s (cursor messages come every stale-timeout/3)");
        }
        if let Err(e) = crate::relay::RelayUrl::parse(&self.relay_url) {
            return err("relay-url", &e.to_string());
        }
        Ok(())
    }

    /// The effective configuration as TOML (for `--validate-only`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

/// Parses the command line, merging `serve --config FILE` under environment and flags.
pub fn load(args: Vec<OsString>) -> Result<Cli, ConfigError> {
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(&args).map_err(|e| {
        // Let clap print help/version and usage errors itself, with its own exit codes.
        e.exit()
    })?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches)
            .map_err(|e| ConfigError { key: "command line".into(), message: e.to_string() });
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Cli::from_arg_matches(&matches)
            .map_err(|e| ConfigError { key: "command line".into(), message: e.to_string() });
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
            return Err(ConfigError { key: key.clone(), message: "unknown setting".into() });
        }
        let arg_id = serve_cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(&id))
            .map(|a| a.get_id().as_str().to_string())
            .unwrap_or_else(|| id.replace('-', "_"));
        if serve.value_source(&arg_id) != Some(ValueSource::DefaultValue) {
            continue; // the environment or a flag wins over the file
        }
        let values: Vec<String> = match value {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Boolean(b) => vec![b.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Array(a) => {
                a.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect()
            }
            other => return Err(ConfigError { key: key.clone(), message: format!("unsupported value {other}") }),
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
    Cli::from_arg_matches(&m).map_err(|e| ConfigError { key: "config".into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut all: Vec<OsString> = vec!["contrail".into(), "serve".into()];
        all.extend(args.iter().map(OsString::from));
        match load(all)?.command {
            Command::Serve(c) => Ok(*c),
            _ => unreachable!(),
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
            if ["config", "validate-only", "help"].contains(&long) {
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
        assert_eq!(c.retention, Duration::from_secs(36 * 3600));
        assert_eq!(c.ring_capacity, 2048);
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert_eq!(serve(&["--config", path.to_str().unwrap()]).unwrap_err().key, "bogus");
        std::fs::write(&path, "retention = \"forever\"\n").unwrap();
        assert_eq!(serve(&["--config", path.to_str().unwrap()]).unwrap_err().key, "retention");
    }
}
