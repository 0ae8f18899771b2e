//! The TOML configuration under generated input (property-based: the configuration belongs to
//! the service crate, which builds RocksDB, and the cargo-fuzz targets must not; see
//! RELIABILITY.md). Documents of known keys with values of every TOML type, unknown keys,
//! nested tables, and raw bytes. The properties: loading never panics; a refusal names a key
//! and says why; a configuration that loads and validates renders (`--validate-only`) to TOML
//! that loads again to the same rendering.
//!
//! `PROPTEST_CASES=1000000 cargo test --release --test config_fuzz` for a long run.

use contrail::config::{load, Command, LoadError};
use proptest::prelude::*;
use std::ffi::OsString;

/// The settings the example file names (every `serve` setting), read from it.
fn known_keys() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/contrail.example.toml")).unwrap();
    let table: toml::Table = text.parse().unwrap();
    table.keys().cloned().collect()
}

/// Values a setting might be given: durations, sizes, numbers, booleans, URLs, addresses, and
/// TOML's other types.
#[rustfmt::skip]
const PLAUSIBLE: &[&str] = &[
    "\"30s\"", "\"0s\"", "\"1ms\"", "\"10y\"", "\"64MiB\"", "\"0B\"", "\"1EiB\"", "0", "1", "-1", "65536",
    "9223372036854775807", "-9223372036854775808", "true", "false", "\"wss://bsky.network\"",
    "\"ws://[::1]:6008\"", "\"127.0.0.1:0\"", "\"[::]:6008\"", "\"json\"", "\"text\"", "\"memory\"",
    "\"rocksdb\"", "[]", "[\"10.0.0.0/8\", \"::1\"]", "[\"ws://a:1\", \"wss://b\"]", "1.5", "nan", "inf",
    "\"\"", "\"\\u0000\"", "{ a = 1 }", "1979-05-27T07:32:00Z",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(PLAUSIBLE).prop_map(str::to_string),
        // Arbitrary strings and integers.
        "[^\"\\\\\\n]{0,40}".prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() { format!("{f:?}") } else { "0.0".into() }),
        prop::collection::vec("[a-z0-9:/.\\[\\]-]{0,20}", 0..4).prop_map(|v| format!("{v:?}")),
    ]
}

fn document(keys: Vec<String>) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => prop::sample::select(keys.clone()),
        1 => prop::sample::select(keys).prop_map(|k| k.replace('-', "_")),
        1 => "[a-z][a-z_-]{0,20}",
    ];
    let line = (key, value()).prop_map(|(k, v)| format!("{k} = {v}\n"));
    prop_oneof![
        8 => prop::collection::vec(line, 0..12).prop_map(|lines| lines.concat()),
        1 => "[\\[\\]a-z =\"\\n#.]{0,200}",
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// `contrail serve --validate-only --config FILE`, as `main` runs it: the rendering, or why not.
fn validate_only(path: &std::path::Path) -> Result<String, String> {
    let args: Vec<OsString> =
        ["contrail", "serve", "--validate-only", "--config"].iter().map(OsString::from).chain([path.into()]).collect();
    match load(args) {
        Ok(cli) => {
            let Command::Serve(cfg) = cli.command else { panic!("serve parsed as another command") };
            match cfg.validate() {
                Ok(()) => cfg.to_toml().map_err(|e| e.to_string()),
                Err(e) => {
                    assert!(!e.key.is_empty() && !e.message.is_empty(), "a refusal without a key or reason: {e:?}");
                    Err(e.to_string())
                }
            }
        }
        Err(LoadError::Invalid(e)) => {
            assert!(!e.key.is_empty() && !e.message.is_empty(), "a refusal without a key or reason: {e:?}");
            Err(e.to_string())
        }
        // A value clap itself refuses reaches the user as a usage error with its reason.
        Err(LoadError::Usage(e)) => {
            assert!(!e.to_string().trim().is_empty(), "a usage error without a reason");
            Err(e.to_string())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_configurations_load_or_are_refused_with_a_reason(doc in document(known_keys())) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &doc).unwrap();
        if let Ok(rendered) = validate_only(&path) {
            // What `--validate-only` prints loads again, to the same configuration.
            let again = dir.path().join("again.toml");
            std::fs::write(&again, &rendered).unwrap();
            let second = validate_only(&again);
            prop_assert_eq!(second.as_deref(), Ok(rendered.as_str()), "from:\n{}", doc);
        }
    }
}
