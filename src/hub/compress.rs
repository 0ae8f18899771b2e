//! zstd for compressed subscribers: one independent frame per event with a shared dictionary
//! (Jetstream v1's scheme), so every compressed subscriber using a dictionary gets identical
//! bytes and each event is compressed at most once per dictionary (DESIGN.md invariant 5, see
//! [`crate::event::Event::compressed`]).
//!
//! A server serves several dictionaries ([`Dictionaries`]), each known by its zstd id:
//! Jetstream's v1 dictionary — the default, so every existing Jetstream client decodes
//! `compress=true` unmodified — Contrail's own (smaller frames, for clients that ask for it
//! with `zstdDictionary=<id>`), and any the operator adds.

use crate::event::COMPRESSED_SLOTS;
use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// zstd's fastest level, what Jetstream v2's encoder uses (v1's used the default, 3): with the
/// dictionary it compresses an event in 2.2 µs against 3.4 µs, for frames 1.8% larger
/// (BENCHMARKS.md, eighth session). Any level decodes the same way; frames stored at another
/// level stay valid.
pub const LEVEL: i32 = 1;

/// Jetstream v1's dictionary (`dictionaries/jetstream-v1.zdict`; origin and licence in
/// `dictionaries/README.md`): what every existing compressed Jetstream client embeds.
pub const JETSTREAM_V1: &[u8] = include_bytes!("../../dictionaries/jetstream-v1.zdict");
/// Contrail's own, trained on synthetic events (see `dictionaries/README.md`).
pub const CONTRAIL_V1: &[u8] = include_bytes!("../../dictionaries/contrail-v1.zdict");

pub struct Dictionary {
    /// The dictionary file, served at `GET /dictionary` (shared: a request copies a handle).
    pub raw: bytes::Bytes,
    /// The dictionary id from its header (0 for a raw-content dictionary).
    pub id: u32,
    /// A checksum of its content: what a stored compressed frame names its dictionary by (an
    /// operator's file may reuse an id with other content).
    pub fingerprint: u32,
    /// Prepared once; compressors on every thread borrow it.
    prepared: &'static zstd::dict::EncoderDictionary<'static>,
    /// Which of an event's compressed-frame slots holds frames made with this dictionary.
    pub slot: usize,
}

/// The id in a zstd dictionary's header (0 for a raw-content dictionary).
fn dictionary_id(raw: &[u8]) -> u32 {
    if raw.starts_with(&[0x37, 0xa4, 0x30, 0xec]) && raw.len() >= 8 {
        u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]])
    } else {
        0
    }
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary").field("id", &self.id).field("bytes", &self.raw.len()).finish()
    }
}

thread_local! {
    /// One compressor per thread and dictionary slot (its methods take `&mut self`), keyed by
    /// the dictionary it was built for.
    static COMPRESSORS: RefCell<Vec<Option<(usize, zstd::bulk::Compressor<'static>)>>> = const { RefCell::new(Vec::new()) };
}

impl Dictionary {
    /// A dictionary for `slot` (its place in the server's [`Dictionaries`]).
    pub fn new(raw: Vec<u8>, slot: usize) -> anyhow::Result<Arc<Dictionary>> {
        anyhow::ensure!(slot < COMPRESSED_SLOTS, "at most {COMPRESSED_SLOTS} zstd dictionaries");
        anyhow::ensure!(!raw.is_empty(), "empty zstd dictionary");
        let id = dictionary_id(&raw);
        // Leaked on purpose: a process keeps its few dictionaries for its whole life, and
        // compressors in thread-locals need a 'static borrow.
        let prepared = zstd::dict::EncoderDictionary::try_copy(&raw, LEVEL)
            .map_err(|e| anyhow::anyhow!("not a usable zstd dictionary ({e})"))?;
        let prepared = Box::leak(Box::new(prepared));
        let fingerprint = crc32fast::hash(&raw);
        Ok(Arc::new(Dictionary { raw: raw.into(), id, fingerprint, prepared, slot }))
    }

    /// Loads a dictionary file for `slot`.
    pub fn load(path: &Path, slot: usize) -> anyhow::Result<Arc<Dictionary>> {
        Dictionary::new(std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?, slot)
    }

    /// One independent zstd frame holding `json`.
    pub fn compress(&self, json: &[u8]) -> Vec<u8> {
        self.with_compressor(|c| c.compress(json).expect("compressing into a growable buffer cannot fail"))
    }

    /// [`compress`](Self::compress) into `out`, replacing what it held: a caller compressing
    /// many events reuses one buffer.
    pub fn compress_into(&self, json: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(json.len()));
        self.with_compressor(|c| c.compress_to_buffer(json, out).expect("the buffer holds zstd's bound"));
    }

    /// Runs `f` with this thread's compressor for this dictionary.
    fn with_compressor<R>(&self, f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> R) -> R {
        let key = self.prepared as *const _ as usize;
        COMPRESSORS.with(|cell| {
            let mut all = cell.borrow_mut();
            if all.len() <= self.slot {
                all.resize_with(self.slot + 1, || None);
            }
            let entry = &mut all[self.slot];
            if entry.as_ref().map(|(k, _)| *k) != Some(key) {
                let c =
                    zstd::bulk::Compressor::with_prepared_dictionary(self.prepared).expect("zstd compressor allocates");
                *entry = Some((key, c));
            }
            let (_, c) = entry.as_mut().expect("set above");
            f(c)
        })
    }

    /// The event's v1 frame for this dictionary, built at most once per event and shared.
    pub fn frame<'e>(&self, event: &'e crate::event::Event) -> Cow<'e, [u8]> {
        event.compressed(self.slot, |j| self.compress(j))
    }

    /// The event's v1 JSON with its `verification` field compressed with this dictionary,
    /// built at most once.
    pub fn verified_frame<'e>(&self, event: &'e crate::event::Event) -> Cow<'e, [u8]> {
        event.compressed_with_verification(self.slot, |j| self.compress(j))
    }

    /// The event's v2 message compressed with this dictionary, built at most once.
    pub fn v2_frame<'e>(&self, event: &'e crate::event::Event) -> Cow<'e, [u8]> {
        event.v2_compressed(self.slot, &crate::v2::message_of(event), |m| self.compress(m))
    }
}

