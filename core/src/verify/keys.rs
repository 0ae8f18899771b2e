//! Signing keys: `did:key` and the DID document's `publicKeyMultibase`, and ECDSA
//! verification with atproto's rules (64-byte compact `r‖s` signatures over the SHA-256 of the
//! message, low-S only; DER is invalid). Two curves: secp256k1 ("K-256", `ES256K`) and NIST
//! P-256 (`ES256`).

/// Multicodec varint prefixes of compressed public keys.
const K256_PUB: [u8; 2] = [0xe7, 0x01];
const P256_PUB: [u8; 2] = [0x80, 0x24];

/// A repo's signing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    K256(K256Key),
    P256(p256::ecdsa::VerifyingKey),
}

/// A secp256k1 key in two forms: k256's (parsing, comparing, `did:key`) and libsecp256k1's
/// (verifying: ~3× faster, measured in benches/verify.rs).
#[derive(Clone, Debug)]
pub struct K256Key {
    key: k256::ecdsa::VerifyingKey,
    fast: secp256k1::PublicKey,
}

impl PartialEq for K256Key {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for K256Key {}

fn secp() -> &'static secp256k1::Secp256k1<secp256k1::VerifyOnly> {
    static CTX: std::sync::OnceLock<secp256k1::Secp256k1<secp256k1::VerifyOnly>> = std::sync::OnceLock::new();
    CTX.get_or_init(secp256k1::Secp256k1::verification_only)
}

/// Why a key could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base58btc multibase")]
    Multibase,
    #[error("unknown key type")]
    UnknownType,
    #[error("not a point on the curve")]
    BadPoint,
}

impl PublicKey {
    /// `did:key:z…` (a multicodec-prefixed compressed key).
    pub fn from_did_key(did_key: &str) -> Result<PublicKey, KeyError> {
        Self::from_multikey(did_key.strip_prefix("did:key:").ok_or(KeyError::Multibase)?)
    }

    /// A `Multikey` verification method's `publicKeyMultibase` (`z` + base58btc of the
    /// multicodec prefix and the compressed point).
    pub fn from_multikey(multibase: &str) -> Result<PublicKey, KeyError> {
        let bytes = decode_z(multibase)?;
        if let Some(point) = bytes.strip_prefix(&K256_PUB) {
            Self::k256(point)
        } else if let Some(point) = bytes.strip_prefix(&P256_PUB) {
            Self::p256(point)
        } else {
            Err(KeyError::UnknownType)
        }
    }

    /// The legacy verification-method types, whose `publicKeyMultibase` is the bare point
    /// (no multicodec prefix).
    pub fn from_legacy(method_type: &str, multibase: &str) -> Result<PublicKey, KeyError> {
        let bytes = decode_z(multibase)?;
        match method_type {
            "EcdsaSecp256k1VerificationKey2019" => Self::k256(&bytes),
            "EcdsaSecp256r1VerificationKey2019" => Self::p256(&bytes),
            _ => Err(KeyError::UnknownType),
        }
    }

