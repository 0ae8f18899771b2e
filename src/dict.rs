//! `contrail dict train`: trains a zstd dictionary for compressed subscribers from real events
//! (a Contrail log or a JSONL file of v1 events), so it learns the event shape rather than any
//! one user's posts.

use std::io::BufRead;
use std::path::Path;

/// Where training samples come from.
pub enum Source<'a> {
    Log(&'a Path),
    Jsonl(&'a Path),
}

/// Reads up to `max` samples (the newest ones for a log, the first ones for JSONL).
pub fn samples(source: Source<'_>, max: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut progress = crate::progress::Progress::new("samples", (max < usize::MAX).then_some(max as u64));
    match source {
        Source::Jsonl(p) => {
            let f = std::io::BufReader::new(std::fs::File::open(p)?);
            for line in f.lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    out.push(line.into_bytes());
                    progress.add(1);
                }
                if out.len() >= max {
                    break;
                }
            }
        }
        Source::Log(dir) => {
            let store = crate::log::rocks::RocksLog::open_secondary(dir)?;
            let (Some(old), Some(new)) = (store.oldest_time_us()?, store.newest_time_us()?) else {
                anyhow::bail!("the log in {} is empty", dir.display());
            };
            // Start far enough back to get about `max` events, assuming an even rate.
            let count = store.estimated_events().max(1);
            let from = if count as usize <= max { old } else { new - (new - old) / count * max as u64 };
            store.scan(from, max, |_, v| {
                if let Some(view) = crate::event::view_value(v) {
                    out.push(view.json.to_vec());
                    progress.add(1);
                }
                true
            })?;
        }
    }
    progress.finish();
    anyhow::ensure!(out.len() >= 100, "only {} samples: zstd needs at least a few hundred events to train", out.len());
    Ok(out)
}

/// Trains a dictionary of at most `size` bytes and stamps `id` into its header (zstd picks
/// a random one; a stable, meaningful id — e.g. the training date — is easier to operate).
pub fn train(samples: &[Vec<u8>], size: usize, id: u32) -> anyhow::Result<Vec<u8>> {
    let mut dict = zstd::dict::from_samples(samples, size)?;
    anyhow::ensure!(
        dict.len() >= 8 && dict.starts_with(&[0x37, 0xa4, 0x30, 0xec]),
        "zstd returned a dictionary without a header"
    );
    dict[4..8].copy_from_slice(&id.to_le_bytes());
    Ok(dict)
}

/// Total size of `samples` compressed one frame each, with `dict` (or none), at the level the
/// hub compresses at.
pub fn compressed_size(samples: &[Vec<u8>], dict: Option<&[u8]>) -> anyhow::Result<usize> {
    let level = crate::hub::compress::LEVEL;
    let mut c = match dict {
        Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
        None => zstd::bulk::Compressor::new(level)?,
    };
    let mut total = 0;
    for s in samples {
        total += c.compress(s)?.len();
    }
    Ok(total)
}