/// The dictionaries a server serves, and the one `compress=true` uses by default.
#[derive(Debug)]
pub struct Dictionaries {
    list: Vec<Arc<Dictionary>>,
    default: usize,
}

/// A dictionary's bytes and where it came from (a file, or a built-in's name).
pub type Named = (Vec<u8>, String);

impl Dictionaries {
    /// The shipped dictionaries (Jetstream v1's, then Contrail's), then each of `paths` (a
    /// file, or a directory whose `*.zdict` files are all loaded, in name order). A dictionary
    /// with the id of an earlier one must be the same bytes (then it is the same dictionary);
    /// with other content it is refused. The default is the one with `default_id`, or
    /// Jetstream v1's.
    pub fn load(paths: &[PathBuf], default_id: Option<u32>) -> anyhow::Result<Dictionaries> {
        let (raws, default) = Self::checked(paths, default_id)?;
        let mut list = Vec::with_capacity(raws.len());
        for (slot, (raw, name)) in raws.into_iter().enumerate() {
            list.push(Dictionary::new(raw, slot).map_err(|e| anyhow::anyhow!("{name}: {e}"))?);
        }
        Ok(Dictionaries { list, default })
    }

    /// Everything [`Self::load`] checks, without preparing what it serves (`--validate-only`):
    /// the dictionaries to serve, one per id in slot order, and the default's slot.
    pub fn checked(paths: &[PathBuf], default_id: Option<u32>) -> anyhow::Result<(Vec<Named>, usize)> {
        let mut raws: Vec<Named> = vec![
            (JETSTREAM_V1.to_vec(), "jetstream-v1 (built in)".into()),
            (CONTRAIL_V1.to_vec(), "contrail-v1 (built in)".into()),
        ];
        for p in paths {
            let files = if p.is_dir() {
                let mut f: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "zdict"))
                    .collect();
                f.sort();
                f
            } else {
                vec![p.clone()]
            };
            for f in files {
                let raw = std::fs::read(&f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?;
                raws.push((raw, f.display().to_string()));
            }
        }
        let mut kept: Vec<Named> = Vec::new();
        for (raw, name) in raws {
            let id = dictionary_id(&raw);
            anyhow::ensure!(
                id != 0,
                "{name}: not a zstd dictionary with an id (raw-content dictionaries cannot be told apart)"
            );
            if let Some((same_id, first)) = kept.iter().find(|(k, _)| dictionary_id(k) == id) {
                // Clients that know the one already loaded under this id (every Jetstream client
                // embeds v1's) could not read frames made with another.
                anyhow::ensure!(
                    *same_id == raw,
                    "{name}: has the id {id} of {first}, with other content (give it another id: `contrail dict train --id`)"
                );
                continue; // the same dictionary again
            }
            anyhow::ensure!(
                kept.len() < COMPRESSED_SLOTS,
                "{name}: at most {COMPRESSED_SLOTS} zstd dictionaries can be served"
            );
            zstd::dict::EncoderDictionary::try_copy(&raw, LEVEL)
                .map_err(|e| anyhow::anyhow!("{name}: not a usable zstd dictionary ({e})"))?;
            kept.push((raw, name));
        }
        let want = default_id.unwrap_or_else(|| dictionary_id(&kept[0].0));
        let default = kept.iter().position(|(k, _)| dictionary_id(k) == want).ok_or_else(|| {
            let ids: Vec<String> = kept.iter().map(|(k, _)| dictionary_id(k).to_string()).collect();
            anyhow::anyhow!("no zstd dictionary has id {want}; loaded: {}", ids.join(", "))
        })?;
        Ok((kept, default))
    }

    /// What `compress=true` uses when the client names no dictionary.
    pub fn default(&self) -> &Arc<Dictionary> {
        &self.list[self.default]
    }

    pub fn by_id(&self, id: u32) -> Option<&Arc<Dictionary>> {
        self.list.iter().find(|d| d.id == id)
    }

    /// The dictionary the v2 wire offers at `getZstdDictionary` (its "current" one):
    /// Contrail's own (Jetstream v2's is not shipped), else the default.
    pub fn v2_current(&self) -> &Arc<Dictionary> {
        self.by_id(dictionary_id(CONTRAIL_V1)).unwrap_or_else(|| self.default())
    }

    /// The ids served, default first (for error messages and logs).
    pub fn ids(&self) -> String {
        let mut ids = vec![self.default().id.to_string()];
        ids.extend(self.list.iter().filter(|d| d.id != self.default().id).map(|d| d.id.to_string()));
        ids.join(", ")
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Dictionary>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetstream_v1_is_the_default_and_each_is_known_by_its_id() {
        let d = Dictionaries::load(&[], None).unwrap();
        assert_eq!(d.default().id, 1_612_007_021, "Jetstream v1's dictionary id");
        let ours = d.by_id(20_261_125).expect("Contrail's own");
        assert_ne!(ours.slot, d.default().slot);
        assert!(d.by_id(7).is_none());
        assert_eq!(d.ids(), "1612007021, 20261125");
        let d = Dictionaries::load(&[], Some(20_261_125)).unwrap();
        assert_eq!(d.default().id, 20_261_125);
        assert!(Dictionaries::load(&[], Some(9)).unwrap_err().to_string().contains("no zstd dictionary has id 9"));
        // Frames decode with the dictionary they name, and are made once per event and dictionary.
        let mut out = Vec::new();
        crate::event::Event::begin(&mut out, "did:plc:abc", crate::event::EventKind::Identity);
        out.extend_from_slice(b"}");
        let e = crate::event::Event::from_parts(out, crate::event::EventKind::Identity, 11, 0..0);
        for dict in d.iter() {
            let frame = dict.frame(&e);
            let mut dec = zstd::bulk::Decompressor::with_dictionary(&dict.raw).unwrap();
            assert_eq!(dec.decompress(&frame, 1 << 20).unwrap(), e.json());
            assert!(matches!(frame, Cow::Borrowed(_)), "cached");
            assert!(std::ptr::eq(&*frame, &*dict.frame(&e)), "built once, then shared");
        }
    }

    /// An operator's dictionary that zstd cannot load, or that takes a loaded one's id with
    /// other content, is a named error at start-up (it was a panic, and a silent replacement
    /// of Jetstream v1's dictionary, which every v1 client embeds).
    #[test]
    fn a_broken_or_impostor_dictionary_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        // The dictionary magic and an id, then junk.
        let mut junk = vec![0x37, 0xa4, 0x30, 0xec, 7, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 40]);
        let e = Dictionaries::load(&[write("junk.zdict", &junk)], None).unwrap_err().to_string();
        assert!(e.contains("junk.zdict") && e.contains("not a usable zstd dictionary"), "{e}");
        let mut impostor = JETSTREAM_V1.to_vec();
        let last = impostor.len() - 1;
        impostor[last] ^= 1;
        let e = Dictionaries::load(&[write("impostor.zdict", &impostor)], None).unwrap_err().to_string();
        assert!(e.contains("has the id 1612007021 of jetstream-v1 (built in), with other content"), "{e}");
        // The same content under its own id is no conflict.
        assert!(Dictionaries::load(&[write("same.zdict", JETSTREAM_V1)], None).is_ok());
    }
}