    fn k256(point: &[u8]) -> Result<PublicKey, KeyError> {
        let key = k256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| KeyError::BadPoint)?;
        Ok(Self::from_k256(key))
    }

    /// A K-256 key from its k256 form.
    pub fn from_k256(key: k256::ecdsa::VerifyingKey) -> PublicKey {
        let fast = secp256k1::PublicKey::from_slice(key.to_encoded_point(true).as_bytes())
            .expect("a valid k256 point is a valid secp256k1 point");
        PublicKey::K256(K256Key { key, fast })
    }

    fn p256(point: &[u8]) -> Result<PublicKey, KeyError> {
        p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map(PublicKey::P256).map_err(|_| KeyError::BadPoint)
    }

    /// The key as `did:key` (its canonical, compressed form), for storing and comparing.
    pub fn to_did_key(&self) -> String {
        let mut bytes = Vec::with_capacity(35);
        match self {
            PublicKey::K256(k) => {
                bytes.extend_from_slice(&K256_PUB);
                bytes.extend_from_slice(&k.fast.serialize());
            }
            PublicKey::P256(k) => {
                bytes.extend_from_slice(&P256_PUB);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
        }
        format!("did:key:z{}", bs58::encode(bytes).into_string())
    }

    /// Checks a 64-byte `r‖s` signature over `message` (hashed with SHA-256). High-S
    /// signatures are refused, as atproto requires (they would make signatures malleable);
    /// so is anything not 64 bytes (DER).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        if signature.len() != 64 {
            return false;
        }
        match self {
            PublicKey::K256(key) => {
                use sha2::{Digest, Sha256};
                // libsecp256k1 refuses high-S signatures itself; checked here too, explicitly.
                let Ok(sig) = secp256k1::ecdsa::Signature::from_compact(signature) else { return false };
                let mut low = sig;
                low.normalize_s();
                if low != sig {
                    return false;
                }
                let digest: [u8; 32] = Sha256::digest(message).into();
                secp().verify_ecdsa(&secp256k1::Message::from_digest(digest), &sig, &key.fast).is_ok()
            }
            PublicKey::P256(key) => {
                // ring's assembly P-256 (~5× faster than p256's portable code, measured in
                // benches/verify.rs); the low-S rule is ours to apply.
                let Ok(sig) = p256::ecdsa::Signature::from_slice(signature) else { return false };
                if sig.normalize_s().is_some() {
                    return false;
                }
                let point = key.to_encoded_point(false);
                ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point.as_bytes())
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

fn decode_z(multibase: &str) -> Result<Vec<u8>, KeyError> {
    let b58 = multibase.strip_prefix('z').ok_or(KeyError::Multibase)?;
    // A compressed key with its prefix is 35 bytes (48 base58 characters); refuse long input
    // before decoding it.
    if b58.len() > 128 {
        return Err(KeyError::Multibase);
    }
    bs58::decode(b58).into_vec().map_err(|_| KeyError::Multibase)
}

/// The `#atproto` signing key of a DID document (`did` must be the document's `id`).
pub fn atproto_key(did: &str, doc: &serde_json::Value) -> Result<PublicKey, DocError> {
    if doc.get("id").and_then(|v| v.as_str()) != Some(did) {
        return Err(DocError::WrongId);
    }
    let methods = doc.get("verificationMethod").and_then(|v| v.as_array()).ok_or(DocError::NoKey)?;
    for m in methods {
        let id = m.get("id").and_then(|v| v.as_str()).unwrap_or("");
        let is_atproto = id == "#atproto" || id.strip_prefix(did).is_some_and(|rest| rest == "#atproto");
        if !is_atproto {
            continue;
        }
        let multibase = m.get("publicKeyMultibase").and_then(|v| v.as_str()).ok_or(DocError::NoKey)?;
        let kind = m.get("type").and_then(|v| v.as_str()).unwrap_or("");
        let key = if kind == "Multikey" {
            PublicKey::from_multikey(multibase)
        } else {
            PublicKey::from_legacy(kind, multibase)
        };
        return key.map_err(DocError::Key);
    }
    Err(DocError::NoKey)
}

/// A `did:plc`'s `#atproto` keys over time, read from its PLC audit log
/// (`GET <plc>/<did>/log/audit`): each operation's key (none for a tombstone, or an operation
/// without one) from the time the directory accepted it, oldest first; nullified operations
/// left out.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyHistory(Vec<(i64, Option<PublicKey>)>);

impl KeyHistory {
    /// Reads an audit log: a JSON list of `{did, operation, nullified, createdAt}`. Every entry
    /// must be for `did` and carry a readable `createdAt`; an unreadable key counts as none.
    pub fn from_audit_log(did: &str, log: &serde_json::Value) -> Result<KeyHistory, DocError> {
        let entries = log.as_array().ok_or(DocError::NoKey)?;
        let mut keys = Vec::with_capacity(entries.len());
        for e in entries {
            if e.get("did").and_then(|v| v.as_str()) != Some(did) {
                return Err(DocError::WrongId);
            }
            if e.get("nullified").and_then(|v| v.as_bool()) == Some(true) {
                continue;
            }
            let at = e
                .get("createdAt")
                .and_then(|v| v.as_str())
                .and_then(crate::syntax::rfc3339_to_unix_us)
                .ok_or(DocError::NoKey)?;
            let op = e.get("operation");
            // `plc_operation` names it among its verification methods; the legacy `create`,
            // as its signing key; a tombstone has none.
            let did_key = op
                .and_then(|o| o.get("verificationMethods"))
                .and_then(|m| m.get("atproto"))
                .or_else(|| op.and_then(|o| o.get("signingKey")))
                .and_then(|v| v.as_str());
            keys.push((at, did_key.and_then(|k| PublicKey::from_did_key(k).ok())));
        }
        keys.sort_by_key(|(at, _)| *at);
        Ok(KeyHistory(keys))
    }

    /// The key in force at `time_us` (the last operation's at or before it), and when the next
    /// operation replaced it (`None`: it is the current one).
    pub fn at(&self, time_us: i64) -> Option<(&PublicKey, Option<i64>)> {
        let after = self.0.partition_point(|(at, _)| *at <= time_us);
        let (_, key) = self.0[..after].last()?;
        Some((key.as_ref()?, self.0.get(after).map(|(at, _)| *at)))
    }

    /// Former keys a commit made at `made_us` (its rev's time) may be signed with: the key in
    /// force then, or `skew_us` before (a PDS clock running ahead), if it was replaced after
    /// `replaced_after_us`. Bounded so: a key rotated away from long ago (perhaps because it
    /// leaked) signs nothing.
    pub fn former_keys_at(&self, made_us: i64, skew_us: i64, replaced_after_us: i64) -> Vec<&PublicKey> {
        let mut keys: Vec<&PublicKey> = Vec::new();
        for t in [made_us, made_us.saturating_sub(skew_us)] {
            if let Some((key, Some(replaced))) = self.at(t) {
                if replaced > replaced_after_us && !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        keys
    }
}

/// Why a DID document gave no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("the document is for another DID")]
    WrongId,
    #[error("no #atproto verification method")]
    NoKey,
    #[error("the #atproto key: {0}")]
    Key(KeyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        let signing = k256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).unwrap();
        PublicKey::from_k256(*signing.verifying_key())
    }

    #[test]
    fn a_plc_audit_log_gives_the_key_in_force_at_a_time() {
        let did = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";
        let entry = |op: serde_json::Value, at: &str, nullified: bool| serde_json::json!({"did": did, "operation": op, "cid": "bafy", "nullified": nullified, "createdAt": at});
        let (a, b, c) = (key(1), key(2), key(3));
        let log = serde_json::json!([
            entry(
                serde_json::json!({"type": "create", "signingKey": a.to_did_key()}),
                "2024-01-01T00:00:00.000Z",
                false
            ),
            // Out of order in the list; a nullified operation counts for nothing.
            entry(
                serde_json::json!({"type": "plc_operation", "verificationMethods": {"atproto": c.to_did_key()}}),
                "2024-09-01T00:00:00.000Z",
                false
            ),
            entry(
                serde_json::json!({"type": "plc_operation", "verificationMethods": {"atproto": b.to_did_key()}}),
                "2024-06-01T00:00:00.000Z",
                false
            ),
            entry(
                serde_json::json!({"type": "plc_operation", "verificationMethods": {"atproto": key(9).to_did_key()}}),
                "2024-07-01T00:00:00.000Z",
                true
            ),
            entry(serde_json::json!({"type": "plc_tombstone"}), "2025-01-01T00:00:00.000Z", false),
        ]);
        let h = KeyHistory::from_audit_log(did, &log).unwrap();
        let us = |t: &str| crate::syntax::rfc3339_to_unix_us(t).unwrap();
        let at = |t: &str| h.at(us(t)).map(|(k, replaced)| (k.clone(), replaced));
        assert_eq!(at("2023-12-31T23:59:59Z"), None, "before the DID existed");
        let (june, september) = (Some(us("2024-06-01T00:00:00Z")), Some(us("2024-09-01T00:00:00Z")));
        assert_eq!(at("2024-01-01T00:00:00Z"), Some((a.clone(), june)));
        assert_eq!(at("2024-05-31T23:59:59.999Z"), Some((a.clone(), june)));
        assert_eq!(at("2024-07-15T00:00:00Z"), Some((b.clone(), september)), "the nullified one is not in force");
        assert_eq!(at("2024-12-31T00:00:00Z"), Some((c, Some(us("2025-01-01T00:00:00Z")))));
        assert_eq!(at("2025-02-01T00:00:00Z"), None, "tombstoned");
        // Former keys: the one in force when the commit was made, or a minute before; only if
        // it was replaced after the given time.
        let minute = 60_000_000;
        let former = |made: &str, after: &str| h.former_keys_at(us(made), minute, us(after));
        assert_eq!(former("2024-05-31T00:00:00Z", "2024-05-01T00:00:00Z"), vec![&a]);
        assert_eq!(former("2024-06-01T00:00:30Z", "2024-05-01T00:00:00Z"), vec![&b, &a], "a PDS clock ahead");
        assert!(former("2024-05-31T00:00:00Z", "2024-06-02T00:00:00Z").is_empty(), "replaced too long ago");
        // Another DID's entries, or one without a time, make the log unusable.
        let other = serde_json::json!([{"did": "did:plc:other", "operation": {}, "createdAt": "2024-01-01T00:00:00Z"}]);
        assert_eq!(KeyHistory::from_audit_log(did, &other), Err(DocError::WrongId));
        let untimed = serde_json::json!([{"did": did, "operation": {}}]);
        assert_eq!(KeyHistory::from_audit_log(did, &untimed), Err(DocError::NoKey));
    }
}
