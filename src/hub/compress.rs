//! zstd for compressed subscribers: one independent frame per event with a shared dictionary
//! (Jetstream v1's scheme), so every compressed subscriber gets identical bytes and each event
//! is compressed at most once (DESIGN.md invariant 5, see [`crate::event::Event::compressed`]).

use std::cell::RefCell;
use std::sync::Arc;

/// zstd's default level, what Jetstream v1's encoder used.
const LEVEL: i32 = 3;

/// The dictionary shipped with Contrail, trained by `contrail dict train` (see
/// `dictionaries/README.md`).
pub const DEFAULT_DICTIONARY: &[u8] = include_bytes!("../../dictionaries/contrail-v1.zdict");

pub struct Dictionary {
    /// The dictionary file, served at `GET /dictionary`.
    pub raw: Vec<u8>,
    /// The dictionary id from its header (0 for a raw-content dictionary).
    pub id: u32,
    /// Prepared once; compressors on every thread borrow it.
    prepared: &'static zstd::dict::EncoderDictionary<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary").field("id", &self.id).field("bytes", &self.raw.len()).finish()
    }
}

thread_local! {
    /// One compressor per thread (its methods take `&mut self`), keyed by the dictionary it
    /// was built for.
    static COMPRESSOR: RefCell<Option<(usize, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

impl Dictionary {
    pub fn new(raw: Vec<u8>) -> anyhow::Result<Arc<Dictionary>> {
        anyhow::ensure!(!raw.is_empty(), "empty zstd dictionary");
        let id = if raw.starts_with(&[0x37, 0xa4, 0x30, 0xec]) && raw.len() >= 8 {
            u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]])
        } else {
            0
        };
        // Leaked on purpose: a process uses one dictionary for its whole life, and compressors
        // in thread-locals need a 'static borrow.
        let prepared = Box::leak(Box::new(zstd::dict::EncoderDictionary::copy(&raw, LEVEL)));
        Ok(Arc::new(Dictionary { raw, id, prepared }))
    }

    /// Loads `path`, or the shipped default.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Arc<Dictionary>> {
        match path {
            Some(p) => Dictionary::new(std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?),
            None => Dictionary::new(DEFAULT_DICTIONARY.to_vec()),
        }
    }

    /// One independent zstd frame holding `json`.
    pub fn compress(&self, json: &[u8]) -> Vec<u8> {
        let key = self.prepared as *const _ as usize;
        COMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().map(|(k, _)| *k) != Some(key) {
                let c =
                    zstd::bulk::Compressor::with_prepared_dictionary(self.prepared).expect("zstd compressor allocates");
                *slot = Some((key, c));
            }
            let (_, c) = slot.as_mut().expect("set above");
            c.compress(json).expect("compressing into a growable buffer cannot fail")
        })
    }
}
