//! The `contrail` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "contrail", version, about = "AT Protocol firehose → Jetstream-compatible JSON, durable and resumable")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Operator tools: read frames or the log and print JSON lines.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// Transcode a frame file (`[u32 LE length][frame]…`, raw or zstd) to v1 JSON lines on
    /// stdout; a summary of frames, events and drops by reason goes to stderr.
    Frames {
        file: PathBuf,
        /// Frames larger than this are dropped (the protocol's 5 MB limit by default).
        #[arg(long, default_value_t = contrail::transcode::DEFAULT_MAX_FRAME_BYTES)]
        max_frame_bytes: usize,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { what: Inspect::Frames { file, max_frame_bytes } } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            contrail::inspect::frames(&file, max_frame_bytes, &mut out).and_then(|summary| {
                out.flush()?;
                eprint!("{}", summary.render());
                Ok(())
            })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contrail: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
