//! Frame files: a stream of `[u32 little-endian length][frame bytes]` records, raw or
//! zstd-compressed — the format of the shared corpus and of `contrail inspect frames`.

use std::io::Read;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Reads a whole frame file (decompressing it if it is zstd) and splits it into frames.
pub fn read_frames(path: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let file = FrameFile::read(path)?;
    Ok(file.frames()?.into_iter().map(<[u8]>::to_vec).collect())
}

/// A frame file held in one buffer: its frames are slices of it, not copies. (For files of
/// any size, [`Blocks`] reads a block at a time.)
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

/// Frames read a block at a time, each block holding whole frames only, so a frame file of
/// any size is transcoded in bounded memory and the first frames are at work while the rest
/// is still being read (or decompressed).
pub struct Blocks {
    source: Box<dyn Read + Send>,
    /// Bytes read and not yet handed out (the start of a frame that continues).
    carry: Vec<u8>,
    block_bytes: usize,
    /// Frames longer than this are kept only up to one byte past it (enough for the
    /// transcoder to read their header and drop them as too large); the rest is skipped.
    max_frame_bytes: usize,
    /// Bytes of a cut frame still to skip in the source.
    skip: u64,
    frames_so_far: u64,
    done: bool,
}

/// Whole frames in one buffer.
pub struct Block {
    pub data: Vec<u8>,
    /// Each frame's range in `data`, in file order.
    pub frames: Vec<std::ops::Range<usize>>,
}

impl Blocks {
    /// Opens a frame file, raw or zstd; blocks of about `block_bytes` (more when one frame is
    /// larger, up to `max_frame_bytes` + 1 of it).
    pub fn open(path: &std::path::Path, block_bytes: usize, max_frame_bytes: usize) -> anyhow::Result<Blocks> {
        let mut file = std::fs::File::open(path)?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic)?;
        let head = std::io::Cursor::new(magic[..n].to_vec());
        let source: Box<dyn Read + Send> = if n == 4 && magic == ZSTD_MAGIC {
            Box::new(zstd::stream::read::Decoder::new(head.chain(file))?)
        } else {
            Box::new(head.chain(file))
        };
        Ok(Blocks {
            source,
            carry: Vec::new(),
            block_bytes: block_bytes.max(1024),
            max_frame_bytes,
            skip: 0,
            frames_so_far: 0,
            done: false,
        })
    }

    /// The next block, `None` at the end of the file.
    pub fn next_block(&mut self) -> anyhow::Result<Option<Block>> {
        loop {
            // Whole frames in what we have: hand them out once there is a block's worth (or
            // the file has ended).
            let (frames, used) = whole_frames(&self.carry);
            if self.cut_oversized(used) {
                continue;
            }
            if !frames.is_empty() && (used >= self.block_bytes || self.done) {
                let rest = self.carry.split_off(used);
                let data = std::mem::replace(&mut self.carry, rest);
                self.frames_so_far += frames.len() as u64;
                return Ok(Some(Block { data, frames }));
            }
            if self.done {
                anyhow::ensure!(
                    self.carry.is_empty(),
                    "the file ends inside a frame after {} frames ({} bytes left)",
                    self.frames_so_far,
                    self.carry.len()
                );
                return Ok(None);
            }
            if self.skip > 0 {
                let skipped = std::io::copy(&mut (&mut self.source).take(self.skip), &mut std::io::sink())?;
                anyhow::ensure!(
                    skipped == self.skip,
                    "the file ends inside a frame after {} frames",
                    self.frames_so_far
                );
                self.skip = 0;
            }
            // Read another block's worth (a frame larger than a block takes several reads: a
            // length prefix that lies costs only the bytes that really follow it).
            let want = self.block_bytes;
            let start = self.carry.len();
            self.carry.resize(start + want, 0);
            let n = read_up_to(&mut self.source, &mut self.carry[start..])?;
            self.carry.truncate(start + n);
            if n == 0 {
                self.done = true;
            }
        }
    }
}

/// How many frames a raw (uncompressed) frame file holds, found by walking its length
/// prefixes; `None` for a zstd file (known only by decompressing it) or a file that is not
/// whole. For a progress line's total.
pub fn count_frames(path: &std::path::Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut at = 0u64;
    let mut frames = 0u64;
    let mut prefix = [0u8; 4];
    while at < size {
        file.seek(SeekFrom::Start(at)).ok()?;
        file.read_exact(&mut prefix).ok()?;
        if at == 0 && prefix == ZSTD_MAGIC {
            return None;
        }
        at += 4 + u32::from_le_bytes(prefix) as u64;
        frames += 1;
    }
    (at == size).then_some(frames)
}

impl Blocks {
    /// If the incomplete frame at `at` in the carry is over the limit and enough of it is
    /// here, cuts it to `max_frame_bytes + 1` bytes (its prefix rewritten) and arranges for
    /// the rest to be skipped. Whether it cut.
    fn cut_oversized(&mut self, at: usize) -> bool {
        let Some(p) = self.carry.get(at..at + 4) else { return false };
        let len = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
        let keep = self.max_frame_bytes.saturating_add(1);
        let have = self.carry.len() - at - 4;
        if len <= self.max_frame_bytes || len <= have || have < keep {
            return false; // within the limit, already whole, or not enough of it yet
        }
        self.carry.truncate(at + 4 + keep);
        self.carry[at..at + 4].copy_from_slice(&(keep as u32).to_le_bytes());
        self.skip = (len - have) as u64;
        // What was read past `keep` belonged to the same frame: skip only the unread rest.
        true
    }
}

/// Reads until `buf` is full or the source ends; the bytes read.
fn read_up_to(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The complete frames at the start of `data` and the bytes they take.
fn whole_frames(data: &[u8]) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some(p) = data.get(at..at + 4) {
        let len = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
        if data.len() - at - 4 < len {
            break;
        }
        frames.push(at + 4..at + 4 + len);
        at += 4 + len;
    }
    (frames, at)
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
