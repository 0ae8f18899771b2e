//! The `contrail` binary: parses the command line, sets up logging, hands over to the library.

use contrail::config::{self, Command, Dict, Inspect, LoadError, LogFormat};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: see `Cargo.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for people at a terminal: escape codes in a file or a journal are noise.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = match config::load(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(LoadError::Usage(e)) => e.exit(),
        Err(LoadError::Invalid(e)) => {
            eprintln!("contrail: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(cfg) => {
            if let Err(e) = cfg.validate() {
                eprintln!("contrail: invalid configuration: {e}");
                return ExitCode::from(2);
            }
            if cfg.validate_only {
                return match cfg.to_toml() {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("contrail: invalid configuration: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            init_logging(cfg.ops.log_format);
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
            runtime.block_on(contrail::app::run(*cfg))
        }
        Command::Inspect { what } => inspect(what),
        Command::Dict { what: Dict::Train { from_log, from_jsonl, out, size, max_samples, id } } => {
            dict_train(from_log, from_jsonl, out, size as usize, max_samples, id)
        }
        Command::Dict { what: Dict::Measure { jsonl, dict } } => dict_measure(jsonl, dict),
        Command::Tail(args) => {
            init_logging(LogFormat::Text);
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
            runtime.block_on(contrail::tail::run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contrail: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(what: Inspect) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match what {
        Inspect::Frames { file, max_frame_bytes, threads } => {
            let summary = contrail::inspect::frames(&file, max_frame_bytes, threads, &mut out)?;
            out.flush()?;
            eprint!("{}", summary.render());
        }
        Inspect::Log { data_dir, cursor, limit } => {
            contrail::inspect::log(&data_dir, cursor.unwrap_or(0), limit.unwrap_or(u64::MAX), &mut out)?;
            out.flush()?;
        }
        Inspect::Stats { data_dir } => {
            let store = contrail::log::rocks::RocksLog::open_secondary(&data_dir)?;
            writeln!(out, "{}", serde_json::to_string(&store.stats()?)?)?;
        }
    }
    Ok(())
}

fn dict_train(
    from_log: Option<PathBuf>,
    from_jsonl: Option<PathBuf>,
    out: PathBuf,
    size: usize,
    max_samples: usize,
    id: Option<u32>,
) -> anyhow::Result<()> {
    use contrail::dict;
    let source = match (&from_log, &from_jsonl) {
        (Some(d), _) => dict::Source::Log(d),
        (_, Some(f)) => dict::Source::Jsonl(f),
        _ => anyhow::bail!("give --from-log DIR or --from-jsonl FILE"),
    };
    let samples = dict::samples(source, max_samples)?;
    let id = id.unwrap_or_else(contrail::clock::today_yyyymmdd);
    let trained = dict::train(&samples, size, id)?;
    std::fs::write(&out, &trained)?;
    let raw: usize = samples.iter().map(Vec::len).sum();
    let plain = dict::compressed_size(&samples, None)?;
    let with = dict::compressed_size(&samples, Some(&trained))?;
    eprintln!(
        "dictionary {} bytes, id {id}, from {} samples ({raw} bytes): per-event zstd without dictionary {plain} bytes ({:.3}), with it {with} bytes ({:.3})",
        trained.len(),
        samples.len(),
        plain as f64 / raw as f64,
        with as f64 / raw as f64
    );
    Ok(())
}

fn dict_measure(jsonl: PathBuf, dict: Option<PathBuf>) -> anyhow::Result<()> {
    use contrail::dict;
    let samples = dict::samples(dict::Source::Jsonl(&jsonl), usize::MAX).or_else(|_| {
        // Fewer than the training minimum is fine for measuring.
        let text = std::fs::read_to_string(&jsonl)?;
        Ok::<_, anyhow::Error>(text.lines().filter(|l| !l.is_empty()).map(|l| l.as_bytes().to_vec()).collect())
    })?;
    let d = match dict {
        Some(p) => contrail::hub::compress::Dictionary::load(&p, 0)?,
        None => contrail::hub::compress::Dictionaries::load(&[], None)?.default().clone(),
    };
    let raw: usize = samples.iter().map(Vec::len).sum();
    let with = dict::compressed_size(&samples, Some(&d.raw[..]))?;
    let plain = dict::compressed_size(&samples, None)?;
    println!(
        "{}",
        serde_json::json!({
            "events": samples.len(), "json_bytes": raw, "dictionary_id": d.id, "dictionary_bytes": d.raw.len(),
            "zstd_bytes": with, "ratio": with as f64 / raw as f64,
            "zstd_no_dictionary_bytes": plain, "ratio_no_dictionary": plain as f64 / raw as f64,
        })
    );
    Ok(())
}
