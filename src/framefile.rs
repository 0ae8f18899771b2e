//! Frame files: a stream of `[u32 little-endian length][frame bytes]` records, raw or
//! zstd-compressed — the format of the shared corpus and of `contrail inspect frames`.

use std::io::Read;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Reads a whole frame file (decompressing it if it is zstd) and splits it into frames.
pub fn read_frames(path: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let file = FrameFile::read(path)?;
    Ok(file.frames()?.into_iter().map(<[u8]>::to_vec).collect())
}

/// A frame file held in one buffer: its frames are slices of it, not copies. (Read, not
/// mapped: mapping needs `unsafe`, which this crate forbids, and one sequential read runs at
/// several GB/s, far faster than transcoding.)
pub struct FrameFile {
    data: Vec<u8>,
}

impl FrameFile {
    pub fn read(path: &std::path::Path) -> anyhow::Result<FrameFile> {
        let mut data = Vec::new();
        std::fs::File::open(path)?.read_to_end(&mut data)?;
        if data.starts_with(&ZSTD_MAGIC) {
            data = zstd::stream::decode_all(&data[..])?;
        }
        Ok(FrameFile { data })
    }

    /// The frames, in order.
    pub fn frames(&self) -> anyhow::Result<Vec<&[u8]>> {
        frame_slices(&self.data)
    }
}

/// Splits length-prefixed records into slices of `data`.
pub fn frame_slices(mut data: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut frames = Vec::new();
    while !data.is_empty() {
        anyhow::ensure!(data.len() >= 4, "truncated length prefix after {} frames", frames.len());
        let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
        anyhow::ensure!(data.len() - 4 >= len, "frame {} claims {len} bytes, {} left", frames.len(), data.len() - 4);
        frames.push(&data[4..4 + len]);
        data = &data[4 + len..];
    }
    Ok(frames)
}

/// Splits length-prefixed records (copies; see [`frame_slices`]).
pub fn split_frames(data: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(frame_slices(data)?.into_iter().map(<[u8]>::to_vec).collect())
}

/// Writes frames in the same format (uncompressed).
pub fn encode_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}
